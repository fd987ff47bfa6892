"""OREAL's difficulty re-sampling: repeat hard prompts, drop easy ones, by their recorded pass rate.

OREAL trains on prompts whose pass rate (the fraction of an SFT model's samples judged right) is
known in advance. Prompts that are almost always solved teach little once all-right groups are
filtered out, and hard prompts are where the signal is, so the prompt list is rebuilt once:
each prompt appears `repeat` times according to the band its pass rate falls in, and prompts at or
above `drop_at` are removed. OREAL's released configs use the bands in `OREAL_BANDS`
(and, having no band for [0.8, 1], drop those prompts).

Prompts without a pass rate (formats other than OREAL-RL-Prompts) are kept once. A pass rate in
no band and below `drop_at` is kept once as well.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

# (low, high, repeat): pass rates in [low, high) appear `repeat` times.
OREAL_BANDS = ((0.0, 0.2, 6), (0.2, 0.4, 4), (0.4, 0.6, 4), (0.6, 0.8, 2))


@dataclass(frozen=True)
class DifficultyResampling:
    """A repeat-factor table over pass-rate bands and a drop threshold.

    Args:
        bands: `(low, high, repeat)` triples, non-overlapping, `0 <= low < high <= 1`, `repeat >= 0`;
            the band `[low, high)` also holds `high == 1.0` when `high` is 1.
        drop_at: prompts with `pass_rate >= drop_at` are dropped; None keeps every prompt.
    """

    bands: tuple[tuple[float, float, int], ...] = OREAL_BANDS
    drop_at: float | None = 0.8

    def __post_init__(self):
        bands = tuple(tuple(band) for band in self.bands)
        for band in bands:
            if len(band) != 3:
                raise ValueError(f"bands: each band is (low, high, repeat), got {band!r}")
            low, high, repeat = band
            if not (0.0 <= low < high <= 1.0):
                raise ValueError(f"bands: band {band!r} needs 0 <= low < high <= 1")
            if isinstance(repeat, bool) or not isinstance(repeat, int) or repeat < 0:
                raise ValueError(f"bands: band {band!r} needs a whole repeat count >= 0")
        ordered = sorted(bands)
        for (_, high_a, _), (low_b, _, _) in zip(ordered, ordered[1:]):
            if low_b < high_a:
                raise ValueError(f"bands: bands overlap near pass rate {low_b} ({ordered!r})")
        if self.drop_at is not None and not (0.0 <= self.drop_at <= 1.0):
            raise ValueError(f"drop_at: expected a pass rate in [0, 1] or None, got {self.drop_at!r}")
        object.__setattr__(self, "bands", tuple(ordered))

    def repeats(self, pass_rate: float | None) -> int:
        """How many times a prompt with this pass rate appears in the re-sampled list."""
        if pass_rate is None:
            return 1
        if self.drop_at is not None and pass_rate >= self.drop_at:
            return 0
        for low, high, repeat in self.bands:
            if low <= pass_rate < high or (pass_rate == high == 1.0):
                return repeat
        return 1

    def expand(self, pass_rates: Sequence[float | None]) -> list[int]:
        """Indices into `pass_rates`, each repeated by its factor, in the original order."""
        out: list[int] = []
        for index, rate in enumerate(pass_rates):
            out.extend([index] * self.repeats(rate))
        return out

    @classmethod
    def none(cls) -> DifficultyResampling:
        """The identity table: every prompt once."""
        return cls(bands=(), drop_at=None)
