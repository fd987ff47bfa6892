"""Variable-length attention backends for packed rows, plugged into transformers' `AttentionInterface`.

A packed row holds many sequences; attention must stay causal inside each and never cross a
boundary. Three backends do this from the row's sequence lengths, none of them with a `[T, T]` mask:

- `flash_attn`: `flash_attn.flash_attn_varlen_func` with int32 `cu_seqlens`; CUDA, fp16/bf16;
- `xformers`: `xformers.ops.fmha.memory_efficient_attention` on 4-D `[1, T, Hq, D]` tensors, K/V
  expanded to the query heads, with one `BlockDiagonalCausalMask` per forward; CUDA, fp16/bf16/fp32;
- `sdpa`: `torch.nn.functional.scaled_dot_product_attention(is_causal=True)` once per sequence;
  any device, any float dtype.

`auto` picks the first backend in that order that can run on the device (and, when known, in the
compute dtype). flash-attn and xformers are imported only when chosen.

Shared prompts (`oreal.data.shared_prompts`): a segment's queries may attend to more keys than
themselves (its prompt's, run once for all its answers), gathered by `VarlenMetadata.kv_index`, with
the causal mask aligned to the bottom right: flash-attn's varlen kernel with separate query and key
offsets (it aligns `causal` so), xformers' `BlockDiagonalCausalFromBottomRightMask`, and SDPA with
a boolean bottom-right causal mask per such segment.

Why the SDPA backend runs one call per sequence: a dense block-diagonal mask costs `T^2` bytes
(1 GiB at 32k tokens) and keeps SDPA off its flash kernels. FlexAttention's document mask would
be block-sparse, but in torch 2.14 it has no backward on CPU (NotImplementedError, measured), so it
could not be the tested CPU path; per-sequence SDPA is exact, uses the fused (O(L) memory) SDPA
kernels on CPU and CUDA, and costs one kernel launch per sequence and layer.

Why xformers gets 4-D tensors: its 5-D grouped-query form (`[B, M, G, H, K]` with broadcast K/V)
is supported in the forward only; the backward has no operator for it, so training would raise.
The price: with grouped-query models the K/V saved for the backward are `Hq / Hkv` times larger
than flash-attn's (which reads the kv heads directly); activation checkpointing bounds it to a layer.

Each backend is registered under a name of its own, both as an attention function and as a mask
function. transformers treats any `attn_implementation` containing "flash" as a request for its
own flash-attention loader (`is_flash_attention_requested` is a substring test) and refuses names
it does not know, so no registered name contains "flash". A model loaded with one of them works
in two modes:

- packed (inside `oreal.model.forward_hidden`): the forward passes a `VarlenMetadata` as the
  keyword `oreal_varlen`, which transformers hands down to every attention call, and the mask
  function returns no mask;
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

# The `attn_implementation` names transformers knows the backends by (see the module docstring for
# why none contains "flash").
IMPLEMENTATIONS = {"flash_attn": "oreal_fa_varlen", "xformers": "oreal_xformers_varlen", "sdpa": "oreal_sdpa_varlen"}

# Device types the optional kernels run on; tests that substitute CPU stand-ins widen this.
KERNEL_DEVICE_TYPES = {"flash_attn": ("cuda",), "xformers": ("cuda",)}
KERNEL_DTYPES = {"flash_attn": (torch.float16, torch.bfloat16),
                 "xformers": (torch.float16, torch.bfloat16, torch.float32)}
_PACKAGES = {"flash_attn": "flash_attn", "xformers": "xformers"}
_INSTALL_HINTS = {"flash_attn": "build it from source against a CUDA torch: "
                                "pip install flash-attn --no-build-isolation",
                  "xformers": "pip install xformers (a wheel matching your torch)"}

class _GatherRows(torch.autograd.Function):
    """`source.index_select(dim, index)` whose backward sums the gradients of repeated rows in fp32."""

    @staticmethod
    def forward(ctx, source, dim, index):
        ctx.dim, ctx.shape, ctx.dtype = dim, source.shape, source.dtype
        ctx.save_for_backward(index)
        return source.index_select(dim, index)

    @staticmethod
    def backward(ctx, grad):
        (index,) = ctx.saved_tensors
        summed = torch.zeros(ctx.shape, dtype=torch.float32, device=grad.device)
        return summed.index_add_(ctx.dim, index, grad.float()).to(ctx.dtype), None, None


def gather_rows(source: torch.Tensor, dim: int, index: torch.Tensor) -> torch.Tensor:
    """`source.index_select(dim, index)`, for indices that repeat rows (a shared prompt's keys, values and hidden
    states, read by every answer). Its gradient sums the repeats; in fp16/bf16 that sum is taken in fp32 and
    rounded once, as the plain layout's weight gradients (fp32-accumulated matmuls over every copy) would: on
    CUDA, `index_select`'s own backward adds the repeats one atomic half-precision add at a time."""
    if source.requires_grad and source.dtype in (torch.float16, torch.bfloat16):
        return _GatherRows.apply(source, dim, index)
    return source.index_select(dim, index)


_PACKED: contextvars.ContextVar[VarlenMetadata | None] = contextvars.ContextVar("oreal_packed", default=None)


class VarlenMetadata:
    """Sequence boundaries of one packed row, shared by every attention layer of one forward.

    `cu_seqlens [S+1]` int32, contiguous, on the row's device; `max_seqlen` and `seq_lens` are
    host-side, so no layer needs a device sync. Per-forward objects (xformers' mask) are built on
    first use and cached here, so every layer (and activation-checkpoint recomputation) reuses them.

    Shared prompts (`oreal.data.shared_prompts`): with `kv_index` (`[Tk]` int64, on the row's device),
    segment i's queries (`seq_lens[i]` rows) attend to the `kv_lens[i]` key rows `kv_index` lists for
    it, causally aligned to the bottom right (its last query sees all of them). Without it, each
    segment attends to itself (`kv_lens == seq_lens`).
    """

    def __init__(self, cu_seqlens: torch.Tensor, max_seqlen: int, seq_lens: Sequence[int], *,
                 kv_index: torch.Tensor | None = None, cu_seqlens_k: torch.Tensor | None = None,
                 kv_lens: Sequence[int] | None = None):
        self.cu_seqlens = cu_seqlens.to(torch.int32).contiguous()
        self.max_seqlen = int(max_seqlen)
        self.seq_lens = tuple(int(n) for n in seq_lens)
        self.num_tokens = sum(self.seq_lens)
        self.kv_index = kv_index
        if kv_index is None:
            self.cu_seqlens_k, self.kv_lens = self.cu_seqlens, self.seq_lens
        else:
            self.cu_seqlens_k = cu_seqlens_k.to(torch.int32).contiguous()
            self.kv_lens = tuple(int(n) for n in kv_lens)
            if len(self.kv_lens) != len(self.seq_lens) or sum(self.kv_lens) != kv_index.numel() \
                    or any(k < q for q, k in zip(self.seq_lens, self.kv_lens)):
                raise ValueError(f"shared-prompt segments: {len(self.seq_lens)} query and {len(self.kv_lens)} key "
                                 f"lengths over {kv_index.numel()} key rows; each segment needs at least as "
                                 "many keys as queries")
        self.max_seqlen_k = max(self.kv_lens, default=0)
        self._xformers_bias = None

    def gather_keys(self, states: torch.Tensor, dim: int) -> torch.Tensor:
        """Key or value rows, segment after segment: `states` itself without `kv_index`."""
        return states if self.kv_index is None else gather_rows(states, dim, self.kv_index)

    def xformers_bias(self, device: torch.device):
        """xformers' block-diagonal causal mask for this row on `device`, built once per forward
        (aligned to the bottom right of each block when keys are shared)."""
        if self._xformers_bias is None:
            bias = _xformers_fmha().attn_bias
            if self.kv_index is None:
                self._xformers_bias = bias.BlockDiagonalCausalMask.from_seqlens(list(self.seq_lens), device=device)
            else:
                self._xformers_bias = bias.BlockDiagonalCausalFromBottomRightMask.from_seqlens(
                    list(self.seq_lens), list(self.kv_lens), device=device)
        return self._xformers_bias


# ---------------------------------------------------------------------------------------------
# Availability


def _dtype_reason(backend: str, dtype: torch.dtype) -> str:
    names = ", ".join(str(d).removeprefix("torch.") for d in KERNEL_DTYPES[backend])
    return f"{backend} computes in {names} only, and the model computes in {str(dtype).removeprefix('torch.')}"


def _missing_reason(backend: str, device: torch.device, dtype: torch.dtype | None = None) -> str | None:
    """Why `backend` cannot run on `device` (in `dtype`, when given), or None when it can."""
    if backend == "sdpa":
        return None
    if device.type not in KERNEL_DEVICE_TYPES[backend]:
        return (f"{backend} runs on {' or '.join(d.upper() for d in KERNEL_DEVICE_TYPES[backend])} devices only, "
                f"and the model runs on {device.type}; use attn_backend='sdpa'")
    if dtype is not None and dtype not in KERNEL_DTYPES[backend]:
        return _dtype_reason(backend, dtype)
    if importlib.util.find_spec(_PACKAGES[backend]) is None:
        return f"{backend} is not installed ({_INSTALL_HINTS[backend]})"
    try:
        _flash_varlen_func() if backend == "flash_attn" else _xformers_fmha()
    except Exception as error:  # an installed package built against another torch fails here
        return f"{backend} is installed but cannot be imported: {type(error).__name__}: {error}"
    return None


def available_backends(device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> dict[str, str | None]:
    """Backend name -> None when it can run on `device` (in `dtype`, when given), else the reason it cannot."""
    device = torch.device(device)
    return {name: _missing_reason(name, device, dtype) for name in BACKENDS}


def resolve_backend(name: str, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> str:
    """`name` ("auto" or one of `BACKENDS`) checked against the device (and compute dtype) the forward runs on.

    "auto" is the first of `BACKENDS` that can run there; a backend asked for by name that cannot
    raises ValueError saying why.
    """
    device = torch.device(device)
    if name == "auto":
        for candidate in BACKENDS:
            if _missing_reason(candidate, device, dtype) is None:
                return candidate
    if name not in BACKENDS:
        raise ValueError(f"attn_backend: unknown attention backend {name!r}; expected 'auto' or one of {BACKENDS}")
    reason = _missing_reason(name, device, dtype)
    if reason is not None:
        raise ValueError(f"attn_backend: {name!r} is not available: {reason}")
    return name


def implementation_name(backend: str) -> str:
    """The `attn_implementation` string transformers knows the backend by."""
    return IMPLEMENTATIONS[backend]


def backend_of_implementation(implementation: str | None) -> str | None:
    """The backend behind an `attn_implementation` string, or None when it is not one of ours."""
    for backend, name in IMPLEMENTATIONS.items():
        if implementation == name:
            return backend
    return None


# ---------------------------------------------------------------------------------------------
# Kernels (imported lazily, so tests can install stand-in modules under the same names)


def _flash_varlen_func() -> Callable:
    from flash_attn import flash_attn_varlen_func

    return flash_attn_varlen_func


def _xformers_fmha():
    from xformers.ops import fmha

    return fmha


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


def _check_dtype(backend: str, query: torch.Tensor) -> None:
    if query.dtype not in KERNEL_DTYPES[backend]:
        raise ValueError(f"attn_backend {backend!r}: {_dtype_reason(backend, query.dtype)}; compute in bfloat16 "
                         "(model.param_dtype) or use attn_backend='sdpa'")


def _repeat_kv_heads(states: torch.Tensor, num_heads: int) -> torch.Tensor:
    """`[1, Hkv, T, D]` -> `[1, num_heads, T, D]`: query head h reads kv head h // (num_heads // Hkv),
    transformers' `repeat_kv` order (and flash-attn's GQA order)."""
    group = num_heads // states.shape[1]
    return states if group == 1 else states.repeat_interleave(group, dim=1)


def _fallback(module, query, key, value, attention_mask, dropout, scaling, kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  **kwargs)


def _lower_right_causal(lq: int, lk: int, device: torch.device) -> torch.Tensor:
    """`[lq, lk]` bool, True where query i may see key j: j <= i + (lk - lq)."""
    return torch.ones(lq, lk, dtype=torch.bool, device=device).tril(lk - lq)


def sdpa_per_sequence(query, key, value, seq_lens: Sequence[int], dropout: float = 0.0, scaling=None,
                      kv_lens: Sequence[int] | None = None) -> torch.Tensor:
    """Causal SDPA over each sequence of a packed row on its own: `[1, Hq, T, D]` in, `[1, T, Hq, Dv]` out.

    `kv_lens`: key/value hold, per sequence, this many rows (at least as many as its queries), and the
    causal mask is aligned to the bottom right: a boolean `[Lq, Lk]` mask per such sequence, one sequence's
    worth of memory. (`torch.nn.attention.bias.causal_lower_right` would say the same, but importing it
    imports Triton, which must not happen before a test sets TRITON_INTERPRET.)"""
    if key.shape[1] != query.shape[1] and query.device.type == "cuda" and query.dtype not in (torch.float16,
                                                                                              torch.bfloat16):
        # SDPA's memory-efficient CUDA kernel (the fused one that takes fp32) needs as many kv heads as query
        # heads; with fewer, SDPA falls back to its O(L^2)-memory math path. Expanding K/V keeps it fused.
        key, value = _repeat_kv_heads(key, query.shape[1]), _repeat_kv_heads(value, query.shape[1])
    enable_gqa = key.shape[1] != query.shape[1]
    kv_lens = seq_lens if kv_lens is None else kv_lens
    pieces = []
    for q, k, v in zip(query.split(seq_lens, dim=2), key.split(kv_lens, dim=2), value.split(kv_lens, dim=2)):
        lq, lk = q.shape[2], k.shape[2]
        causal = {"is_causal": True} if lq == lk else {"attn_mask": _lower_right_causal(lq, lk, q.device)}
        pieces.append(F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scaling, enable_gqa=enable_gqa,
                                                     **causal).transpose(1, 2))
    return torch.cat(pieces, dim=1) if len(pieces) > 1 else pieces[0].contiguous()


def sdpa_varlen_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                          sliding_window=None, oreal_varlen: VarlenMetadata | None = None, **kwargs):
    if oreal_varlen is None:
        return _fallback(module, query, key, value, attention_mask, dropout, scaling, kwargs)
    _check_packed(query, oreal_varlen, sliding_window)
    meta = oreal_varlen
    key, value = meta.gather_keys(key, 2), meta.gather_keys(value, 2)
    return sdpa_per_sequence(query, key, value, meta.seq_lens, dropout, scaling, kv_lens=meta.kv_lens), None


def flash_varlen_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                           sliding_window=None, oreal_varlen: VarlenMetadata | None = None, **kwargs):
    if oreal_varlen is None:
        return _fallback(module, query, key, value, attention_mask, dropout, scaling, kwargs)
    _check_packed(query, oreal_varlen, sliding_window)
    _check_dtype("flash_attn", query)
    # [T, H, D] views with a unit last stride, as the kernel needs; flash-attn does GQA itself.
    # With shared prompts the keys are gathered segment by segment; flash-attn aligns `causal` to the
    # bottom right when a segment has more keys than queries (flash-attn >= 2.1).
    meta = oreal_varlen
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))
    k, v = meta.gather_keys(k, 0), meta.gather_keys(v, 0)
    out = _flash_varlen_func()(q, k, v, meta.cu_seqlens, meta.cu_seqlens_k, meta.max_seqlen, meta.max_seqlen_k,
                               dropout_p=dropout, softmax_scale=scaling, causal=True)
    return out.unsqueeze(0), None


def xformers_varlen_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                              sliding_window=None, oreal_varlen: VarlenMetadata | None = None, **kwargs):
    if oreal_varlen is None:
        return _fallback(module, query, key, value, attention_mask, dropout, scaling, kwargs)
    _check_packed(query, oreal_varlen, sliding_window)
    _check_dtype("xformers", query)
    num_heads = query.shape[1]
    # BMHK [1, T, Hq, D], K/V expanded to the query heads: xformers' 5-D grouped-query form has no backward.
    q = query.transpose(1, 2)
    k = _repeat_kv_heads(oreal_varlen.gather_keys(key, 2), num_heads).transpose(1, 2)
    v = _repeat_kv_heads(oreal_varlen.gather_keys(value, 2), num_heads).transpose(1, 2)
    out = _xformers_fmha().memory_efficient_attention(q, k, v, attn_bias=oreal_varlen.xformers_bias(query.device),
                                                      p=dropout, scale=scaling)
    return out, None


ATTENTION_FUNCTIONS = {"sdpa": sdpa_varlen_attention, "flash_attn": flash_varlen_attention,
                       "xformers": xformers_varlen_attention}


# ---------------------------------------------------------------------------------------------
# Masks: transformers asks the mask function of the model's attn_implementation for the mask.


def _mask_function(backend: str) -> Callable:
    def mask(*args, **kwargs):
        if _PACKED.get() is None:  # plain forward: transformers' own SDPA mask (causal, padding, packed position ids)
            from transformers.masking_utils import sdpa_mask

            return sdpa_mask(*args, **kwargs)
        return None  # packed: the backends take the boundaries from `oreal_varlen`, no mask is built

    mask.__name__ = f"{implementation_name(backend)}_mask"
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
    """Registers every backend's implementation name with transformers' attention and mask interfaces (idempotent)."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    for backend, function in ATTENTION_FUNCTIONS.items():
        AttentionInterface.register(implementation_name(backend), function)
        AttentionMaskInterface.register(implementation_name(backend), _mask_function(backend))
    _registered = True
