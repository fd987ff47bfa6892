"""Balanced partitioning of sequences into micro-batches on data-parallel ranks.

With FSDP every rank runs the same number of forwards and waits at each one's collectives for the
slowest rank, so a step costs about (micro-batches) x (largest micro-batch among the ranks at that
position). `plan_packing` therefore makes every micro-batch of every rank about equally full:

1. `m` = micro-batches per rank, starting from the least that fits the token budget,
   `ceil(total_tokens / (world_size * max_tokens))`.
2. Split all sequences into `world_size * m` bins of nearly equal token counts, by longest-first
   greedy (LPT: each sequence, longest first, goes to the emptiest bin) or Karmarkar-Karp
   (largest differencing: repeatedly merge the two partial partitions whose spread is largest,
   pairing heavy bins of one with light bins of the other). If a bin exceeds `max_tokens`,
   `m` grows by one and step 2 repeats.
3. Deal the bins, heaviest first, to ranks in snake order (0..W-1, W-1..0, ...), so rank totals
   match and micro-batch j has about the same size on every rank.

The plan is a pure function of the lengths: every rank computes the same plan from the same
(gathered) lengths and builds only its own micro-batches. Bins that receive no sequence become
padding micro-batches, so every rank still runs `m` forwards.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass

METHODS = ("auto", "greedy", "kk")
# Karmarkar-Karp holds a k-bin partial partition per sequence: n * k list entries, merged in
# O(k log k) each (about 0.1 s at 20,000 in CPython). Beyond this many entries "auto" takes the
# greedy method alone, which is near-perfect anyway when there are many sequences per bin.
KK_AUTO_LIMIT = 20_000


def greedy_partition(weights: Sequence[int], k: int) -> list[list[int]]:
    """Longest-processing-time-first: indices of `weights` split into `k` bins of near-equal sums."""
    if k < 1:
        raise ValueError(f"k: need at least one bin, got {k}")
    order = sorted(range(len(weights)), key=lambda i: (-weights[i], i))
    heap = [(0, b) for b in range(k)]  # (load, bin); ties go to the lowest bin number
    bins: list[list[int]] = [[] for _ in range(k)]
    for i in order:
        load, b = heapq.heappop(heap)
        bins[b].append(i)
        heapq.heappush(heap, (load + weights[i], b))
    return bins


def karmarkar_karp_partition(weights: Sequence[int], k: int) -> list[list[int]]:
    """Multi-way largest differencing method: indices of `weights` split into `k` bins."""
    if k < 1:
        raise ValueError(f"k: need at least one bin, got {k}")
    if not weights:
        return [[] for _ in range(k)]
    # A state is k (sum, items) bins sorted by sum, heaviest first; its key is its spread.
    heap = []
    for i, w in enumerate(weights):
        state = [(w, [i])] + [(0, []) for _ in range(k - 1)]
        heap.append((-w, i, state))
    heapq.heapify(heap)
    counter = len(weights)
    while len(heap) > 1:
        _, _, a = heapq.heappop(heap)
        _, _, b = heapq.heappop(heap)
        merged = [(a[j][0] + b[k - 1 - j][0], a[j][1] + b[k - 1 - j][1]) for j in range(k)]
        merged.sort(key=lambda bin_: -bin_[0])
        heapq.heappush(heap, (-(merged[0][0] - merged[-1][0]), counter, merged))
        counter += 1
    return [items for _, items in heap[0][2]]


def partition(weights: Sequence[int], k: int, method: str = "auto") -> list[list[int]]:
    """`weights` split into `k` balanced bins with the named method.

    "greedy" and "kk" are the methods above; "auto" runs both and keeps the one with the lighter
    heaviest bin while `len(weights) * k <= KK_AUTO_LIMIT`, and greedy alone beyond.
    """
    if method not in METHODS:
        raise ValueError(f"method: unknown balancing method {method!r}; expected one of {METHODS}")
    if method == "greedy":
        return greedy_partition(weights, k)
    if method == "kk":
        return karmarkar_karp_partition(weights, k)
    greedy = greedy_partition(weights, k)
    if len(weights) * k > KK_AUTO_LIMIT:
        return greedy
    kk = karmarkar_karp_partition(weights, k)
    heaviest = lambda bins: max((sum(weights[i] for i in b) for b in bins), default=0)
    return kk if heaviest(kk) <= heaviest(greedy) else greedy


@dataclass
class PackingReport:
    """How evenly a plan spreads tokens; token counts per rank and micro-batch.

    `largest_over_rank_mean`: max over ranks of (largest micro-batch / mean micro-batch of that rank);
    `step_imbalance`: max over micro-batch positions j of (largest j-th micro-batch among ranks /
    mean j-th micro-batch), the straggler factor of one FSDP forward; `rank_imbalance`: largest
    rank total / mean rank total; `fill`: mean micro-batch tokens / `max_tokens`.
    """

    max_tokens: int
    tokens: list[list[int]]  # [rank][micro-batch] -> tokens
    sequences: list[list[int]]  # [rank][micro-batch] -> sequences
    method: str

    @property
    def world_size(self) -> int:
        return len(self.tokens)

    @property
    def micro_batches_per_rank(self) -> int:
        return len(self.tokens[0])

    @property
    def padding_batches(self) -> int:
        return sum(1 for rank in self.sequences for count in rank if count == 0)

    @property
    def largest_over_rank_mean(self) -> float:
        ratios = []
        for rank in self.tokens:
            mean = sum(rank) / len(rank)
            ratios.append(max(rank) / mean if mean > 0 else 1.0)
        return max(ratios)

    @property
    def step_imbalance(self) -> float:
        worst = 1.0
        for j in range(self.micro_batches_per_rank):
            column = [rank[j] for rank in self.tokens]
            mean = sum(column) / len(column)
            if mean > 0:
                worst = max(worst, max(column) / mean)
        return worst

    @property
    def rank_imbalance(self) -> float:
        totals = [sum(rank) for rank in self.tokens]
        mean = sum(totals) / len(totals)
        return max(totals) / mean if mean > 0 else 1.0

    @property
    def fill(self) -> float:
        count = self.world_size * self.micro_batches_per_rank
        return sum(map(sum, self.tokens)) / (count * self.max_tokens)

    def as_dict(self) -> dict:
        return {"method": self.method, "world_size": self.world_size, "max_tokens": self.max_tokens,
                "micro_batches_per_rank": self.micro_batches_per_rank, "padding_batches": self.padding_batches,
                "largest_over_rank_mean": self.largest_over_rank_mean, "step_imbalance": self.step_imbalance,
                "rank_imbalance": self.rank_imbalance, "fill": self.fill,
                "largest_micro_batch": max(map(max, self.tokens))}

    def summary(self) -> str:
        return (f"packing[{self.method}]: {self.world_size} rank(s) x {self.micro_batches_per_rank} micro-batch(es), "
                f"largest/rank-mean {self.largest_over_rank_mean:.3f}, step imbalance {self.step_imbalance:.3f}, "
                f"rank imbalance {self.rank_imbalance:.3f}, fill {self.fill:.1%} of {self.max_tokens} tokens, "
                f"{self.padding_batches} padding batch(es)")


@dataclass
class PackingPlan:
    """`rank_batches[r][j]`: indices (ascending) of the sequences in micro-batch j of rank r."""

    rank_batches: list[list[list[int]]]
    lengths: list[int]
    max_tokens: int
    method: str

    def report(self) -> PackingReport:
        tokens = [[sum(self.lengths[i] for i in batch) for batch in rank] for rank in self.rank_batches]
        sequences = [[len(batch) for batch in rank] for rank in self.rank_batches]
        return PackingReport(self.max_tokens, tokens, sequences, self.method)


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value!r}")


def check_lengths(lengths: Sequence[int], max_tokens: int) -> None:
    """Raises ValueError naming the sequence and the limit when one sequence is empty or alone exceeds
    `max_tokens`."""
    for index, n in enumerate(lengths):
        if n < 1:
            raise ValueError(f"lengths[{index}]: a sequence needs at least 1 token, got {n}")
        if n > max_tokens:
            raise ValueError(f"sequence {index} has {n} tokens, more than the micro-batch token budget "
                             f"max_tokens={max_tokens}; raise max_tokens or cap prompt + response length")


def plan_packing(lengths: Sequence[int], max_tokens: int, *, world_size: int = 1, method: str = "auto",
                 min_micro_batches: int = 1) -> PackingPlan:
    """Balanced micro-batches of at most `max_tokens` tokens, the same number on each of `world_size` ranks.

    Raises ValueError naming the sequence and the limit when one sequence alone exceeds `max_tokens`.
    """
    _check_int("max_tokens", max_tokens, 1)
    _check_int("world_size", world_size, 1)
    _check_int("min_micro_batches", min_micro_batches, 1)
    if method not in METHODS:
        raise ValueError(f"method: unknown balancing method {method!r}; expected one of {METHODS}")
    lengths = [int(n) for n in lengths]
    check_lengths(lengths, max_tokens)
    total = sum(lengths)
    per_rank = max(min_micro_batches, math.ceil(total / (world_size * max_tokens)), 1)
    while True:
        num_bins = world_size * per_rank
        bins = partition(lengths, num_bins, method)
        if not lengths or max(sum(lengths[i] for i in b) for b in bins) <= max_tokens:
            break
        if num_bins >= len(lengths):  # one sequence per bin always fits; greedy guarantees it
            bins = greedy_partition(lengths, num_bins)
            break
        per_rank += 1
    bins.sort(key=lambda b: (-sum(lengths[i] for i in b), min(b, default=len(lengths))))
    rank_batches: list[list[list[int]]] = [[] for _ in range(world_size)]
    for position, items in enumerate(bins):
        turn, offset = divmod(position, world_size)
        rank = offset if turn % 2 == 0 else world_size - 1 - offset
        rank_batches[rank].append(sorted(items))
    return PackingPlan(rank_batches, lengths, max_tokens, method)
