"""Backend registry for the fused losses.

A backend provides the two internal ops of `oreal.ops.torch_backend`'s contract:
`linear_logprob_loss(...)` and `token_rm_weights(...)`. Backends are loaded lazily, so that
`import oreal` never imports Triton or the native extension, and a backend that cannot run says why.

    torch   the readable reference (`oreal.ops.torch_backend`), any device
    triton  `oreal_kernels` (kernels/): CUDA tensors, or CPU tensors under TRITON_INTERPRET=1
    native  `oreal._C` (csrc/): CUDA kernels for CUDA tensors, C++ kernels for CPU tensors
    auto    native if built for the device, else triton on CUDA, else torch
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Callable

import torch

NAMES = ("torch", "triton", "native")


@dataclass(frozen=True)
class Backend:
    name: str
    linear_logprob_loss: Callable
    token_rm_weights: Callable
    linear_policy_loss: Callable | None = None  # the clipped surrogate; None where not written yet


def _load_torch() -> Backend:
    from oreal.ops import token_weights, torch_backend

    return Backend("torch", torch_backend.linear_logprob_loss, token_weights.token_rm_weights,
                   torch_backend.linear_policy_loss)


def _load_triton() -> Backend:
    module = importlib.import_module("oreal_kernels")
    return Backend("triton", module.linear_logprob_loss, module.token_rm_weights,
                   getattr(module, "linear_policy_loss", None))


def _load_native() -> Backend:
    module = importlib.import_module("oreal.ops.native")
    return Backend("native", module.linear_logprob_loss, module.token_rm_weights,
                   getattr(module, "linear_policy_loss", None))


_LOADERS = {"torch": _load_torch, "triton": _load_triton, "native": _load_native}


def unavailable_reason(name: str, device: torch.device) -> str | None:
    """None if backend `name` can run on `device`, else a sentence saying why not."""
    if name == "triton":
        interpreted = os.environ.get("TRITON_INTERPRET") == "1"
        if device.type != "cuda" and not interpreted:
            return (f"Triton kernels need CUDA tensors (got {device.type}); on the CPU they run only "
                    "under the interpreter: set TRITON_INTERPRET=1 before importing oreal_kernels")
    try:
        backend = _LOADERS[name]()
    except (ImportError, AttributeError, OSError) as exc:
        return f"it could not be loaded ({type(exc).__name__}: {exc})"
    if name == "native":
        from oreal.ops import native

        return native.unavailable_reason(device)
    del backend
    return None


def available_backends(device: torch.device) -> list[str]:
    return [name for name in NAMES if unavailable_reason(name, device) is None]


def resolve(name: str, device: torch.device, op: str = "linear_logprob_loss") -> Backend:
    """The backend to run `op` on `device`, or a ValueError that says why not and what is available."""
    if name == "auto":
        order = ("native", "triton", "torch") if device.type == "cuda" else ("native", "torch")
        for candidate in order:
            if unavailable_reason(candidate, device) is None:
                backend = _LOADERS[candidate]()
                if getattr(backend, op) is not None:
                    return backend
        raise ValueError(f"backend: no backend can run {op} on {device}")
    if name not in _LOADERS:
        raise ValueError(f"backend: unknown backend {name!r}; choose one of {', '.join(NAMES + ('auto',))}")
    reason = unavailable_reason(name, device)
    if reason is not None:
        raise ValueError(f"backend: {name!r} is unavailable on {device}: {reason}. "
                         f"Available here: {', '.join(available_backends(device))}")
    backend = _LOADERS[name]()
    if getattr(backend, op) is None:
        raise ValueError(f"backend: {name!r} does not implement {op} yet; use 'torch' or 'auto'")
    return backend
