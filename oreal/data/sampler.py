"""`PromptSampler`: seeded shuffling, sharding across data-parallel ranks, resumable state.

Each step draws `prompts_per_step` prompts (the global batch, across all ranks) from a seeded
permutation of the dataset; rank r takes the r-th contiguous slice of them. The permutation of
epoch e is `numpy.random.default_rng([seed, e]).permutation(n)`, so every rank computes the
same one without talking to the others. An epoch ends when fewer than `prompts_per_step` prompts
are left; that remainder is skipped so every rank always gets the same number of prompts.

The state is global (epoch, prompts consumed in it): a run resumed from `state_dict()` continues
with the same prompts, also with a different number of ranks.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

STATE_VERSION = 1


class PromptSampler:
    """Yields, step after step, this rank's dataset indices.

    Args:
        num_prompts: length of the dataset (after difficulty re-sampling).
        prompts_per_step: prompts per training step over all ranks; a multiple of `world_size`.
        rank, world_size: this process's data-parallel rank and the number of ranks.
        seed: shuffling seed; `shuffle=False` walks the dataset in order.
    """

    def __init__(self, num_prompts: int, prompts_per_step: int, *, rank: int = 0, world_size: int = 1,
                 seed: int = 0, shuffle: bool = True):
        for name, value in (("num_prompts", num_prompts), ("prompts_per_step", prompts_per_step),
                            ("world_size", world_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank: expected an int in [0, {world_size}), got {rank!r}")
        if prompts_per_step % world_size:
            raise ValueError(f"prompts_per_step: {prompts_per_step} does not split evenly over "
                             f"world_size={world_size} ranks; use a multiple of {world_size}")
        if prompts_per_step > num_prompts:
            raise ValueError(f"prompts_per_step: {prompts_per_step} is more than the {num_prompts} prompts "
                             "in the dataset")
        self.num_prompts, self.prompts_per_step = num_prompts, prompts_per_step
        self.rank, self.world_size = rank, world_size
        self.seed, self.shuffle = int(seed), shuffle
        self.epoch, self.cursor = 0, 0
        self._order_epoch, self._order = None, None

    @property
    def prompts_per_rank(self) -> int:
        return self.prompts_per_step // self.world_size

    @property
    def steps_per_epoch(self) -> int:
        return self.num_prompts // self.prompts_per_step

    def _epoch_order(self) -> np.ndarray:
        if self._order_epoch != self.epoch:
            if self.shuffle:
                self._order = np.random.default_rng([self.seed, self.epoch]).permutation(self.num_prompts)
            else:
                self._order = np.arange(self.num_prompts)
            self._order_epoch = self.epoch
        return self._order

    def next_indices(self) -> list[int]:
        """This rank's indices for the next step; advances the state."""
        if self.cursor + self.prompts_per_step > self.num_prompts:
            self.epoch, self.cursor = self.epoch + 1, 0
        start = self.cursor + self.rank * self.prompts_per_rank
        indices = self._epoch_order()[start:start + self.prompts_per_rank]
        self.cursor += self.prompts_per_step
        return [int(i) for i in indices]

    def __iter__(self) -> Iterator[list[int]]:
        while True:
            yield self.next_indices()

    def state_dict(self) -> dict:
        """Plain ints, fit for a checkpoint; rank and world size are not part of it."""
        return {"version": STATE_VERSION, "seed": self.seed, "shuffle": self.shuffle,
                "num_prompts": self.num_prompts, "prompts_per_step": self.prompts_per_step,
                "epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        """Continues from a saved state; refuses one from another dataset, seed or batch size."""
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise ValueError(f"state: not a PromptSampler state of version {STATE_VERSION}: {state!r:.200}")
        for key in ("seed", "shuffle", "num_prompts", "prompts_per_step"):
            if state[key] != getattr(self, key):
                raise ValueError(f"state: saved {key}={state[key]!r} differs from this sampler's "
                                 f"{getattr(self, key)!r}; resuming would draw different prompts")
        epoch, cursor = state["epoch"], state["cursor"]
        if not (isinstance(epoch, int) and isinstance(cursor, int) and epoch >= 0 and 0 <= cursor <= self.num_prompts):
            raise ValueError(f"state: epoch={epoch!r}, cursor={cursor!r} are out of range")
        self.epoch, self.cursor = epoch, cursor
