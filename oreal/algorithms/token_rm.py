"""OREAL's token-level reward model: a copy of the policy whose lm_head is replaced by a scalar head.

It scores every response token; the mean score over a response's tokens, through a sigmoid, is
trained with binary cross-entropy to predict the response's outcome (correct / wrong). The policy
loss then weights each token by how much the running mean of these scores credits it
(`oreal.token_rm_weights`): the tokens the model blames for a wrong answer are pushed down most,
the ones it credits for a right answer are pushed up most.

The head starts as OREAL's does (`head_init="uniform"`: a fresh `nn.Linear`, U(-1/sqrt(H), 1/sqrt(H))),
so the first scores are arbitrary: the model learns its credit assignment from the outcomes, which is
why OREAL trains it alone for the first steps while the policy is frozen. `head_init="zero"` starts
every score at 0 (probability 0.5) instead; "normal" is OpenRLHF's value-head init (PPO's critic).
The draw comes from a generator seeded by `seed`, so every rank holds the same head before sharding.

Alignment: `scores[t]` belongs to the action at position t, the token `labels[t] = input_ids[t+1]`.
`reads="preceding"` (the default, as OREAL: InternLM/OREAL train_oreal.py slices the RM's outputs
`[-n-1:-1]` exactly as the policy's log-probs) reads it from the hidden state at t, the one before the
token, where the policy's logit for it is; `reads="following"` reads the state at t+1, which has seen the
token, so that a token's score depends on the token itself (an option, not the paper's recipe).

The head is `Linear(hidden, 1, bias=False)`, as OREAL's (`token_level_rm.lm_head`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from oreal.data import IGNORE_INDEX, PackedBatch


def _hidden_size(lm: nn.Module) -> int:
    config = getattr(lm, "config", None)
    size = getattr(config, "hidden_size", None)
    if size is None:
        raise ValueError(f"{type(lm).__name__}: cannot read hidden_size from its config")
    return int(size)


READS = ("preceding", "following")
HEAD_INITS = ("uniform", "zero", "normal")


class TokenRewardModel(nn.Module):
    """Per-token scores `[T]` of a packed batch, aligned with its labels (0 off action tokens)."""

    def __init__(self, lm: nn.Module, *, reads: str = "preceding", head_init: str = "uniform", seed: int = 0):
        super().__init__()
        if reads not in READS:
            raise ValueError(f"reads: {reads!r} is not one of {', '.join(READS)}")
        if head_init not in HEAD_INITS:
            raise ValueError(f"head_init: {head_init!r} is not one of {', '.join(HEAD_INITS)}")
        self.reads = reads
        # The vocabulary projection is never used: drop it (for a 7B model it is about 0.5B parameters
        # and their optimizer state). A tied lm_head shares the embedding, which the body keeps.
        if hasattr(lm, "lm_head"):
            lm.lm_head = nn.Identity()
        if hasattr(lm, "config"):
            lm.config.tie_word_embeddings = False
        self.lm = lm
        self.score_head = nn.Linear(_hidden_size(lm), 1, bias=False)
        _init_head(self.score_head.weight, head_init, seed)

    def forward(self, batch: PackedBatch) -> torch.Tensor:
        from oreal.model import forward_hidden

        hidden = forward_hidden(self.lm, batch)  # [T, H]
        raw = self.score_head(hidden).squeeze(-1).float()
        if self.reads == "preceding":
            aligned = raw  # the state at t, which predicts labels[t]
        else:
            aligned = torch.zeros_like(raw)
            aligned[:-1] = raw[1:]  # labels[t] is the token at t+1
        return torch.where(batch.labels != IGNORE_INDEX, aligned, 0.0)


@torch.no_grad()
def _init_head(weight: torch.Tensor, how: str, seed: int) -> None:
    """`uniform`: U(-1/sqrt(H), 1/sqrt(H)), the bound of torch's `nn.Linear` init (OREAL's fresh head);
    `normal`: N(0, (1/(H + 1))^2), OpenRLHF's value head; `zero`: zeros."""
    if how == "zero":
        weight.zero_()
        return
    generator = torch.Generator().manual_seed(seed)
    fan_in = weight.shape[1]
    if how == "uniform":
        bound = 1.0 / fan_in ** 0.5
        draw = torch.rand(weight.shape, generator=generator, dtype=torch.float64) * (2 * bound) - bound
    else:
        draw = torch.randn(weight.shape, generator=generator, dtype=torch.float64) / (fan_in + 1)
    weight.copy_(draw.to(weight.dtype))


def sequence_mean_scores(scores: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
    """Mean score over each sequence's action tokens, `[S]` (0 for a sequence with none)."""
    action = (batch.labels != IGNORE_INDEX).float()
    seq = torch.repeat_interleave(torch.arange(batch.num_sequences, device=scores.device),
                                  torch.as_tensor(batch.seq_lens, device=scores.device),
                                  output_size=batch.num_tokens)
    sums = torch.zeros(batch.num_sequences, device=scores.device).index_add(0, seq, scores * action)
    counts = torch.zeros(batch.num_sequences, device=scores.device).index_add(0, seq, action)
    return sums / counts.clamp(min=1)


def token_rm_loss(scores: torch.Tensor, batch: PackedBatch, num_sequences: torch.Tensor | float):
    """BCE of sigmoid(mean score) against the outcome, summed over this batch's sequences / `num_sequences`.

    `num_sequences` is the global count of trained sequences in the step (all ranks, all micro-batches),
    so that the sum of this over micro-batches and ranks is the mean over the step.
    Returns (loss, per-sequence logits `[S]` detached, mask `[S]` of real sequences with action tokens).
    """
    logits = sequence_mean_scores(scores, batch)
    targets = batch.is_positive.float()
    has_actions = torch.as_tensor([not batch.is_padding] * batch.num_sequences, device=scores.device) & \
        (torch.as_tensor(batch.seq_lens, device=scores.device) > torch.as_tensor(batch.prompt_lens, device=scores.device))
    per_seq = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    loss = torch.where(has_actions, per_seq, 0.0).sum() / num_sequences
    return loss, logits.detach(), has_actions
