"""The FSDP2 root modules of the GRPO / PPO recipes: the policy with the clipped surrogate in its forward,
and PPO's critic.

As with OREAL's `PolicyWithLoss`, the loss runs inside the root's forward, where FSDP2 has unsharded the
lm_head weight that `oreal.fused_policy_loss` multiplies by (no `[T, V]` logits are materialised).

The critic reuses the token RM's body (`oreal.algorithms.token_rm.TokenRewardModel`: a copy of the policy whose
lm_head is dropped and replaced by a scalar head without bias, as OpenRLHF's value head, zero- or
normal-initialised): a value estimates the return from the state *before* an action, so `values[t]`, aligned with
`labels[t]`, is always read from the hidden state at t (the one that predicts the token), whatever
position the token RM is set to read.
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

    def forward(self, batch: PackedBatch, *, advantages: torch.Tensor, old_logprobs: torch.Tensor | None,
                ref_logprobs: torch.Tensor | None = None, num_tokens=None) -> oreal.PolicyLossOutput:
        """`old_logprobs=None`: the update is exactly on-policy, and the behaviour log-probs are this forward's
        own, detached: the ratio is exactly 1 in value and its gradient is the policy gradient. They come from
        the loss's own log-prob pass over the lm_head without gradient (the same kernel on the same inputs gives
        them bit for bit), which replaces a whole no-grad forward of the model."""
        from oreal.model import forward_hidden, lm_head_weight

        hidden = forward_hidden(self.lm, batch)
        weight = lm_head_weight(self.lm)
        if old_logprobs is None:
            with torch.no_grad():
                placeholder = torch.zeros(batch.num_tokens, dtype=torch.float32, device=hidden.device)
                old_logprobs = self._loss(hidden.detach(), weight.detach(), batch, advantages, placeholder, None,
                                          num_tokens).logprobs
        return self._loss(hidden, weight, batch, advantages, old_logprobs, ref_logprobs, num_tokens)

    def _loss(self, hidden, weight, batch, advantages, old_logprobs, ref_logprobs, num_tokens):
        s = self.settings
        # "step_token" is the kernel's token aggregation over a larger count (the caller's `num_tokens`)
        agg = "token" if s.loss_agg == "step_token" else s.loss_agg
        return oreal.fused_policy_loss(
            hidden, weight, batch.labels, batch.cu_seqlens, advantages, old_logprobs, ref_logprobs,
            clip_low=s.clip_low, clip_high=s.clip_high, kl_coef=s.kl_coef, loss_agg=agg,
            temperature=s.temperature, num_tokens=num_tokens if agg == "token" else None, backend=s.backend)


class ValueModel(TokenRewardModel):
    """PPO's critic: `forward(batch)` returns `values [T]` fp32, V(state before the action at t), 0 off actions.

    `head_init`: "zero" (every value starts at 0) or "normal": N(0, std 1 / (hidden + 1)), as OpenRLHF
    initialises a critic's value head from a base model (openrlhf/models/model.py, `init_value_head`), drawn
    from a generator seeded by `seed` so that every rank holds the same head before sharding."""

    def __init__(self, lm: nn.Module, *, head_init: str = "zero", seed: int = 0):
        if head_init not in ("zero", "normal"):
            raise ValueError(f"head_init: {head_init!r} is not one of zero, normal")
        super().__init__(lm, head_init=head_init, seed=seed)

    def forward(self, batch: PackedBatch) -> torch.Tensor:
        from oreal.model import forward_hidden

        hidden = forward_hidden(self.lm, batch)  # [T, H]
        values = self.score_head(hidden).squeeze(-1).float()
        return torch.where(batch.labels != IGNORE_INDEX, values, 0.0)
