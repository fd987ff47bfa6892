"""Rollout engines and the in-place weight refresh from the FSDP2 trainer.

Typical use in a torchrun trainer::

    from oreal.rollout import SamplingParams, WeightSyncer, build_engine

    engine = build_engine("vllm", "/models/qwen2.5-7b", gpus="6,7", tensor_parallel_size=2) if rank == 0 else None
    syncer = WeightSyncer(fsdp_model, engine, bucket_bytes=1 << 30)   # every rank
    for step in ...:
        if rank == 0:
            rollouts = engine.generate(prompt_ids, n=16, sampling=SamplingParams(temperature=1.0, max_new_tokens=4096))
        ...  # train
        optimizer.step()
        syncer.sync()                                                  # every rank
    if rank == 0:
        engine.close()

`build_engine("hf", ...)` gives the same interface with transformers, and
`build_engine("vllm", ...)` on a machine without CUDA runs vLLM's CPU build (float32). Only
oreal/rollout/vllm.py imports vLLM, and only when a vLLM engine is built.
"""

from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING, Any

from oreal.rollout.errors import (
    EngineBrokenError,
    EngineDiedError,
    EngineError,
    EngineStartError,
    EngineSyncError,
    EngineTimeoutError,
    RemoteEngineError,
    WeightMismatchError,
)
from oreal.rollout.plan import SyncPlan, check_specs, plan_buckets
from oreal.rollout.types import Rollout, SamplingParams, TensorSpec

if TYPE_CHECKING:
    from oreal.rollout.client import EngineClient
    from oreal.rollout.protocol import RolloutEngine
    from oreal.rollout.weight_sync import DEFAULT_BUCKET_BYTES, WeightSyncer

# Imported on first use: the engine process imports this package too, and does not need
# the trainer side (torch.distributed.tensor alone takes seconds to import on a busy host).
_LAZY = {
    "EngineClient": "oreal.rollout.client",
    "RolloutEngine": "oreal.rollout.protocol",
    "WeightSyncer": "oreal.rollout.weight_sync",
    "DEFAULT_BUCKET_BYTES": "oreal.rollout.weight_sync",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'oreal.rollout' has no attribute {name!r}")


__all__ = [
    "DEFAULT_BUCKET_BYTES", "EngineBrokenError", "EngineClient", "EngineDiedError", "EngineError",
    "EngineStartError", "EngineSyncError", "EngineTimeoutError", "RemoteEngineError", "Rollout",
    "RolloutEngine", "SamplingParams", "SyncPlan", "TensorSpec", "WeightMismatchError", "WeightSyncer",
    "build_engine", "check_specs", "plan_buckets",
]


def build_engine(
    kind: str,
    model: Any,
    *,
    dtype: str | None = None,
    seed: int = 0,
    startup_timeout_s: float = 600.0,
    request_timeout_s: float = 3600.0,
    sync_timeout_s: float = 600.0,
    control_timeout_s: float = 120.0,
    sync_host: str = "127.0.0.1",
    gpus: str | None = None,
    env: dict[str, str] | None = None,
    log_path: str | None = None,
    **options: Any,
) -> EngineClient:
    """Start a rollout engine in its own process and return its client (a RolloutEngine).

    kind "hf": transformers `generate`. `model` is a local checkpoint directory, a
        `transformers.PretrainedConfig` (random weights, for tests) or a config dict with
        "model_type". Options: device ("cpu"), num_threads, max_batch_rows (256), max_padding (0.25).
        dtype defaults to "float32".
    kind "vllm": `vllm.LLM` on dedicated GPUs, or vLLM's CPU build where CUDA is absent.
        `model` is a local checkpoint directory. Options: tensor_parallel_size (1),
        gpu_memory_utilization (0.85), max_model_len, enable_prefix_caching (True),
        vllm_kwargs (extra `vllm.LLM` arguments). dtype defaults to "bfloat16" with CUDA,
        "float32" without (vLLM's CPU bf16 kernels need AMX).
    gpus: CUDA_VISIBLE_DEVICES for the engine process (e.g. "6,7"); env: more variables.
    Timeouts are in seconds; see EngineClient. Call `close()` when done.
    """
    if kind not in ("hf", "vllm"):
        raise ValueError(f"unknown engine kind {kind!r}: use 'hf' (transformers) or 'vllm'")
    if not isinstance(model, (str, os.PathLike, dict)):
        to_dict = getattr(model, "to_dict", None)
        if to_dict is None:
            raise TypeError(f"model must be a checkpoint path, a transformers config or a dict, got {type(model)}")
        model = to_dict()
    if isinstance(model, os.PathLike):
        model = os.fspath(model)
    if isinstance(model, str) and not os.path.isdir(model):
        raise FileNotFoundError(f"model path {model!r} is not a directory (checkpoints are never downloaded)")
    if kind == "vllm" and not isinstance(model, str):
        raise TypeError("a vLLM engine loads a checkpoint directory: pass its path as `model`")
    child_env = dict(env or {})
    if gpus is not None:
        child_env["CUDA_VISIBLE_DEVICES"] = gpus
    if dtype is None:
        import torch

        dtype = "bfloat16" if kind == "vllm" and torch.cuda.is_available() else "float32"
    backend_options = dict(model=model, dtype=dtype, seed=seed,
                           **options)
    from oreal.rollout.client import EngineClient

    return EngineClient(kind, backend_options, startup_timeout_s=startup_timeout_s,
                        request_timeout_s=request_timeout_s, sync_timeout_s=sync_timeout_s,
                        control_timeout_s=control_timeout_s, sync_host=sync_host, env=child_env,
                        log_path=log_path)
