"""Input checks for the fused losses: every user error becomes one `ValueError` naming the argument.

Shape and dtype checks are free. The value checks (labels within `[0, V)`, `cu_seqlens`
monotone and ending at `T`) read data back to the host, which costs one synchronisation per
call on a GPU; set `OREAL_CHECK_VALUES=0` to skip them in a trusted training loop.
"""

from __future__ import annotations

import math
import os

import torch

IGNORE_INDEX = -100
FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)


def value_checks_enabled() -> bool:
    return os.environ.get("OREAL_CHECK_VALUES", "1") not in ("0", "false", "False")


def _fail(name: str, message: str) -> None:
    raise ValueError(f"{name}: {message}")


def check_tensor(name: str, x, *, ndim: int, dtypes=None, length: int | None = None, device=None):
    if not isinstance(x, torch.Tensor):
        _fail(name, f"expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() != ndim:
        _fail(name, f"expected a {ndim}-D tensor, got shape {tuple(x.shape)}")
    if dtypes is not None and x.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        _fail(name, f"dtype {str(x.dtype).replace('torch.', '')} is not supported (expected one of {allowed})")
    if length is not None and x.shape[0] != length:
        _fail(name, f"expected {length} entries along dim 0, got shape {tuple(x.shape)}")
    if device is not None and x.device != device:
        _fail(name, f"is on {x.device}, but hidden is on {device}; put all inputs on one device")


def check_cu_seqlens(cu_seqlens, num_tokens: int, device) -> int:
    """Validates `cu_seqlens [S+1]` and returns S."""
    check_tensor("cu_seqlens", cu_seqlens, ndim=1, dtypes=(torch.int32, torch.int64), device=device)
    if cu_seqlens.numel() < 1:
        _fail("cu_seqlens", "must hold at least one entry (0)")
    if value_checks_enabled():
        values = cu_seqlens.tolist()
        if values[0] != 0:
            _fail("cu_seqlens", f"must start at 0, starts at {values[0]}")
        if any(b < a for a, b in zip(values, values[1:])):
            _fail("cu_seqlens", "must be non-decreasing")
        if values[-1] != num_tokens:
            _fail("cu_seqlens", f"must end at T={num_tokens} (the number of packed tokens), ends at {values[-1]}")
    return cu_seqlens.numel() - 1


def check_labels(labels, num_tokens: int, vocab_size: int, device) -> None:
    check_tensor("labels", labels, ndim=1, length=num_tokens, device=device,
                 dtypes=(torch.int32, torch.int64))
    if value_checks_enabled() and labels.numel():
        bad = (labels != IGNORE_INDEX) & ((labels < 0) | (labels >= vocab_size))
        if bool(bad.any()):
            first = int(labels[bad][0])
            _fail("labels", f"value {first} is outside [0, {vocab_size}) and is not the ignore index {IGNORE_INDEX}")


def check_linear_inputs(hidden, weight) -> tuple[int, int, int]:
    """Validates `hidden [T, H]` and `weight [V, H]`; returns (T, H, V)."""
    check_tensor("hidden", hidden, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor("weight", weight, ndim=2, dtypes=FLOAT_DTYPES, device=hidden.device)
    if weight.dtype != hidden.dtype:
        _fail("weight", f"dtype {weight.dtype} differs from hidden's {hidden.dtype}")
    if weight.shape[1] != hidden.shape[1]:
        _fail("weight", f"shape {tuple(weight.shape)} does not match hidden's hidden size {hidden.shape[1]} (expected [V, H])")
    if weight.shape[0] == 0:
        _fail("weight", "vocabulary size is 0")
    return hidden.shape[0], hidden.shape[1], weight.shape[0]


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)  # True is an int, not a coefficient


def check_positive_float(name: str, value) -> None:
    if not _is_number(value) or not value > 0 or not math.isfinite(value):
        _fail(name, f"must be a positive finite number, got {value!r}")


def check_finite_float(name: str, value) -> None:
    if not _is_number(value) or not math.isfinite(value):
        _fail(name, f"must be a finite number, got {value!r}")


def check_count(name: str, value, device):
    """A global token count: None, a non-negative int or a 0-d/1-element tensor (its value is
    checked like an int's unless value checks are off)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, torch.Tensor)):
        _fail(name, f"expected an int or a tensor, got {type(value).__name__}")
    if isinstance(value, int):
        if value < 0:
            _fail(name, f"must be non-negative, got {value}")
        return torch.tensor(float(value), device=device)
    if value.numel() != 1:
        _fail(name, f"expected one element, got shape {tuple(value.shape)}")
    if value.dtype == torch.bool or value.is_complex():
        _fail(name, f"dtype {str(value.dtype).replace('torch.', '')} is not a count (use an integer or float tensor)")
    if value_checks_enabled():  # the int path's checks; a NaN count would silently drop a loss term
        count = float(value)
        if not math.isfinite(count) or count < 0:
            _fail(name, f"must be a finite non-negative count, got {count}")
    return value.reshape(()).to(device=device, dtype=torch.float32)
