"""The transformers engine's sampling loop: a step's prompts in one prefill, every sample decoded in place.

`model.generate` spends most of a small model's decode step outside the model's arithmetic (measured on
the demo's 0.7M-parameter Qwen2, 128 rows x 48 new tokens, 2 CPU threads: 0.80 s against 0.42 s here):
- it prefills every one of a prompt's n samples (n copies of the same prompt forward pass); here a
  prompt is prefilled once and its keys and values are repeated n times;
- its cache grows by concatenation, copying every layer's whole cache at every token (on this
  machine's memory, 70% of the loop under a profiler); here each layer's keys and values live in
  buffers sized for the whole request (`preallocated_layer`) and a step writes one column;
- every step re-builds a 4-D padding mask and runs SDPA's kernel for one query position; here a step's
  attention is two small matmuls against the cache with a fixed per-row key bias (-inf at the prompt's
  left padding), `decode_attention`;
- rows that finished keep being computed until every row is done; here the batch is compacted
  whenever a quarter of it has finished.

The sampled distribution is transformers' (temperature, then top-k, then top-p, `processed_logprobs`),
and every token's log-probability is read from it. Sampling draws one uniform number per row and inverts
the cumulative distribution (exact, and one random number instead of one per vocabulary entry).

Only models whose cache is made of plain `DynamicLayer`s (full attention in every layer) and whose
attention goes through transformers' attention interface take this path (`fast_decode_unsupported`);
the others use `model.generate`.
"""

from __future__ import annotations

import contextvars
import inspect
from collections.abc import Sequence
from dataclasses import dataclass

import torch

DECODE_ATTENTION = "oreal_decode"
# Per-row additive key bias of the decode steps running in this context ([rows, capacity]: 0 or -inf);
# None outside them (prefill and any other forward use transformers' own mask and SDPA).
_KEY_BIAS: contextvars.ContextVar[torch.Tensor | None] = contextvars.ContextVar("oreal_decode_bias", default=None)
# Compact the batch once this share of its rows has finished.
COMPACT_WHEN_FINISHED = 0.25


def decode_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """One query position against the cache: `softmax(q k^T * scale + bias) v`, grouped-query heads read their
    shared kv head without copying it. Any other call (the prefill) is transformers' SDPA."""
    bias = _KEY_BIAS.get()
    if bias is None or query.shape[2] != 1:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    rows, heads, _, dim = query.shape
    kv_heads, length = key.shape[1], key.shape[2]
    scale = scaling if scaling is not None else dim ** -0.5
    grouped = query.view(rows, kv_heads, heads // kv_heads, dim)
    scores = torch.matmul(grouped, key.transpose(-1, -2)).mul_(scale)
    scores.add_(bias[:, None, None, :length])
    out = torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32).to(value.dtype), value)
    return out.view(rows, heads, 1, dim).transpose(1, 2), None


def _decode_mask(*args, **kwargs):
    """The mask function of `DECODE_ATTENTION`: none during decode steps (the key bias replaces it), transformers'
    SDPA mask otherwise."""
    if _KEY_BIAS.get() is not None:
        return None
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(*args, **kwargs)


_registered = False


def register_decode_attention() -> None:
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(DECODE_ATTENTION, decode_attention)
    AttentionMaskInterface.register(DECODE_ATTENTION, _decode_mask)
    _registered = True


def fast_decode_unsupported(model) -> str | None:
    """Why `model` cannot take this loop (None: it can): a cache layer other than full attention, or an attention
    implementation that is not transformers' SDPA or eager."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    config = model.config
    kinds = {type(layer) for layer in DynamicCache(config=config).layers}
    if not kinds or kinds != {DynamicLayer}:
        return f"its cache layers are {sorted(k.__name__ for k in kinds) or 'not known'}, not full attention"
    implementation = getattr(config, "_attn_implementation", None)
    if implementation not in ("sdpa", "eager", DECODE_ATTENTION):
        return f"its attention implementation is {implementation!r}"
    return None


def use_decode_attention(model) -> None:
    """Route `model`'s attention through `decode_attention` (its prefill still runs transformers' SDPA)."""
    register_decode_attention()
    model.set_attn_implementation(DECODE_ATTENTION)


def preallocated_layer(keys: torch.Tensor, values: torch.Tensor, filled: int):
    """One layer's keys and values in buffers of `capacity` positions (their dim 2), `filled` of them in use:
    `update` writes the new positions in place and returns views of the filled part; `keep_rows` drops
    finished rows. A transformers `DynamicLayer` to the model and its mask code (defined on first use:
    importing this module does not import transformers)."""
    global _PreallocatedLayer
    if _PreallocatedLayer is None:
        from transformers.cache_utils import DynamicLayer

        class PreallocatedLayer(DynamicLayer):
            def __init__(self, keys, values, filled):
                super().__init__()
                self.key_buffer, self.value_buffer, self.filled = keys, values, filled
                self.device, self.is_initialized = keys.device, True
                self._expose()

            def _expose(self) -> None:
                self.keys = self.key_buffer[:, :, :self.filled]
                self.values = self.value_buffer[:, :, :self.filled]

            def update(self, key_states, value_states, *args, **kwargs):
                end = self.filled + key_states.shape[2]
                if end > self.key_buffer.shape[2]:
                    raise RuntimeError(f"decode cache overflow: {end} positions > {self.key_buffer.shape[2]}")
                self.key_buffer[:, :, self.filled:end] = key_states
                self.value_buffer[:, :, self.filled:end] = value_states
                self.filled = end
                self._expose()
                return self.keys, self.values

            def keep_rows(self, rows: torch.Tensor) -> None:
                self.key_buffer = self.key_buffer.index_select(0, rows)
                self.value_buffer = self.value_buffer.index_select(0, rows)
                self._expose()

        _PreallocatedLayer = PreallocatedLayer
    return _PreallocatedLayer(keys, values, filled)


_PreallocatedLayer = None


def processed_logprobs(logits: torch.Tensor, *, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Log-probabilities of the distribution the sampler draws from, as transformers builds it: logits / temperature,
    then top-k (ties at the k-th value kept), then top-p (the smallest top set whose mass reaches top_p; the most
    likely token always stays). Filtered entries are -inf. `temperature` 0: the raw distribution (greedy)."""
    scores = logits.float()
    if temperature > 0:
        scores = scores / temperature
        if 0 < top_k < scores.shape[-1]:
            kth = torch.topk(scores, top_k, dim=-1).values[..., -1:]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if top_p < 1.0:
            ordered, order = torch.sort(scores, dim=-1)
            remove = ordered.softmax(-1).cumsum(-1) <= 1 - top_p
            remove[..., -1] = False
            scores = scores.masked_fill(remove.scatter(-1, order, remove), float("-inf"))
    return torch.log_softmax(scores, dim=-1)


def sample_rows(logprobs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row, drawn from `exp(logprobs)` by inverting its cumulative distribution with one uniform draw
    in (0, 1] per row (never a zero-probability token: the first index whose cumulative mass reaches the draw)."""
    cdf = logprobs.exp().cumsum(-1)
    draw = 1.0 - torch.rand(logprobs.shape[0], 1, generator=generator, device=logprobs.device, dtype=cdf.dtype)
    picked = torch.searchsorted(cdf, draw * cdf[:, -1:])
    return picked.clamp_(max=logprobs.shape[-1] - 1).squeeze(1)


@dataclass
class DecodedRow:
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str  # "stop" (the last token is a stop token) or "length"


def _cache_argument(model) -> str:
    """The forward's name for the cache: `cache` in newer transformers, `past_key_values` before."""
    names = inspect.signature(model.forward).parameters
    return "cache" if "cache" in names else "past_key_values"


@torch.no_grad()
def decode(model, prompts: Sequence[Sequence[int]], samples_per_prompt: int, *, max_new_tokens: int,
           temperature: float, top_k: int = 0, top_p: float = 1.0, stop_ids: Sequence[int] = (), pad_id: int = 0,
           generator: torch.Generator | None = None) -> list[DecodedRow]:
    """`samples_per_prompt` continuations of every prompt, prompt-major (prompt 0's samples first). Temperature 0
    is greedy (argmax). The model must have been prepared by `use_decode_attention`."""
    from transformers import DynamicCache

    device = next(model.parameters()).device
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    width, count = int(lengths.max()), len(prompts)
    ids = torch.full((count, width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((count, width), dtype=torch.long, device=device)
    for row, p in enumerate(prompts):  # left padding: every row's last prompt token is at width - 1
        ids[row, width - len(p):] = torch.as_tensor(list(p), dtype=torch.long, device=device)
        mask[row, width - len(p):] = 1
    cache_arg = _cache_argument(model)
    cache = DynamicCache(config=model.config)
    out = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp_(min=0),
                use_cache=True, logits_to_keep=1, **{cache_arg: cache})

    # Every prompt's keys and values repeated for its samples, in buffers with room for the new tokens.
    per = samples_per_prompt
    rows = count * per
    padding = (mask == 0).repeat_interleave(per, 0)
    capacity = width + max_new_tokens
    for i, layer in enumerate(cache.layers):
        buffers = []
        for states in (layer.keys, layer.values):
            buffer = states.new_empty((rows, states.shape[1], capacity, states.shape[3]))
            buffer[:, :, :width] = states.repeat_interleave(per, 0)
            buffer[:, :, :width].masked_fill_(padding[:, None, :, None], 0)  # no NaN from a padded row can leak
            buffers.append(buffer)
        cache.layers[i] = preallocated_layer(*buffers, width)
    bias = torch.zeros((rows, capacity), dtype=torch.float32, device=device)
    bias[:, :width].masked_fill_(padding, float("-inf"))
    logits = out.logits[:, -1].repeat_interleave(per, 0)
    position = lengths.repeat_interleave(per, 0)  # of the next token fed

    stop = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)
    tokens = torch.full((rows, max_new_tokens), pad_id, dtype=torch.long, device=device)
    token_lp = torch.zeros((rows, max_new_tokens), dtype=torch.float32, device=device)
    produced = torch.zeros(rows, dtype=torch.long, device=device)
    stopped = torch.zeros(rows, dtype=torch.bool, device=device)
    active = torch.arange(rows, device=device)  # original row of each batch row
    live = torch.ones(rows, dtype=torch.bool, device=device)  # batch rows that have not finished
    for step in range(max_new_tokens):
        logprobs = processed_logprobs(logits, temperature=temperature, top_k=top_k, top_p=top_p)
        picked = logprobs.argmax(-1) if temperature == 0 else sample_rows(logprobs, generator)
        writing = active[live]
        tokens[writing, step] = picked[live]
        token_lp[writing, step] = logprobs.gather(-1, picked[:, None])[live, 0]
        produced[writing] = step + 1
        if stop.numel():
            done = torch.isin(picked, stop) & live
            stopped[active[done]] = True
            live &= ~done
        if step + 1 == max_new_tokens or not bool(live.any()):
            break
        if int((~live).sum()) >= COMPACT_WHEN_FINISHED * live.numel():  # finished rows stop costing compute
            keep = live.nonzero().squeeze(1)
            active, picked, position, bias = active[keep], picked[keep], position[keep], bias.index_select(0, keep)
            live = live[keep]
            for layer in cache.layers:
                layer.keep_rows(keep)
        token = _KEY_BIAS.set(bias)
        try:
            out = model(input_ids=picked[:, None], position_ids=position[:, None], use_cache=True,
                        **{cache_arg: cache})
        finally:
            _KEY_BIAS.reset(token)
        logits = out.logits[:, -1]
        position = position + 1
    counts, ids_out, lps_out, stops = produced.tolist(), tokens.tolist(), token_lp.tolist(), stopped.tolist()
    return [DecodedRow(ids_out[r][:counts[r]], lps_out[r][:counts[r]], "stop" if stops[r] else "length")
            for r in range(rows)]
