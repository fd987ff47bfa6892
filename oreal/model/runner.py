"""The packed forward: a `PackedBatch` in, the final normed hidden states `[T, H]` out.

The lm_head is left to `oreal.fused_oreal_loss`, which never materialises `[T, V]` logits:

    hidden = forward_hidden(model, batch)                  # [T, H]
    out = fused_oreal_loss(hidden, lm_head_weight(model), batch.labels, batch.cu_seqlens,
                           batch.advantages, batch.is_positive, batch.rm_scores, batch.ref_logprobs)

The whole model's forward runs (so wrappers such as FSDP2's root hooks fire) with an empty
`logits_to_keep`, which leaves the lm_head a zero-row matmul; the backbone's output is taken
by a forward hook.
"""

from __future__ import annotations

import inspect

import torch

from oreal.data.packing import PackedBatch
from oreal.model.attention import VarlenMetadata, gather_rows, packed_forward, resolve_backend
from oreal.model.loading import attn_backend_of


def _backbone(model):
    prefix = getattr(model, "base_model_prefix", "model")
    backbone = getattr(model, prefix, None)
    if backbone is None:
        raise ValueError(f"model: {type(model).__name__} has no backbone attribute {prefix!r}; expected a "
                         "transformers *ForCausalLM")
    return backbone


def _model_device(model) -> torch.device:
    for parameter in model.parameters():
        return parameter.device
    raise ValueError("model: has no parameters")


def forward_hidden(model, batch: PackedBatch) -> torch.Tensor:
    """Final (normed) hidden states `[T, H]` of a packed micro-batch, differentiable, lm_head not applied.

    Each sequence attends only to itself, causally, with positions restarting at 0: the result
    equals running every sequence alone. A batch with `shared` runs each distinct prompt once and
    returns the same rows (`oreal.data.shared_prompts`). The model must use a packed backend
    (`load_causal_lm` or `set_attn_backend`), and the batch must be on the model's device.
    """
    if not isinstance(batch, PackedBatch):
        raise ValueError(f"batch: expected a PackedBatch, got {type(batch).__name__}")
    backend = attn_backend_of(model)
    if backend is None:
        raise ValueError(f"model: attention implementation {model.config._attn_implementation!r} does not know "
                         "packed sequence boundaries; load it with oreal.model.load_causal_lm or call "
                         "oreal.model.set_attn_backend(model)")
    device = _model_device(model)
    if batch.device != device:
        raise ValueError(f"batch: is on {batch.device}, the model on {device}; call batch.to({str(device)!r}) first")
    resolve_backend(backend, device)  # e.g. an sdpa model moved to CUDA is fine; flash on CPU is not
    shared = batch.shared
    if shared is None:
        input_ids, position_ids = batch.input_ids, batch.position_ids
        meta = VarlenMetadata(batch.cu_seqlens, batch.max_seqlen, batch.seq_lens)
    else:  # each distinct prompt once (oreal.data.shared_prompts); rows go back to the batch's layout below
        input_ids, position_ids = shared.input_ids, shared.position_ids
        meta = VarlenMetadata(shared.cu_seqlens_q, max(shared.q_lens), shared.q_lens, kv_index=shared.kv_index,
                              cu_seqlens_k=shared.cu_seqlens_k, kv_lens=shared.kv_lens)

    captured = {}

    def keep_output(module, args, output):
        captured["hidden"] = output[0] if isinstance(output, tuple) else output.last_hidden_state

    backbone = _backbone(model)
    takes_logits_to_keep = "logits_to_keep" in inspect.signature(model.forward).parameters
    with packed_forward(meta):
        if takes_logits_to_keep:
            handle = backbone.register_forward_hook(keep_output)
            try:
                model(input_ids=input_ids, position_ids=position_ids, use_cache=False,
                      logits_to_keep=torch.empty(0, dtype=torch.long, device=device), oreal_varlen=meta)
            finally:
                handle.remove()
        else:
            output = backbone(input_ids=input_ids, position_ids=position_ids, use_cache=False, oreal_varlen=meta)
            keep_output(backbone, (), output)
    hidden = captured["hidden"][0]
    return hidden if shared is None else gather_rows(hidden, 0, shared.expand_index)


def lm_head_weight(model) -> torch.Tensor:
    """The output projection `[V, H]` (the tied embedding when weights are tied), for the fused loss.

    Under FSDP2 the parameter is a sharded DTensor; it is gathered with `full_tensor()`, which is
    differentiable, so the gradient flows back to the shards.
    """
    head = model.get_output_embeddings()
    if head is None or not hasattr(head, "weight"):
        raise ValueError(f"model: {type(model).__name__} has no output embedding (lm_head)")
    weight = head.weight
    if hasattr(weight, "full_tensor"):
        weight = weight.full_tensor()
    return weight
