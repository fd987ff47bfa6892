"""Packing benchmark: balance and throughput of `oreal.data.pack_rollouts` on long-tailed rollouts.

    python -m benchmarks.bench_packing --json OUT.json          # one run, JSON rows
    python -m benchmarks.bench_packing --save                   # also benchmarks/results/packing.{json,csv,md}

10,000 synthetic rollouts (seeded): prompt lengths log-normal around 150 tokens, response lengths
log-normal around 700 tokens with a heavy tail cut at 16,384 tokens in all (OREAL's generation
limit), each with token-RM scores, reference and behaviour log-probs. For each data-parallel
world size and micro-batch token budget, providers side by side:

- `sequential`: the naive packer, for reference: fill micro-batches in arrival order, deal them
  to ranks round-robin, pad short ranks with empty micro-batches;
- `greedy`: `plan_packing(method="greedy")`, longest-first onto the emptiest bin (what "auto"
  picks at this scale);
- `kk`: Karmarkar-Karp, only on the 1,000-rollout rows (it is O(n k log k) in Python).

Columns: `largest_over_rank_mean` (the largest micro-batch over the mean micro-batch of its rank;
the target is <= 1.05), `lower_bound` (the longest sequence over its rank's mean: no packer can
go below it), step and rank imbalance, fill, plan and build seconds, sequences/s over planning plus
building every rank's tensors.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

from oreal.data import Rollout, pack_sequences, plan_packing
from oreal.data.balance import PackingPlan
from oreal.data.packing import check_rollouts

RESULTS = Path(__file__).parent / "results"
MAX_LENGTH = 16384


def long_tailed_rollouts(count: int, seed: int) -> list[Rollout]:
    rng = np.random.default_rng(seed)
    prompt_lens = np.clip(rng.lognormal(np.log(150), 0.6, count), 8, 2048).astype(int)
    response_lens = np.clip(rng.lognormal(np.log(700), 1.1, count), 1, MAX_LENGTH - prompt_lens).astype(int)
    rollouts = []
    for p, r in zip(prompt_lens, response_lens):
        rollouts.append(Rollout(rng.integers(0, 150_000, p), rng.integers(0, 150_000, r),
                                advantage=float(rng.normal()), is_positive=bool(rng.random() < 0.5),
                                rm_scores=rng.standard_normal(r, dtype=np.float32),
                                ref_logprobs=-rng.random(r, dtype=np.float32),
                                old_logprobs=-rng.random(r, dtype=np.float32)))
    return rollouts


def sequential_plan(lengths: list[int], max_tokens: int, world_size: int) -> PackingPlan:
    """The naive packer: arrival order, a new micro-batch when the next sequence would not fit."""
    bins, current, used = [], [], 0
    for index, n in enumerate(lengths):
        if current and used + n > max_tokens:
            bins.append(current)
            current, used = [], 0
        current.append(index)
        used += n
    if current:
        bins.append(current)
    per_rank = math.ceil(len(bins) / world_size)
    rank_batches = [bins[r::world_size] for r in range(world_size)]
    for rank in rank_batches:
        rank.extend([] for _ in range(per_rank - len(rank)))
    return PackingPlan(rank_batches, lengths, max_tokens, "sequential")


def lower_bound(plan: PackingPlan) -> float:
    worst = 1.0
    for rank in plan.rank_batches:
        sizes = [sum(plan.lengths[i] for i in b) for b in rank]
        mean = sum(sizes) / len(sizes)
        longest = max((plan.lengths[i] for b in rank for i in b), default=0)
        worst = max(worst, longest / mean if mean else 1.0)
    return worst


def run_case(rollouts, lengths, world_size: int, max_tokens: int, method: str) -> dict:
    start = time.perf_counter()
    side, extras = check_rollouts(rollouts)
    if method == "sequential":
        plan = sequential_plan(lengths, max_tokens, world_size)
    else:
        plan = plan_packing(lengths, max_tokens, world_size=world_size, method=method)
    planned = time.perf_counter()
    num_batches = 0
    for rank in plan.rank_batches:
        for indices in rank:
            batch = pack_sequences(rollouts, indices, side_fields=side, extras=extras)
            num_batches += 1
            assert batch.num_tokens <= max_tokens or batch.is_padding
    built = time.perf_counter()
    report = plan.report().as_dict()
    elapsed = built - start
    return {"provider": method, "rollouts": len(rollouts), "total_tokens": sum(lengths),
            "longest_sequence": max(lengths), **report, "lower_bound": lower_bound(plan),
            "plan_s": planned - start, "build_s": built - planned, "sequences_per_s": len(rollouts) / elapsed,
            "tokens_per_s": sum(lengths) / elapsed, "micro_batches_built": num_batches}


def environment() -> dict:
    import torch

    import oreal

    return {"python": platform.python_version(), "numpy": np.__version__, "torch": torch.__version__,
            "oreal": oreal.__version__, "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
            "cpu_count": os.cpu_count(), "platform": platform.platform()}


def run(num_rollouts: int, seed: int, quick: bool) -> list[dict]:
    env = environment()
    rows = []
    rollouts = long_tailed_rollouts(num_rollouts, seed)
    lengths = [r.num_tokens for r in rollouts]
    worlds = (1, 8) if quick else (1, 8, 64)
    for max_tokens in (32768, 16384):
        for world_size in worlds:
            for provider in ("sequential", "greedy"):
                rows.append(run_case(rollouts, lengths, world_size, max_tokens, provider))
                print(_line(rows[-1]), file=sys.stderr)
    small = rollouts[:1000]
    small_lengths = lengths[:1000]
    for provider in ("sequential", "greedy", "kk"):
        rows.append(run_case(small, small_lengths, 8, 32768, provider))
        print(_line(rows[-1]), file=sys.stderr)
    for row in rows:
        row.update(env)
    return rows


def _line(row: dict) -> str:
    return (f"{row['provider']:>10} n={row['rollouts']:>5} W={row['world_size']:>2} budget={row['max_tokens']:>5}: "
            f"{row['micro_batches_per_rank']:>3} mb/rank, largest/rank-mean {row['largest_over_rank_mean']:.3f} "
            f"(bound {row['lower_bound']:.3f}), step {row['step_imbalance']:.3f}, fill {row['fill']:.1%}, "
            f"{row['sequences_per_s']:,.0f} seq/s")


COLUMNS = ["provider", "rollouts", "world_size", "max_tokens", "micro_batches_per_rank", "padding_batches",
           "largest_micro_batch", "largest_over_rank_mean", "lower_bound", "step_imbalance", "rank_imbalance", "fill",
           "plan_s", "build_s", "sequences_per_s", "tokens_per_s", "total_tokens", "longest_sequence"]
ENV_COLUMNS = ["python", "numpy", "torch", "oreal", "machine", "cpu_count", "platform"]


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if value < 1000 else f"{value:,.0f}"
    return str(value)


def write_markdown(rows: list[dict], path: Path) -> None:
    env = {k: rows[0][k] for k in ENV_COLUMNS}
    lines = ["# Packing benchmark (`python -m benchmarks.bench_packing`)", "",
             "Environment: " + ", ".join(f"{k} {v}" for k, v in env.items()), "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_fmt(row[c]) for c in COLUMNS) + " |" for row in rows]
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", type=Path, help="write the rows as JSON here")
    parser.add_argument("--csv", type=Path, help="write the rows as CSV here")
    parser.add_argument("--save", action="store_true", help="write benchmarks/results/packing.{json,csv,md}")
    parser.add_argument("--rollouts", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="fewer world sizes")
    args = parser.parse_args(argv)
    if args.rollouts < 1000:
        parser.error("--rollouts: need at least 1000 (the Karmarkar-Karp rows use the first 1000)")
    rows = run(args.rollouts, args.seed, args.quick)
    targets = {"json": args.json, "csv": args.csv, "md": None}
    if args.save:
        RESULTS.mkdir(parents=True, exist_ok=True)
        targets = {"json": args.json or RESULTS / "packing.json", "csv": args.csv or RESULTS / "packing.csv",
                   "md": RESULTS / "packing.md"}
    if targets["json"]:
        targets["json"].write_text(json.dumps(rows, indent=1) + "\n")
    if targets["csv"]:
        with open(targets["csv"], "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=COLUMNS + ENV_COLUMNS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
    if targets["md"]:
        write_markdown(rows, targets["md"])
    greedy = [r for r in rows if r["provider"] == "greedy" and r["rollouts"] == args.rollouts]
    print(json.dumps({"greedy_worst_largest_over_rank_mean": max(r["largest_over_rank_mean"] for r in greedy),
                      "greedy_min_sequences_per_s": min(r["sequences_per_s"] for r in greedy)}))


if __name__ == "__main__":
    main()
