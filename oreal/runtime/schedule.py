"""Learning-rate schedules: linear warm-up, then cosine decay to a floor.

    lr(s) = lr_max * (s + 1) / warmup                                   for s < warmup
    lr(s) = floor + (lr_max - floor) * (1 + cos(pi * p)) / 2,  p = (s - warmup) / (total - warmup)

`s` counts the schedule's ticks (0 for the first update): training steps, or optimizer updates
(`OptimConfig.schedule_unit`). With `from_zero` the warm-up is transformers' (`s / warmup`: the first
update runs at lr 0), as OpenRLHF's `cosine_with_min_lr` that SimpleRL-Zero uses.

OREAL (InternLM/OREAL, train_oreal.py, "Optimizer & Scheduler"): a `LambdaLR` warm-up `x / warmup`
stepped before each step's update (so step s runs at `(s + 1) / warmup`), then `CosineAnnealingLR`
with `T_max = total - warmup` from step `warmup + 1` on, both stepped every step, the 10 frozen ones
included; that is this formula with `s` = the step index from 0. The schedule is a `LambdaLR` over a
picklable callable, so its state goes into checkpoints like any scheduler's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class WarmupCosine:
    """The multiplier of the base lr at tick `s` (what `LambdaLR` calls)."""

    warmup_steps: int
    total_steps: int
    floor_ratio: float  # min_lr / lr
    from_zero: bool = False  # warm-up s / warmup (transformers) instead of (s + 1) / warmup

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step if self.from_zero else step + 1) / self.warmup_steps
        decay_steps = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / decay_steps)
        return self.floor_ratio + (1.0 - self.floor_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_length(warmup_steps: int, warmup_ratio: float, total_steps: int) -> int:
    """`warmup_steps`, or `ceil(warmup_ratio * total_steps)` when a ratio is given (OpenRLHF's 3%)."""
    return math.ceil(warmup_ratio * total_steps) if warmup_ratio > 0 else warmup_steps


def warmup_cosine(optimizer: torch.optim.Optimizer, *, lr: float, min_lr: float, warmup_steps: int,
                  total_steps: int, from_zero: bool = False) -> torch.optim.lr_scheduler.LambdaLR:
    """A scheduler for `optimizer` (whose groups hold `lr`), stepped once per tick."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, WarmupCosine(warmup_steps, total_steps, min_lr / lr if lr > 0 else 1.0, from_zero))
