"""The FSDP2 root modules of the GRPO / PPO recipes: the policy with the clipped surrogate in its forward,
and PPO's critic.

As with OREAL's `PolicyWithLoss`, the loss runs inside the root's forward, where FSDP2 has unsharded the
lm_head weight that `oreal.fused_policy_loss` multiplies by (no `[T, V]` logits are materialised).

The critic reuses the token RM's body (`oreal.algorithms.token_rm.TokenRewardModel`: a copy of the policy whose
lm_head is dropped and replaced by a zero-initialised scalar head), read at a different position:
a value estimates the return from the state *before* an action, so `values[t]`, aligned with
`labels[t]`, is read from the hidden state at t (the one that predicts the token), where a token
score is read at t+1 (the one that has seen it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

import oreal
from oreal.data import IGNORE_INDEX, PackedBatch
from oreal.algorithms.token_rm import TokenRewardModel


@dataclass(frozen=True)
class ClipSettings:
    clip_low: float = 0.2
    clip_high: float = 0.2
    kl_coef: float = 0.0
    loss_agg: str = "token"
    temperature: float = 1.0
    backend: str = "auto"


class ClippedSurrogatePolicy(nn.Module):
    """`forward(batch, advantages=..., old_logprobs=...)` runs the causal LM to its final hidden states and
    returns `fused_policy_loss(...)` (loss, per-token log-probs and entropy, clip fraction, ratio stats)."""

    def __init__(self, lm: nn.Module, settings: ClipSettings):
        super().__init__()
        self.lm = lm
        self.settings = settings

    def forward(self, batch: PackedBatch, *, advantages: torch.Tensor, old_logprobs: torch.Tensor,
                ref_logprobs: torch.Tensor | None = None, num_tokens=None) -> oreal.PolicyLossOutput:
        from oreal.model import forward_hidden, lm_head_weight

        s = self.settings
        hidden = forward_hidden(self.lm, batch)
        return oreal.fused_policy_loss(
            hidden, lm_head_weight(self.lm), batch.labels, batch.cu_seqlens, advantages, old_logprobs, ref_logprobs,
            clip_low=s.clip_low, clip_high=s.clip_high, kl_coef=s.kl_coef, loss_agg=s.loss_agg,
            temperature=s.temperature, num_tokens=num_tokens if s.loss_agg == "token" else None, backend=s.backend)


class ValueModel(TokenRewardModel):
    """PPO's critic: `forward(batch)` returns `values [T]` fp32, V(state before the action at t), 0 off actions."""

    def forward(self, batch: PackedBatch) -> torch.Tensor:
        from oreal.model import forward_hidden

        hidden = forward_hidden(self.lm, batch)  # [T, H]
        values = self.score_head(hidden).squeeze(-1).float()
        return torch.where(batch.labels != IGNORE_INDEX, values, 0.0)
