"""Variable-length attention backends for packed rows, plugged into transformers' `AttentionInterface`.

A packed row holds many sequences; attention must stay causal inside each and never cross a
boundary. Three backends do this from the row's `cu_seqlens`:

| name         | kernel                                             | runs on        |
|--------------|----------------------------------------------------|----------------|
| `flash_attn` | `flash_attn.flash_attn_varlen_func` (cu_seqlens)    | CUDA           |
| `xformers`   | `xformers.ops.memory_efficient_attention` with a `BlockDiagonalCausalMask` | CUDA |
| `sdpa`       | `torch.nn.functional.scaled_dot_product_attention` with a block-diagonal causal bool mask `[T, T]` | anywhere |

`auto` picks the first available in that order for the device. flash-attn and xformers are
imported only when chosen. The SDPA mask costs `T^2` bytes, built once per forward; it is the
CPU path and the fallback, not the fast one.

Each backend is registered under `oreal_<name>` (e.g. `oreal_flash_attn`) both as an attention
function and as a mask function, so a model loaded with `attn_implementation="oreal_sdpa"` works
in two modes:

- packed (inside `oreal.model.forward_hidden`): the forward passes a `VarlenMetadata` as the
  keyword `oreal_varlen`, which transformers hands down to every attention call, and the mask
  function returns the block-diagonal mask (SDPA) or nothing (flash-attn, xformers need none);
- plain (anything else, e.g. `generate()` on the same model): transformers builds its usual
  SDPA mask and attention falls back to its SDPA implementation, padding masks included.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib.util
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

BACKENDS = ("flash_attn", "xformers", "sdpa")
PREFIX = "oreal_"

_PACKED: contextvars.ContextVar[VarlenMetadata | None] = contextvars.ContextVar("oreal_packed", default=None)


class VarlenMetadata:
    """Sequence boundaries of one packed row, shared by every attention layer of one forward.

    `cu_seqlens [S+1]` int32 on the row's device; `max_seqlen` and `seq_lens` are host-side, so no
    layer needs a device sync. Derived masks are built once and cached here.
    """

    def __init__(self, cu_seqlens: torch.Tensor, max_seqlen: int, seq_lens: Sequence[int]):
        self.cu_seqlens = cu_seqlens.to(torch.int32)
        self.max_seqlen = int(max_seqlen)
        self.seq_lens = tuple(int(n) for n in seq_lens)
        self.num_tokens = sum(self.seq_lens)
        self._sdpa_mask: torch.Tensor | None = None
        self._xformers_bias = None

    def sdpa_mask(self) -> torch.Tensor:
        """`[1, 1, T, T]` bool, True where query t may attend key u: same sequence and u <= t."""
        if self._sdpa_mask is None:
            device = self.cu_seqlens.device
            lens = torch.tensor(self.seq_lens, device=device)
            seq = torch.repeat_interleave(torch.arange(len(self.seq_lens), device=device), lens,
                                          output_size=self.num_tokens)
            index = torch.arange(self.num_tokens, device=device)
            self._sdpa_mask = ((seq[:, None] == seq[None, :]) & (index[None, :] <= index[:, None]))[None, None]
        return self._sdpa_mask


# ---------------------------------------------------------------------------------------------
# Availability


def _missing_reason(backend: str, device: torch.device) -> str | None:
    """Why `backend` cannot run on `device`, or None when it can."""
    if backend == "sdpa":
        return None
    package = {"flash_attn": "flash_attn", "xformers": "xformers"}[backend]
    if device.type != "cuda":
        return f"{backend} runs on CUDA devices only, and the model is on {device.type}; use attn_backend='sdpa'"
    if importlib.util.find_spec(package) is None:
        hint = ("pip install flash-attn --no-build-isolation (builds against a CUDA torch)"
                if backend == "flash_attn" else "pip install xformers (a wheel matching your torch)")
        return f"{backend} is not installed ({hint})"
    try:
        _flash_kernel() if backend == "flash_attn" else _xformers_kernel()
    except Exception as error:  # an installed package built against another torch fails here
        return f"{backend} is installed but cannot be imported: {type(error).__name__}: {error}"
    return None


def available_backends(device: torch.device | str = "cpu") -> dict[str, str | None]:
    """Backend name -> None when it can run on `device`, else the reason it cannot."""
    device = torch.device(device)
    return {name: _missing_reason(name, device) for name in BACKENDS}


def resolve_backend(name: str, device: torch.device | str = "cpu") -> str:
    """`name` ("auto" or one of `BACKENDS`) checked against `device`; ValueError says why not."""
    device = torch.device(device)
    if name == "auto":
        for candidate in BACKENDS:
            if _missing_reason(candidate, device) is None:
                return candidate
    if name not in BACKENDS:
        raise ValueError(f"attn_backend: unknown attention backend {name!r}; expected 'auto' or one of {BACKENDS}")
    reason = _missing_reason(name, device)
    if reason is not None:
        raise ValueError(f"attn_backend: {name!r} is not available: {reason}")
    return name


def implementation_name(backend: str) -> str:
    """The `attn_implementation` string transformers knows the backend by."""
    return PREFIX + backend


def backend_of_implementation(implementation: str | None) -> str | None:
    """The backend behind an `attn_implementation` string, or None when it is not one of ours."""
    if implementation and implementation.startswith(PREFIX) and implementation[len(PREFIX):] in BACKENDS:
        return implementation[len(PREFIX):]
    return None


# ---------------------------------------------------------------------------------------------
# Kernels (imported lazily; tests may substitute a reference with the same contract)


def _flash_kernel() -> Callable:
    from flash_attn import flash_attn_varlen_func

    return flash_attn_varlen_func


def _xformers_kernel() -> Callable:
    """`kernel(q, k, v, seq_lens, p, scale)` on `[1, T, G, Hg, D]` tensors (xformers' BMGHK layout)."""
    from xformers.ops import fmha

    def kernel(q, k, v, seq_lens, p, scale):
        bias = fmha.attn_bias.BlockDiagonalCausalMask.from_seqlens(list(seq_lens))
        return fmha.memory_efficient_attention(q, k, v, attn_bias=bias, p=p, scale=scale)

    return kernel


# ---------------------------------------------------------------------------------------------
# Attention functions: (module, query [1, Hq, T, D], key/value [1, Hkv, T, D], mask, ...) -> [1, T, Hq, D]


def _check_packed(query: torch.Tensor, meta: VarlenMetadata, sliding_window) -> None:
    if query.shape[0] != 1:
        raise ValueError(f"packed attention expects one packed row (batch size 1), got batch size {query.shape[0]}")
    if query.shape[2] != meta.num_tokens:
        raise ValueError(f"packed attention got {query.shape[2]} query positions but cu_seqlens covers "
                         f"{meta.num_tokens}; was a KV cache passed to a packed forward?")
    if sliding_window is not None:
        raise ValueError("sliding-window attention is not supported by the packed attention backends")


def _fallback(module, query, key, value, attention_mask, dropout, scaling, kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  **kwargs)


def sdpa_varlen_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                          sliding_window=None, oreal_varlen: VarlenMetadata | None = None, **kwargs):
    if oreal_varlen is None:
        return _fallback(module, query, key, value, attention_mask, dropout, scaling, kwargs)
    _check_packed(query, oreal_varlen, sliding_window)
    enable_gqa = key.shape[1] != query.shape[1]
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=oreal_varlen.sdpa_mask(), dropout_p=dropout,
                                         scale=scaling, enable_gqa=enable_gqa)
    return out.transpose(1, 2).contiguous(), None


def flash_varlen_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                           sliding_window=None, oreal_varlen: VarlenMetadata | None = None, **kwargs):
    if oreal_varlen is None:
        return _fallback(module, query, key, value, attention_mask, dropout, scaling, kwargs)
    _check_packed(query, oreal_varlen, sliding_window)
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # [T, H, D]; flash-attn handles GQA
    cu, max_len = oreal_varlen.cu_seqlens, oreal_varlen.max_seqlen
    out = _flash_kernel()(q, k, v, cu, cu, max_len, max_len, dropout_p=dropout, softmax_scale=scaling, causal=True)
    return out.unsqueeze(0), None


def xformers_varlen_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                              sliding_window=None, oreal_varlen: VarlenMetadata | None = None, **kwargs):
    if oreal_varlen is None:
        return _fallback(module, query, key, value, attention_mask, dropout, scaling, kwargs)
    _check_packed(query, oreal_varlen, sliding_window)
    _, num_heads, num_tokens, head_dim = query.shape
    kv_heads = key.shape[1]
    group = num_heads // kv_heads
    # Query head h reads kv head h // group (transformers' repeat_kv order): [1, T, Hkv, group, D].
    q = query.transpose(1, 2).reshape(1, num_tokens, kv_heads, group, head_dim)
    k = key.transpose(1, 2)[:, :, :, None, :].expand(1, num_tokens, kv_heads, group, head_dim)
    v = value.transpose(1, 2)[:, :, :, None, :].expand(1, num_tokens, kv_heads, group, value.shape[-1])
    out = _xformers_kernel()(q, k, v, oreal_varlen.seq_lens, dropout, scaling)
    return out.reshape(1, num_tokens, num_heads, value.shape[-1]), None


ATTENTION_FUNCTIONS = {"sdpa": sdpa_varlen_attention, "flash_attn": flash_varlen_attention,
                       "xformers": xformers_varlen_attention}


# ---------------------------------------------------------------------------------------------
# Masks: transformers asks the mask function of the model's attn_implementation for the mask.


def _mask_function(backend: str) -> Callable:
    def mask(*args, **kwargs):
        meta = _PACKED.get()
        if meta is None:  # plain forward: transformers' own SDPA mask (causal, padding, packed position ids)
            from transformers.masking_utils import sdpa_mask

            return sdpa_mask(*args, **kwargs)
        return meta.sdpa_mask() if backend == "sdpa" else None

    mask.__name__ = f"{PREFIX}{backend}_mask"
    return mask


@contextlib.contextmanager
def packed_forward(meta: VarlenMetadata):
    """Marks the forward run inside it as packed, so the mask functions skip transformers' own mask."""
    token = _PACKED.set(meta)
    try:
        yield meta
    finally:
        _PACKED.reset(token)


_registered = False


def register_backends() -> None:
    """Registers `oreal_<backend>` with transformers' attention and mask interfaces (idempotent)."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    for backend, function in ATTENTION_FUNCTIONS.items():
        AttentionInterface.register(implementation_name(backend), function)
        AttentionMaskInterface.register(implementation_name(backend), _mask_function(backend))
    _registered = True
