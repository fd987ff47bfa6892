"""The policy and the frozen reference policy as FSDP2 root modules whose forward ends in the fused loss.

FSDP2 unshards a module's parameters in its forward. The lm_head weight belongs to the root unit
(with the embeddings and the final norm), and the fused OREAL loss multiplies hidden states by it
outside any `nn.Linear` call; so the loss is computed inside the root's forward, where that weight
is whole, and its gradient flows back into the sharded parameter through FSDP2's hooks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

import oreal
from oreal.data import PackedBatch


@dataclass(frozen=True)
class LossCoefficients:
    kl_coef: float
    pos_coef: float
    neg_coef: float
    backend: str = "auto"
    temperature: float = 1.0
    importance_cap: float = 2.0  # off-policy steps: the truncation of the importance weight (oreal.ops.loss)


class PolicyWithLoss(nn.Module):
    """`forward(batch, ...)` runs the causal LM to its final hidden states and returns `fused_oreal_loss(...)`."""

    def __init__(self, lm: nn.Module, coefficients: LossCoefficients):
        super().__init__()
        self.lm = lm
        self.coefficients = coefficients

    def forward(self, batch: PackedBatch, *, rm_scores: torch.Tensor | None, ref_logprobs: torch.Tensor | None,
                pos_tokens: torch.Tensor, neg_tokens: torch.Tensor,
                behavior_logprobs: torch.Tensor | None = None) -> oreal.LossOutput:
        """`behavior_logprobs`: the sampler's log-probs when the batch is off-policy (older weights), else None."""
        from oreal.model import forward_hidden, lm_head_weight

        c = self.coefficients
        hidden = forward_hidden(self.lm, batch)
        return oreal.fused_oreal_loss(
            hidden, lm_head_weight(self.lm), batch.labels, batch.cu_seqlens, batch.advantages, batch.is_positive,
            rm_scores, ref_logprobs, kl_coef=c.kl_coef, pos_coef=c.pos_coef, neg_coef=c.neg_coef,
            temperature=c.temperature, pos_tokens=pos_tokens, neg_tokens=neg_tokens, backend=c.backend,
            behavior_logprobs=behavior_logprobs, importance_cap=c.importance_cap)


class ReferencePolicy(nn.Module):
    """The frozen initial policy: `forward(batch)` returns the log-prob of each label `[T]` (0 off actions)."""

    def __init__(self, lm: nn.Module, *, backend: str = "auto", temperature: float = 1.0):
        super().__init__()
        self.lm = lm
        self.backend, self.temperature = backend, temperature
        self.lm.requires_grad_(False)
        self.eval()

    @torch.no_grad()
    def forward(self, batch: PackedBatch) -> torch.Tensor:
        from oreal.model import forward_hidden, lm_head_weight

        hidden = forward_hidden(self.lm, batch)
        # The fused loss with zero advantages and no KL: only its (memory-bounded) log-probs are used.
        out = oreal.fused_oreal_loss(
            hidden, lm_head_weight(self.lm), batch.labels, batch.cu_seqlens, torch.zeros_like(batch.advantages),
            batch.is_positive, kl_coef=0.0, temperature=self.temperature, backend=self.backend)
        return out.logprobs
