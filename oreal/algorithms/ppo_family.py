"""Update-side helpers of the PPO family (PPO with a critic, GRPO with minibatch early-stop).

The policy's clipped surrogate lives in `oreal.ops.fused_policy_loss`; this module holds the small
pieces around it that never touch the vocabulary: the critic's clipped value loss, explained
variance, advantage whitening, and the minibatch early-stop decision, which every data-parallel rank
must take alike.

Statistics over a step's tokens live on several ranks and micro-batches; the `*_sums` functions return
the float64 sums they need, which a trainer adds up and all-reduces once, and the `*_from_sums`
functions turn the global sums into the statistic.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                       mask: torch.Tensor, clip: float, num_tokens=None) -> torch.Tensor:
    """PPO's clipped value loss, token mean: `0.5 * max((V - R)^2, (V_clip - R)^2)`,
    `V_clip = V_old + clamp(V - V_old, -clip, clip)`. `num_tokens`: a global token count, if given."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    per_token = 0.5 * torch.maximum((values - returns) ** 2, (clipped - returns) ** 2)
    count = mask.sum() if num_tokens is None else num_tokens
    return torch.where(mask, per_token, 0.0).sum() / torch.as_tensor(count, dtype=per_token.dtype).clamp(min=1)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`1 - Var(R - V) / Var(R)` over the masked tokens: 1 is a perfect critic, <= 0 a useless one.
    NaN-free: 0 when the returns have no variance."""
    v, r = values[mask].double(), returns[mask].double()
    if r.numel() < 2:
        return torch.zeros((), dtype=torch.float32)
    var_r = r.var()
    if var_r <= 0:
        return torch.zeros((), dtype=torch.float32)
    return (1 - (r - v).var() / var_r).float()


def should_skip_minibatch(ratio_max: torch.Tensor, bound: float | None, group=None) -> bool:
    """RLinf's minibatch early-stop: skip the minibatch if its importance ratio (on any data-parallel
    rank) exceeds `bound`. `ratio_max` is this rank's statistic: its largest ratio, or a token mean
    already reduced over the ranks (RLinf compares the mean); the MAX all-reduce gives every rank the
    same answer, so they all skip the update together and FSDP's collectives stay matched.
    `bound=None` (or 0) never skips."""
    if not bound:
        return False
    worst = ratio_max.detach().float().reshape(1).clone()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(worst, op=dist.ReduceOp.MAX, group=group)
    return bool(worst.item() > bound)


def residual_sums(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """float64 `[5]`: count, sum R, sum R^2, sum (R - V), sum (R - V)^2 over the masked tokens."""
    r = torch.where(mask, returns.double(), 0.0)
    d = torch.where(mask, returns.double() - values.double(), 0.0)
    return torch.stack([mask.sum().double(), r.sum(), (r * r).sum(), d.sum(), (d * d).sum()])


def explained_variance_from_sums(sums: torch.Tensor | list[float]) -> float:
    """`explained_variance` from (all-reduced) `residual_sums`: `1 - Var(R - V) / Var(R)`, unbiased
    variances; 0 when there are fewer than two tokens or the returns have no variance (never NaN)."""
    n, r, r2, d, d2 = (float(x) for x in sums)
    if n < 2:
        return 0.0
    var_r = (r2 - r * r / n) / (n - 1)
    if var_r <= 1e-12 * max(1.0, r2 / n):
        return 0.0
    var_d = max(0.0, (d2 - d * d / n) / (n - 1))
    return 1.0 - var_d / var_r


def moment_sums(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """float64 `[3]`: count, sum, sum of squares of `x` over the masked tokens."""
    v = torch.where(mask, x.double(), 0.0)
    return torch.stack([mask.sum().double(), v.sum(), (v * v).sum()])


def whiten(x: torch.Tensor, mask: torch.Tensor, sums: torch.Tensor | list[float], eps: float = 1e-8) -> torch.Tensor:
    """`(x - mean) / (std + eps)` on the masked tokens (0 elsewhere), mean and unbiased std from the
    (all-reduced) `moment_sums` of every rank: PPO's advantage normalisation over the whole step."""
    n, total, squares = (float(v) for v in sums)
    if n < 1:
        return torch.zeros_like(x)
    mean = total / n
    var = max(0.0, (squares - total * total / n) / max(n - 1, 1.0))
    return torch.where(mask, (x - mean) / (var ** 0.5 + eps), 0.0).to(x.dtype)


def token_moment_sums(values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """float64 `[3]`: token count, sum and sum of squares of per-sequence `values [S]` repeated over each
    sequence's `lengths [S]` response tokens (a per-sequence advantage counts once per token, as RLinf's masked
    statistics over `[S, response_len]` count it)."""
    v, n = values.double(), lengths.double()
    return torch.stack([n.sum(), (n * v).sum(), (n * v * v).sum()])


def whiten_from_sums(values: torch.Tensor, sums, *, unbiased: bool, eps: float = 1e-5) -> torch.Tensor:
    """RLinf's `masked_normalization` (rlinf/utils/distributed.py) from global `token_moment_sums`:
    `(x - mean) / (std + eps)`, std biased or unbiased (`var * n / (n - 1)`), float64 throughout."""
    n, total, squares = (float(x) for x in sums)
    if n < 1:
        return torch.zeros_like(values, dtype=torch.float64)
    mean = total / n
    var = max(0.0, squares / n - mean * mean)
    if unbiased and n > 1:
        var *= n / (n - 1)
    return (values.double() - mean) / (var ** 0.5 + eps)
