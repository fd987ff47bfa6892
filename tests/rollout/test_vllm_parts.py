"""The parts of the vLLM engine that need neither vLLM nor a GPU."""

import random
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from rollout_testlib import tiny_config, tiny_model

from oreal.rollout import EngineSyncError, SamplingParams, TensorSpec, plan_buckets
from oreal.rollout import vllm as vllm_engine
from oreal.rollout.vllm import (BucketAssembler, NcclReceiver, NcclTransport, _rollouts_from_outputs,
                                read_checkpoint_specs, receive_buckets, require_same_nccl, vllm_sampling_kwargs)


def test_importing_the_vllm_module_does_not_import_vllm():
    code = "import sys, oreal.rollout, oreal.rollout.vllm; assert 'vllm' not in sys.modules, 'vllm was imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_checkpoint_specs_come_from_safetensors_headers(tmp_path):
    model = tiny_model(tiny_config(tie_word_embeddings=True), seed=3)
    model.save_pretrained(tmp_path, max_shard_size="20KB")  # several shards
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    specs = read_checkpoint_specs(str(tmp_path), "bfloat16")
    params = dict(model.named_parameters())
    assert set(specs) == set(params)  # tied lm_head is not stored, and not expected
    for name, p in params.items():
        assert specs[name] == TensorSpec(name, tuple(p.shape), "bfloat16")
    with pytest.raises(FileNotFoundError, match="safetensors"):
        read_checkpoint_specs(str(tmp_path / "nothing"), "bfloat16")


def test_sampling_options_translate_one_to_one():
    s = SamplingParams(temperature=0.6, top_p=0.95, top_k=0, max_new_tokens=128, stop_token_ids=(2, 7), seed=10)
    kw = vllm_sampling_kwargs(s, n=4, prompt_index=3, top_k_off=-1)
    assert kw == dict(n=4, temperature=0.6, top_p=0.95, top_k=-1, max_tokens=128, stop_token_ids=[2, 7],
                      seed=10 + 3 * 4, logprobs=0, detokenize=False)
    kw = vllm_sampling_kwargs(SamplingParams(top_k=5), n=1, prompt_index=0, top_k_off=0)
    assert kw["top_k"] == 5 and kw["seed"] is None


@pytest.mark.parametrize("seed", range(3))
def test_assembler_rebuilds_every_tensor_including_split_ones(seed):
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    tensors = {f"t{i}": torch.randn(rng.randint(1, 30), rng.randint(1, 9), generator=g).to(
        rng.choice([torch.float32, torch.bfloat16])) for i in range(12)}
    specs = [TensorSpec(n, tuple(t.shape), str(t.dtype).removeprefix("torch.")) for n, t in tensors.items()]
    plan = plan_buckets(specs, 256)
    assembler = BucketAssembler()
    got = {}
    for bucket in plan.buckets:
        buf = torch.zeros(plan.capacity, dtype=torch.uint8)
        for piece in bucket.pieces:  # what the trainer packs
            src = tensors[piece.name].reshape(-1)[piece.start:piece.start + piece.numel]
            buf[piece.offset:piece.offset + src.numel() * src.element_size()].view(src.dtype).copy_(src)
        for name, t in assembler.tensors(bucket, buf):
            assert name not in got
            got[name] = t.clone()
    assert not assembler.partial
    assert set(got) == set(tensors)
    for name, t in tensors.items():
        assert got[name].dtype == t.dtype and torch.equal(got[name], t)


def test_vllm_outputs_become_rollouts():
    def comp(index, tokens, lps, reason):
        return SimpleNamespace(index=index, token_ids=tokens, finish_reason=reason,
                               logprobs=[{t: SimpleNamespace(logprob=lp)} for t, lp in zip(tokens, lps)])

    outputs = [SimpleNamespace(outputs=[comp(1, [5, 2], [-0.5, -0.1], "stop"), comp(0, [4, 4, 4], [-1, -2, -3], "length")])]
    rollouts = _rollouts_from_outputs(outputs, n=2)
    assert [(r.sample_index, r.token_ids, r.logprobs, r.finish_reason) for r in rollouts] == [
        (0, [4, 4, 4], [-1.0, -2.0, -3.0], "length"), (1, [5, 2], [-0.5, -0.1], "stop")]
    with pytest.raises(RuntimeError, match="expected 3"):
        _rollouts_from_outputs(outputs, n=3)


def test_greedy_requests_decode_once_and_repeat():
    """vLLM refuses n > 1 with greedy sampling: one completion per prompt becomes n identical samples."""
    comp = SimpleNamespace(index=0, token_ids=[4, 5], finish_reason="length",
                           logprobs=[{4: SimpleNamespace(logprob=-0.1)}, {5: SimpleNamespace(logprob=-0.2)}])
    rollouts = _rollouts_from_outputs([SimpleNamespace(outputs=[comp])], n=1, repeat=3)
    assert [(r.prompt_index, r.sample_index, r.token_ids) for r in rollouts] == [(0, j, [4, 5]) for j in range(3)]
    rollouts[0].token_ids.append(9)  # independent lists
    assert rollouts[1].token_ids == [4, 5]


@pytest.mark.parametrize("n", [1, 2, 5])
def test_per_sample_seeds_never_collide(n):
    """vLLM seeds sample j of a request with `seed + j`; every (prompt, sample) of a call must get its own seed
    (with per-prompt seeds `seed + i`, sample j+1 of prompt i would replay sample j of prompt i+1)."""
    seed = random.randrange(1 << 20)
    sampling = SamplingParams(seed=seed)
    seeds = [vllm_sampling_kwargs(sampling, n, i, top_k_off=0)["seed"] + j for i in range(7) for j in range(n)]
    assert len(set(seeds)) == len(seeds)
    assert vllm_sampling_kwargs(sampling, n, 0, top_k_off=0)["seed"] == seed


def test_copied_pieces_survive_the_reuse_of_their_bucket_buffer():
    """vLLM's layerwise reload keeps the tensors it is given until a whole layer has arrived, while the
    receive loop reuses its two buffers: whole pieces must be copies, not views."""
    g = torch.Generator().manual_seed(random.randrange(1 << 30))
    tensors = {f"w{i}": torch.randn(5, 3, generator=g) for i in range(6)}  # 60 bytes each: one per bucket
    plan = plan_buckets([TensorSpec(n, tuple(t.shape), "float32") for n, t in tensors.items()], 64)
    assert len(plan.buckets) == len(tensors)

    class Wire:  # stand-in for the data plane: "receives" each bucket as the trainer packed it
        def __init__(self):
            self.buffers, self.posted = [], {}

        def allocate(self, slots, capacity):
            self.buffers = [torch.zeros(capacity, dtype=torch.uint8) for _ in range(slots)]
            return self.buffers

        def post(self, slot, nbytes):
            bucket = plan.buckets[self.posted.setdefault("next", 0)]
            self.posted["next"] += 1
            for piece in bucket.pieces:
                src = tensors[piece.name].reshape(-1)[piece.start:piece.start + piece.numel]
                self.buffers[slot][piece.offset:piece.offset + 4 * piece.numel].view(torch.float32).copy_(src)

        def wait(self, slot, timeout_s):
            pass

        def release(self, slot):
            pass

        def finish(self):
            pass

    kept = []  # what a loader that defers its work holds on to
    assert receive_buckets(plan, Wire(), kept.extend, timeout_s=1.0) == len(tensors)
    assert {name: t for name, t in kept}.keys() == tensors.keys()
    for name, t in kept:
        assert torch.equal(t, tensors[name]), name
    kept.clear()
    receive_buckets(plan, Wire(), kept.extend, timeout_s=1.0, copy=False)  # views: overwritten by later buckets
    assert any(not torch.equal(t, tensors[name]) for name, t in kept)


# ----- the NCCL data plane, with stand-ins for CUDA streams and vLLM's communicator --------------
class FakeStream:
    def __init__(self, log, name):
        self.log, self.name = log, name

    def wait_stream(self, other):
        self.log.append(("wait_stream", self.name, other.name))

    def wait_event(self, event):
        self.log.append(("wait_event", self.name, event.name))

    def __repr__(self):
        return f"FakeStream({self.name})"


@pytest.fixture
def fake_cuda(monkeypatch):
    """torch.cuda's stream API replaced by recorders: a log of (operation, stream, ...) in call order."""
    log = []
    state = {"current": FakeStream(log, "default"), "streams": 0, "events": 0}

    def new_stream(device=None):
        state["streams"] += 1
        return FakeStream(log, f"side{state['streams']}")

    class FakeEvent:
        def __init__(self, *args, **kwargs):
            state["events"] += 1
            self.name = f"event{state['events']}"

        def record(self, stream=None):
            log.append(("record", (stream or state["current"]).name, self.name))

        def query(self):
            return True

    class use_stream:
        def __init__(self, stream):
            self.stream = stream

        def __enter__(self):
            self.saved, state["current"] = state["current"], self.stream

        def __exit__(self, *exc):
            state["current"] = self.saved

    def set_stream(stream):
        log.append(("set_stream", stream.name))
        state["current"] = stream

    monkeypatch.setattr(torch.cuda, "Stream", new_stream)
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: state["current"])
    monkeypatch.setattr(torch.cuda, "set_stream", set_stream)
    monkeypatch.setattr(torch.cuda, "stream", use_stream)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: log.append(("synchronize",)))
    return SimpleNamespace(log=log, state=state, new_stream=new_stream)


class FakeGroup:
    @staticmethod
    def create(host, port, rank, world_size, store_timeout):
        return SimpleNamespace(rank=rank, world_size=world_size)


def fake_communicator(fake_cuda, *, disabled=False, with_destroy=True):
    """A stand-in for vLLM's PyNcclCommunicator: its constructor, like vLLM's warm-up all-reduce through
    `vllm.utils.current_stream()`, installs a new current stream; broadcasts and aborts are logged."""
    log = fake_cuda.log

    class Comm:
        def __init__(self, group, device):
            self.available, self.disabled = not disabled, disabled
            self.comm = "comm-handle"
            self.nccl = SimpleNamespace(ncclCommAbort=lambda handle: log.append(("ncclCommAbort", handle)))
            if not disabled:
                torch.cuda.set_stream(fake_cuda.new_stream())

        def broadcast(self, tensor, src, stream):
            assert not self.disabled
            log.append(("broadcast", stream.name, tensor.numel()))

    if with_destroy:
        def destroy(self):
            log.append(("destroy",))
            self.nccl.ncclCommAbort(self.comm)
            self.available, self.disabled = False, True

        Comm.destroy = destroy
    return Comm


def test_a_disabled_communicator_is_an_error_not_a_silent_no_op(fake_cuda, monkeypatch):
    monkeypatch.setattr(vllm_engine, "_vllm_nccl_classes", lambda: (FakeGroup, fake_communicator(fake_cuda, disabled=True)))
    with pytest.raises(RuntimeError, match="PyNcclCommunicator is disabled on rank 0 of 2.*NCCL could not be loaded"):
        NcclTransport("127.0.0.1", 1234, 2, torch.device("cpu"), timeout_s=5)


def test_building_the_communicator_keeps_the_trainers_current_stream(fake_cuda, monkeypatch):
    monkeypatch.setattr(vllm_engine, "_vllm_nccl_classes", lambda: (FakeGroup, fake_communicator(fake_cuda)))
    before = torch.cuda.current_stream()
    transport = NcclTransport("127.0.0.1", 1234, 2, torch.device("cpu"), timeout_s=5)
    assert torch.cuda.current_stream() is before
    assert ("set_stream", "default") in fake_cuda.log  # vLLM's stream was installed, then undone
    transport.broadcast(torch.zeros(8, dtype=torch.uint8))
    assert fake_cuda.log[-3:-1] == [("wait_stream", transport.stream.name, "default"),
                                    ("broadcast", transport.stream.name, 8)]


@pytest.mark.parametrize("with_destroy", [True, False], ids=["vllm-destroy", "library-call"])
def test_closing_the_transport_aborts_the_communicator(fake_cuda, monkeypatch, with_destroy):
    comm_cls = fake_communicator(fake_cuda, with_destroy=with_destroy)
    monkeypatch.setattr(vllm_engine, "_vllm_nccl_classes", lambda: (FakeGroup, comm_cls))
    transport = NcclTransport("127.0.0.1", 1234, 2, torch.device("cpu"), timeout_s=5)
    comm = transport.comm
    transport.close()
    assert fake_cuda.log.count(("ncclCommAbort", "comm-handle")) == 1
    assert transport.comm is None and comm.disabled
    transport.close()  # twice is harmless
    vllm_engine.abort_communicator(comm)  # and an aborted communicator is not aborted again
    assert fake_cuda.log.count(("ncclCommAbort", "comm-handle")) == 1


def test_buckets_are_received_only_after_the_allocating_stream(fake_cuda):
    """The side stream must wait for the stream the receive buffers were allocated on before writing into
    them (the caching allocator may hand out a block still read by work queued there), and the current
    stream must wait for each bucket's arrival before reading it."""
    specs = [TensorSpec(f"t{i}", (7,), "float32") for i in range(5)]
    plan = plan_buckets(specs, 64)
    comm = fake_communicator(fake_cuda)(None, None)
    fake_cuda.log.clear()
    receiver = NcclReceiver(comm, torch.device("cpu"))
    side, current = receiver.stream.name, torch.cuda.current_stream().name
    loaded = []
    receive_buckets(plan, receiver, loaded.extend, timeout_s=5)
    log = fake_cuda.log
    first_broadcast = next(i for i, e in enumerate(log) if e[0] == "broadcast")
    assert ("wait_stream", side, current) in log[:first_broadcast]
    broadcasts = [e for e in log if e[0] == "broadcast"]
    assert [e[1] for e in broadcasts] == [side] * len(plan.buckets)
    waits = [e for e in log if e[0] == "wait_event" and e[1] == current]
    assert len(waits) == len(plan.buckets)  # the current stream waits for every arrival
    assert sorted(name for name, _ in loaded) == [s.name for s in specs]
    assert log[-1] == ("synchronize",)


def test_nccl_settings_must_agree_between_the_trainer_and_the_workers():
    same = {"library": "2.27.3", "NCCL_CUMEM_ENABLE": "0"}
    require_same_nccl(dict(same), dict(same))
    require_same_nccl({"library": None}, {"library": "2.27.3"})  # unknown on one side: nothing to compare
    with pytest.raises(EngineSyncError, match=r"NCCL_CUMEM_ENABLE: 1 in the trainer, 0 in the vLLM workers"):
        require_same_nccl({**same, "NCCL_CUMEM_ENABLE": "1"}, same)
    with pytest.raises(EngineSyncError, match=r"NCCL_PROTO: unset in the trainer, LL in the vLLM workers"):
        require_same_nccl(same, {**same, "NCCL_PROTO": "LL"})
    with pytest.raises(EngineSyncError, match=r"NCCL library: 2.26.2 in the trainer, 2.27.3 .*VLLM_NCCL_SO_PATH"):
        require_same_nccl({**same, "library": "2.26.2"}, same)


def test_the_nccl_settings_of_this_process_are_read_from_its_environment(monkeypatch):
    monkeypatch.setenv("NCCL_CUMEM_ENABLE", "0")
    monkeypatch.delenv("NCCL_PROTO", raising=False)
    settings = vllm_engine.nccl_settings()
    assert settings["NCCL_CUMEM_ENABLE"] == "0" and settings["NCCL_PROTO"] is None
    assert set(settings) == {"library", *vllm_engine.NCCL_SETTINGS_THAT_MUST_AGREE}
