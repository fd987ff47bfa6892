"""Liger-Kernel's fused RMSNorm, RoPE and SwiGLU for Qwen2 and Llama models, behind a switch.

Liger's kernels are Triton kernels and run on CUDA only (its RMSNorm kernel fails under Triton's
CPU interpreter), so the switch refuses other devices. Its cross-entropy patches are never
applied: the lm_head and the loss belong to `oreal.fused_oreal_loss`.

Note that Liger patches the transformers modules themselves (`modeling_qwen2.apply_rotary_pos_emb`,
`Qwen2RMSNorm`, `Qwen2MLP`), so the RoPE patch and models built later in the same process are
affected too; the instance passed in is patched in place.
"""

from __future__ import annotations

import importlib
import importlib.util

import torch

# model_type -> Liger's patch function
LIGER_PATCHES = {"qwen2": "apply_liger_kernel_to_qwen2", "llama": "apply_liger_kernel_to_llama"}


def liger_unavailable_reason(model_type: str, device: torch.device) -> str | None:
    """Why Liger cannot be applied to this model on this device, or None when it can."""
    if model_type not in LIGER_PATCHES:
        return f"Liger patches are wired for {sorted(LIGER_PATCHES)} models, not {model_type!r}"
    if importlib.util.find_spec("liger_kernel") is None:
        return "liger-kernel is not installed (pip install liger-kernel)"
    if device.type != "cuda":
        return f"Liger's Triton kernels need a CUDA device, and the model is on {device.type}"
    return None


def resolve_liger(liger: bool | str | None, model_type: str, device: torch.device) -> bool:
    """The switch: True (apply; ValueError says why it cannot), False, or "auto"/None (apply when it can on CUDA)."""
    if liger in (None, "auto"):
        return device.type == "cuda" and liger_unavailable_reason(model_type, device) is None
    if not isinstance(liger, bool):
        raise ValueError(f"liger: expected True, False or 'auto', got {liger!r}")
    if liger:
        reason = liger_unavailable_reason(model_type, device)
        if reason is not None:
            raise ValueError(f"liger: cannot apply Liger kernels: {reason}")
    return liger


def apply_liger(model) -> None:
    """Patches `model` (a loaded Qwen2/Llama causal LM) with Liger's RMSNorm, RoPE and SwiGLU."""
    model_type = model.config.model_type
    if model_type not in LIGER_PATCHES:
        raise ValueError(f"liger: no Liger patch for model type {model_type!r} (supported: {sorted(LIGER_PATCHES)})")
    patch = getattr(importlib.import_module("liger_kernel.transformers"), LIGER_PATCHES[model_type])
    patch(rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False, model=model)
    model.oreal_liger = True
