"""The vLLM engine: `vllm.LLM` on dedicated GPUs, refreshed in place over NCCL.

The only module that imports vLLM, and only inside functions, so importing oreal.rollout
never needs it. Three pieces:

- VllmBackend runs in the engine process (oreal/rollout/server.py) and owns a `vllm.LLM`
  built with `worker_extension_cls="oreal.rollout.vllm.OrealWorkerExtension"`. It samples
  with token-id prompts and per-token log-probs (`logprobs=0`, processed log-probs where the
  installed vLLM supports `logprobs_mode`), and forwards weight syncs to the workers through
  `LLM.collective_rpc`, then resets the prefix cache (cached KV blocks belong to the old
  weights).
- OrealWorkerExtension is mixed into every vLLM worker. It joins a group with trainer rank 0
  (vLLM's `StatelessProcessGroup` + `PyNcclCommunicator`; trainer is rank 0, worker w is
  rank 1 + w), receives each bucket by NCCL broadcast into one of two GPU buffers (bucket
  i+1 arrives on a side stream while bucket i is loaded) and hands the pieces to the model's
  own `load_weights`, which copies them in place and handles vLLM's fused layouts (qkv_proj,
  gate_up_proj) and tensor-parallel slicing.
- NcclTransport is trainer rank 0's end of that group (the root of every broadcast).

What the engine accepts is read from the checkpoint's safetensors headers: the names and
shapes `load_weights` was built for. The pure parts (header reading, sampling options,
bucket assembly) need neither vLLM nor a GPU and are unit-tested on CPU.
"""

from __future__ import annotations

import dataclasses
import glob
import inspect
import json
import os
import struct
import time
from collections.abc import Sequence

import torch

from oreal.rollout.plan import Bucket, SyncPlan
from oreal.rollout.types import EngineInfo, Rollout, SamplingParams, TensorSpec, dtype_from_name

WORKER_EXTENSION = "oreal.rollout.vllm.OrealWorkerExtension"
_POLL_S = 0.001


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
    """
    return dict(
        n=n,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        top_k=sampling.top_k if sampling.top_k > 0 else top_k_off,
        max_tokens=sampling.max_new_tokens,
        stop_token_ids=list(sampling.stop_token_ids),
        seed=None if sampling.seed is None else sampling.seed + prompt_index,
        logprobs=0,
        detokenize=False,
    )


class BucketAssembler:
    """Turns received buckets into (name, full tensor) pairs for `load_weights`.

    Whole pieces are views into the bucket buffer (no copy). Pieces of a tensor larger than
    a bucket are collected into a temporary full tensor, released once it is complete.
    """

    def __init__(self):
        self.partial: dict[str, tuple[torch.Tensor, int]] = {}

    def tensors(self, bucket: Bucket, buf: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        out = []
        for piece in bucket.pieces:
            dtype = dtype_from_name(piece.dtype)
            view = buf[piece.offset:piece.offset + piece.numel * dtype.itemsize].view(dtype)
            if piece.whole:
                out.append((piece.name, view.view(piece.shape)))
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


def _rollouts_from_outputs(outputs, n: int) -> list[Rollout]:
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
            rollouts.append(Rollout(prompt_index=i, sample_index=j, token_ids=tokens, logprobs=logprobs,
                                    finish_reason=comp.finish_reason))
    return rollouts


# ----- NCCL group shared by trainer rank 0 and the workers ---------------------------------
def _pynccl_group(host: str, port: int, rank: int, world_size: int, device, timeout_s: float):
    from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
    from vllm.distributed.utils import StatelessProcessGroup

    kwargs = {}
    if "store_timeout" in inspect.signature(StatelessProcessGroup.create).parameters:
        kwargs["store_timeout"] = max(int(timeout_s), 1)
    group = StatelessProcessGroup.create(host=host, port=port, rank=rank, world_size=world_size, **kwargs)
    comm = PyNcclCommunicator(group, device=device)
    if getattr(comm, "disabled", False):  # some versions start disabled (meant for CUDA graphs)
        comm.disabled = False
    return comm


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


def _wait_event(event: torch.cuda.Event, timeout_s: float) -> None:
    _EventHandle(event).wait(timeout_s)


class NcclTransport:
    """Trainer rank 0's end of the NCCL group with the vLLM workers."""

    def __init__(self, host: str, port: int, world_size: int, device: int | torch.device, timeout_s: float):
        self.device = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
        self.comm = _pynccl_group(host, port, 0, world_size, self.device, timeout_s)
        self.stream = torch.cuda.Stream(self.device)

    def broadcast(self, tensor: torch.Tensor) -> _EventHandle:
        # The buffer was filled on the current stream; send it once that work is done.
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        self.comm.broadcast(tensor, src=0, stream=self.stream)
        event = torch.cuda.Event()
        event.record(self.stream)
        return _EventHandle(event)

    def close(self) -> None:
        self.comm = None


# ----- inside every vLLM worker ---------------------------------------------------------------
class OrealWorkerExtension:
    """Methods added to vLLM's worker class (`worker_extension_cls`), called via collective_rpc."""

    def _oreal_model(self):
        runner = self.model_runner
        return runner.get_model() if hasattr(runner, "get_model") else runner.model

    def oreal_init_transport(self, host: str, port: int, world_size: int, timeout_s: float) -> None:
        from vllm.distributed.parallel_state import get_world_group

        rank = 1 + get_world_group().rank
        self._oreal_comm = _pynccl_group(host, port, rank, world_size, self.device, timeout_s)
        self._oreal_stream = torch.cuda.Stream(self.device)

    @torch.no_grad()
    def oreal_receive_weights(self, plan_dict: dict, timeout_s: float) -> int:
        """Receive every bucket of the plan and load it; two buffers, one on the wire."""
        plan = SyncPlan.from_dict(plan_dict)
        comm, stream, device = self._oreal_comm, self._oreal_stream, self.device
        model = self._oreal_model()
        buckets = plan.buckets
        slots = min(2, len(buckets))
        buffers = [torch.empty(plan.capacity, dtype=torch.uint8, device=device) for _ in range(slots)]
        filled = [torch.cuda.Event() for _ in range(slots)]
        consumed = [torch.cuda.Event() for _ in range(slots)]
        assembler = BucketAssembler()

        def post(i: int) -> None:
            s = i % 2
            with torch.cuda.stream(stream):
                stream.wait_event(consumed[s])  # no-op until the slot was used once
                comm.broadcast(buffers[s][:buckets[i].nbytes], src=0, stream=stream)
                filled[s].record(stream)

        for i in range(slots):
            post(i)
        current = torch.cuda.current_stream(device)
        for i, bucket in enumerate(buckets):
            s = i % 2
            _wait_event(filled[s], timeout_s)
            current.wait_event(filled[s])
            model.load_weights(weights=assembler.tensors(bucket, buffers[s]))
            consumed[s].record(current)
            if i + 2 < len(buckets):
                post(i + 2)
        if assembler.partial:
            raise RuntimeError(f"incomplete tensors after the last bucket: {sorted(assembler.partial)}")
        torch.cuda.synchronize(device)
        return len(buckets)

    @torch.no_grad()
    def oreal_receive_tensor(self, name: str, shape: list[int], dtype: str, timeout_s: float) -> None:
        spec = TensorSpec(name, tuple(shape), dtype)
        tensor = torch.empty(spec.shape, dtype=dtype_from_name(spec.dtype), device=self.device)
        self._oreal_comm.broadcast(tensor, src=0, stream=self._oreal_stream)
        event = torch.cuda.Event()
        event.record(self._oreal_stream)
        _wait_event(event, timeout_s)
        self._oreal_model().load_weights(weights=[(spec.name, tensor)])
        torch.cuda.synchronize(self.device)

    def oreal_receive_raw(self, sizes: Sequence[int], timeout_s: float) -> None:
        buffers = getattr(self, "_oreal_raw", None)
        if buffers is None or [b.numel() for b in buffers] != list(sizes):
            buffers = self._oreal_raw = [torch.empty(s, dtype=torch.uint8, device=self.device) for s in sizes]
        for b in buffers:
            self._oreal_comm.broadcast(b, src=0, stream=self._oreal_stream)
        event = torch.cuda.Event()
        event.record(self._oreal_stream)
        _wait_event(event, timeout_s)


# ----- inside the engine process ---------------------------------------------------------------
class VllmBackend:
    """Owns a `vllm.LLM` in the engine process; see the module docstring."""

    kind = "vllm"

    def __init__(self, *, model: str, dtype: str = "bfloat16", seed: int = 0, tensor_parallel_size: int = 1,
                 gpu_memory_utilization: float = 0.85, max_model_len: int | None = None,
                 enable_prefix_caching: bool = True, vllm_kwargs: dict | None = None):
        import vllm

        if not os.path.isdir(model):
            raise FileNotFoundError(f"vLLM engine: model path {model!r} is not a directory")
        fields = {f.name for f in dataclasses.fields(vllm.EngineArgs)}
        kwargs = dict(model=model, dtype=dtype, seed=seed, tensor_parallel_size=tensor_parallel_size,
                      gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len,
                      enable_prefix_caching=enable_prefix_caching, worker_extension_cls=WORKER_EXTENSION,
                      skip_tokenizer_init=True)
        if "logprobs_mode" in fields:
            kwargs["logprobs_mode"] = "processed_logprobs"  # log-probs of the distribution sampled from
        kwargs.update(vllm_kwargs or {})
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        self.llm = vllm.LLM(**kwargs)
        self.receivers = tensor_parallel_size * int(kwargs.get("pipeline_parallel_size", 1))
        self._specs = read_checkpoint_specs(model, dtype)
        self._top_k_off = vllm.SamplingParams().top_k
        self._raw_sizes: list[int] = []
        self._versions = {"torch": torch.__version__, "vllm": vllm.__version__}

    def specs(self) -> dict[str, TensorSpec]:
        return dict(self._specs)

    def info(self) -> EngineInfo:
        return EngineInfo(kind=self.kind, pid=os.getpid(), transport="nccl", receivers=self.receivers,
                          specs=self.specs(), versions=self._versions)

    def state_dict(self):
        raise NotImplementedError("vLLM holds fused, sharded weights; compare generations instead")

    def generate(self, prompts: Sequence[Sequence[int]], n: int, sampling: SamplingParams) -> list[Rollout]:
        import vllm
        from vllm.inputs import TokensPrompt

        params = [vllm.SamplingParams(**vllm_sampling_kwargs(sampling, n, i, self._top_k_off))
                  for i in range(len(prompts))]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params,
                                    use_tqdm=False)
        return _rollouts_from_outputs(outputs, n)

    def init_transport(self, *, host: str, port: int, world_size: int, timeout_s: float, prefix: str) -> None:
        if world_size != 1 + self.receivers:
            raise ValueError(f"NCCL group of {world_size} ranks, but this engine has {self.receivers} workers")
        self.llm.collective_rpc("oreal_init_transport", args=(host, port, world_size, timeout_s))

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
