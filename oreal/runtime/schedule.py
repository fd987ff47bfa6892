"""Learning-rate schedules: linear warm-up, then cosine decay to a floor.

    lr(s) = lr_max * (s + 1) / warmup                                   for s < warmup
    lr(s) = floor + (lr_max - floor) * (1 + cos(pi * p)) / 2,  p = (s - warmup) / (total - warmup)

`s` counts the updates this optimizer has made (0 for the first). The policy's schedule starts at
its first update, after the frozen steps, so its warm-up ramps its real first updates instead of
passing while it is frozen. The schedule is a `LambdaLR` over a picklable callable, so its state
goes into checkpoints like any scheduler's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class WarmupCosine:
    """The multiplier of the base lr at update `s` (what `LambdaLR` calls)."""

    warmup_steps: int
    total_steps: int
    floor_ratio: float  # min_lr / lr

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        decay_steps = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / decay_steps)
        return self.floor_ratio + (1.0 - self.floor_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine(optimizer: torch.optim.Optimizer, *, lr: float, min_lr: float, warmup_steps: int,
                  total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A scheduler for `optimizer` (whose groups hold `lr`), stepped once per optimizer update."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, WarmupCosine(warmup_steps, total_steps, min_lr / lr if lr > 0 else 1.0))
