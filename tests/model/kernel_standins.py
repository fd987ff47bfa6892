"""CPU stand-ins for the `flash_attn` and `xformers` packages, installed under their real module names.

Each stand-in computes attention with plain torch (in float64, cast back to the input dtype), but
first enforces the call contract the real library enforces, so that a wrong call fails here the
way it would fail on a GPU. The contracts, as read from the libraries' sources:

flash-attn 2 (`flash_attn/flash_attn_interface.py`, `csrc/flash_attn/flash_api.cpp` `mha_varlen_fwd`):
  `flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
  dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
  alibi_slopes=None, deterministic=False, return_attn_probs=False, block_table=None)`;
  q `[total_q, H, D]`, k `[total_k, Hk, D]`, v `[total_k, Hk, Dv]`, H divisible by Hk (query heads
  `g*(H/Hk) .. (g+1)*(H/Hk)-1` read kv head g); fp16 or bf16 only, k and v of q's dtype; head dim
  <= 256; last dimension contiguous (checked by the C++ side; the Python wrapper would silently copy,
  which we do not want to rely on); cu_seqlens int32, contiguous, on q's device, `[batch + 1]`
  with batch > 0; max_seqlen plain ints; `causal` aligned to the bottom-right corner; output
  `[total_q, H, Dv]` in q's dtype; forward and backward supported.

xformers 0.0.35 (`xformers/ops/fmha/__init__.py`, `common.py` `Inputs.validate_inputs`,
`flash.py` / `cutlass.py` operator flags, `attn_bias.py`):
  `memory_efficient_attention(query, key, value, attn_bias=None, p=0.0, scale=None, *, op=None,
  output_dtype=None)`; query/key/value all `[B, M, H, K]` (BMHK) or all `[B, M, G, H, K]` (BMGHK),
  shapes equal except M (no broadcasting: the caller expands); same device, same dtype, one of
  fp16/bf16/fp32 (no operator for others); last-dimension stride 1; a `BlockDiagonalCausalMask`
  needs B == 1 and its sequence starts on the query's device (it defaults to CUDA when one exists);
  the BMGHK (5-D) layout is supported by the forward operators only: no backward operator accepts
  it, so the backward raises NotImplementedError. `BlockDiagonalCausalMask.from_seqlens(q_seqlen,
  kv_seqlen=None, *, device=None)`; each block is causal (top-left aligned, equal q/k lengths).
  `BlockDiagonalCausalFromBottomRightMask.from_seqlens(q_seqlen, kv_seqlen, *, device=None)`: blocks of
  their own query and key lengths, causal aligned to the bottom right, which needs at least as many
  keys as queries in every block (a query would otherwise see no key; xformers raises ValueError).

What the stand-ins do not model (they raise NotImplementedError rather than guess): dropout,
sliding windows, softcap, ALiBi, paged KV, and attention biases other than the block-diagonal
causal mask.
"""

from __future__ import annotations

import importlib.machinery
import sys
import types
from itertools import pairwise

import torch

FLASH_DTYPES = (torch.float16, torch.bfloat16)
XFORMERS_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _causal_attention(q, k, v, scale):
    """One sequence, float64: q `[Lq, H, D]`, k/v `[Lk, H, D]` -> `[Lq, H, Dv]`, causal bottom-right aligned."""
    q64, k64, v64 = (x.to(torch.float64) for x in (q, k, v))
    scores = torch.einsum("qhd,khd->hqk", q64, k64) * scale
    lq, lk = q.shape[0], k.shape[0]
    allowed = torch.arange(lk)[None, :] <= torch.arange(lq)[:, None] + (lk - lq)
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v64)


# ---------------------------------------------------------------------------------------------
# flash_attn


class FlashAttnStandIn:
    """State of the installed `flash_attn` stand-in: the calls it received."""

    def __init__(self):
        self.calls: list[dict] = []

    def flash_attn_varlen_func(self, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                               softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                               deterministic=False, return_attn_probs=False, block_table=None):
        if dropout_p != 0.0 or tuple(window_size) != (-1, -1) or softcap != 0.0 or alibi_slopes is not None \
                or return_attn_probs or block_table is not None:
            raise NotImplementedError("flash_attn stand-in: only dropout_p=0, no window, softcap, alibi, "
                                      "attention probabilities or block table")
        if any(not isinstance(x, torch.Tensor) or x.dim() != 3 for x in (q, k, v)):
            raise RuntimeError("flash_attn: q, k, v must be 3-D [total, heads, head_dim] tensors")
        if q.dtype not in FLASH_DTYPES:
            raise RuntimeError("FlashAttention only support fp16 and bf16 data type")
        if k.dtype != q.dtype or v.dtype != q.dtype:
            raise RuntimeError("query and key/value must have the same dtype")
        for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
            if cu.dtype != torch.int32:
                raise RuntimeError(f"{name} must have dtype int32")
            if cu.device != q.device:
                raise RuntimeError(f"{name} must be on the device of q")
            if not cu.is_contiguous() or cu.dim() != 1:
                raise RuntimeError(f"{name} must be a contiguous 1-D tensor")
        if any(x.device != q.device for x in (k, v)):
            raise RuntimeError("q, k, v must be on the same device")
        if any(x.stride(-1) != 1 for x in (q, k, v)):
            raise RuntimeError("Input tensor must have contiguous last dimension")
        batch = cu_seqlens_q.numel() - 1
        if batch <= 0 or cu_seqlens_k.numel() != batch + 1:
            raise RuntimeError("batch size must be positive and cu_seqlens_q, cu_seqlens_k of shape [batch + 1]")
        total_q, heads, head_dim = q.shape
        total_k, kv_heads = k.shape[:2]
        if head_dim > 256 or v.shape[-1] > 256:
            raise RuntimeError("FlashAttention forward only supports head dimension at most 256")
        if heads % kv_heads != 0:
            raise RuntimeError("Number of heads in key/value must divide number of heads in query")
        if k.shape != (total_k, kv_heads, head_dim) or v.shape[:2] != (total_k, kv_heads):
            raise RuntimeError(f"k, v shapes {tuple(k.shape)}, {tuple(v.shape)} do not match q {tuple(q.shape)}")
        if not all(isinstance(n, int) and not isinstance(n, bool) for n in (max_seqlen_q, max_seqlen_k)):
            raise TypeError("max_seqlen_q and max_seqlen_k must be Python ints")
        starts_q, starts_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
        for starts, total, longest, name in ((starts_q, total_q, max_seqlen_q, "q"),
                                             (starts_k, total_k, max_seqlen_k, "k")):
            lengths = [b - a for a, b in pairwise(starts)]
            if starts[0] != 0 or starts[-1] != total or min(lengths) < 0:
                raise RuntimeError(f"cu_seqlens_{name} {starts} does not index [0, {total}) in order")
            if max(lengths) > longest:  # the kernel sizes its grid from max_seqlen: a short one drops rows
                raise RuntimeError(f"max_seqlen_{name}={longest} < the longest sequence ({max(lengths)})")
        self.calls.append({"shape": tuple(q.shape), "kv_heads": kv_heads, "dtype": q.dtype, "causal": causal,
                           "requires_grad": q.requires_grad})

        scale = head_dim ** -0.5 if softmax_scale is None else softmax_scale
        group = heads // kv_heads
        out = []
        for (qa, qb), (ka, kb) in zip(pairwise(starts_q), pairwise(starts_k)):
            ks, vs = (x[ka:kb].repeat_interleave(group, dim=1) for x in (k, v))
            if causal:
                out.append(_causal_attention(q[qa:qb], ks, vs, scale))
            else:
                scores = torch.einsum("qhd,khd->hqk", q[qa:qb].double(), ks.double()) * scale
                out.append(torch.einsum("hqk,khd->qhd", scores.softmax(-1), vs.double()))
        return torch.cat(out).to(q.dtype)

    def module(self) -> types.ModuleType:
        module = types.ModuleType("flash_attn")
        module.__spec__ = importlib.machinery.ModuleSpec("flash_attn", None)
        module.__version__ = "2.8.3+standin"
        module.flash_attn_varlen_func = self.flash_attn_varlen_func
        return module


# ---------------------------------------------------------------------------------------------
# xformers


class XformersStandIn:
    """State of the installed `xformers` stand-in: the calls it received and the masks built."""

    def __init__(self):
        self.calls: list[dict] = []
        self.masks_built = 0
        self.backward_5d_raised = 0
        standin = self

        def starts_of(lengths):
            starts = [0]
            for n in lengths:
                starts.append(starts[-1] + int(n))
            return starts

        class BlockDiagonalCausalMask:
            def __init__(self, seqstart_py: list[int], device: torch.device, kv_seqstart_py: list[int] | None = None):
                self.seqstart_py = seqstart_py
                self.seqstart = torch.tensor(seqstart_py, dtype=torch.int32, device=device)
                self.kv_seqstart_py = seqstart_py if kv_seqstart_py is None else kv_seqstart_py

            @classmethod
            def from_seqlens(cls, q_seqlen, kv_seqlen=None, *, device=None):
                if kv_seqlen is not None and list(kv_seqlen) != list(q_seqlen):
                    raise NotImplementedError("xformers stand-in: only equal query and key lengths")
                if device is None:  # xformers' default bias device
                    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
                standin.masks_built += 1
                return cls(starts_of(q_seqlen), torch.device(device))

        class BlockDiagonalCausalFromBottomRightMask(BlockDiagonalCausalMask):
            @classmethod
            def from_seqlens(cls, q_seqlen, kv_seqlen, *, device=None):
                if len(q_seqlen) != len(kv_seqlen):
                    raise ValueError("q_seqlen and kv_seqlen must have the same number of blocks")
                for q, k in zip(q_seqlen, kv_seqlen):
                    if q > k:
                        raise ValueError(f"Query sequence length ({q}) is larger than the key sequence length ({k})")
                if device is None:
                    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
                standin.masks_built += 1
                return cls(starts_of(q_seqlen), torch.device(device), starts_of(kv_seqlen))

        self.BlockDiagonalCausalMask = BlockDiagonalCausalMask
        self.BlockDiagonalCausalFromBottomRightMask = BlockDiagonalCausalFromBottomRightMask

    def memory_efficient_attention(self, query, key, value, attn_bias=None, p=0.0, scale=None, *, op=None,
                                   output_dtype=None):
        if p != 0.0 or op is not None or output_dtype is not None:
            raise NotImplementedError("xformers stand-in: only p=0, no op, no output_dtype")
        if not isinstance(attn_bias, self.BlockDiagonalCausalMask):
            raise NotImplementedError("xformers stand-in: only a BlockDiagonalCausalMask or "
                                      "BlockDiagonalCausalFromBottomRightMask bias")
        qkv = (query, key, value)
        if query.dim() not in (4, 5) or any(x.dim() != query.dim() for x in qkv):
            raise ValueError(f"Query/Key/Value should all have BMGHK or BMHK shape: "
                             f"{[tuple(x.shape) for x in qkv]}")
        if any(x.device != query.device for x in qkv):
            raise ValueError("Query/Key/Value should all be on the same device")
        if attn_bias.seqstart.device != query.device:
            raise ValueError(f"Attention bias and Query/Key/Value should be on the same device: query on "
                             f"{query.device}, attn_bias on {attn_bias.seqstart.device}")
        if any(x.dtype != query.dtype for x in qkv):
            raise ValueError("Query/Key/Value should all have the same dtype")
        if query.dtype not in XFORMERS_DTYPES:
            raise NotImplementedError(f"No operator found for `memory_efficient_attention_forward`: "
                                      f"dtype={query.dtype}")
        if any(x.shape[0] != 1 for x in qkv):
            raise ValueError("Expected batch_size=1 when using block-diagonal bias")
        if key.shape[:-1] != query.shape[:1] + key.shape[1:2] + query.shape[2:-1] or key.shape[-1] != query.shape[-1] \
                or value.shape[:-1] != key.shape[:-1]:
            raise ValueError(f"Incompatible shapes for attention inputs: query {tuple(query.shape)}, key "
                             f"{tuple(key.shape)}, value {tuple(value.shape)}. HINT: We don't support broadcasting, "
                             "please use `expand` yourself")
        if any(x.stride(-1) != 1 for x in qkv):
            raise ValueError("the last dimension of query/key/value must be contiguous (stride 1)")
        if attn_bias.seqstart_py[-1] != query.shape[1] or attn_bias.kv_seqstart_py[-1] != key.shape[1]:
            raise ValueError(f"attn_bias covers {attn_bias.seqstart_py[-1]} query and {attn_bias.kv_seqstart_py[-1]} "
                             f"key positions, the inputs {query.shape[1]} and {key.shape[1]}")
        self.calls.append({"shape": tuple(query.shape), "key_shape": tuple(key.shape), "dtype": query.dtype,
                           "requires_grad": any(x.requires_grad for x in qkv)})

        five_d = query.dim() == 5
        flat = [x.flatten(2, 3) if five_d else x for x in qkv]  # [1, M, heads, K]
        head_dim = query.shape[-1]
        scale = head_dim ** -0.5 if scale is None else scale
        pieces = [_causal_attention(flat[0][0, qa:qb], flat[1][0, ka:kb], flat[2][0, ka:kb], scale)
                  for (qa, qb), (ka, kb) in zip(pairwise(attn_bias.seqstart_py), pairwise(attn_bias.kv_seqstart_py))]
        out = torch.cat(pieces)[None].to(query.dtype).reshape(*query.shape[:-1], value.shape[-1])
        if five_d and out.requires_grad:
            def no_backward(grad):
                self.backward_5d_raised += 1
                raise NotImplementedError("No operator found for `memory_efficient_attention_backward`: "
                                          "operator does not support BMGHK format")

            out.register_hook(no_backward)
        return out

    def modules(self) -> dict[str, types.ModuleType]:
        names = ("xformers", "xformers.ops", "xformers.ops.fmha", "xformers.ops.fmha.attn_bias")
        modules = {}
        for name in names:
            modules[name] = types.ModuleType(name)
            modules[name].__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
        modules["xformers"].__version__ = "0.0.35+standin"
        modules["xformers.ops.fmha.attn_bias"].BlockDiagonalCausalMask = self.BlockDiagonalCausalMask
        modules["xformers.ops.fmha.attn_bias"].BlockDiagonalCausalFromBottomRightMask = \
            self.BlockDiagonalCausalFromBottomRightMask
        modules["xformers.ops.fmha"].attn_bias = modules["xformers.ops.fmha.attn_bias"]
        modules["xformers.ops.fmha"].memory_efficient_attention = self.memory_efficient_attention
        modules["xformers.ops"].fmha = modules["xformers.ops.fmha"]
        modules["xformers.ops"].memory_efficient_attention = self.memory_efficient_attention
        modules["xformers"].ops = modules["xformers.ops"]
        return modules


def install(monkeypatch, *, devices=("cuda", "cpu")):
    """Installs both stand-ins into `sys.modules` (undone by `monkeypatch`) and lets the backends run on
    `devices`; returns `(flash, xformers)` stand-in states."""
    from oreal.model import attention

    flash, xformers = FlashAttnStandIn(), XformersStandIn()
    monkeypatch.setitem(sys.modules, "flash_attn", flash.module())
    for name, module in xformers.modules().items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(attention, "KERNEL_DEVICE_TYPES", {"flash_attn": devices, "xformers": devices})
    return flash, xformers
