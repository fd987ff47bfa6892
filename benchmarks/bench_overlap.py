"""Step time with one step of overlap between generation and training (`--rollout.max_staleness 1`) against
the synchronous step (0), on the same config, side by side in one run.

    python -m benchmarks.bench_overlap --json OUT.json      # one run, JSON
    python -m benchmarks.bench_overlap --save               # also benchmarks/results/overlap.{json,md}

Both settings run `torchrun --nproc_per_node 2 -m oreal.train --config configs/tiny_cpu.py` (the tiny random
Qwen2, the transformers engine in its own process, 2 trainer ranks over gloo, OREAL) with more generation
per step than the test config (`WORKLOAD`: 8 prompts x 8 samples, up to 32 new tokens), every step
updating the policy, no evaluation; only `--rollout.max_staleness` differs. The step time is `time/step`
from metrics.jsonl (collect + judge + train + sync: with overlap, the wait for the in-flight generation
falls in the collect or the sync), median over steps FIRST_TIMED_STEP..steps. The settings alternate
run by run (0, 1, 0, 1, ...) so that a shared machine's load falls on both alike; the 1-minute load
average is recorded before and after every run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "configs" / "tiny_cpu.py"
FIRST_TIMED_STEP = 3  # steps 1 and 2 warm up allocators, caches and the engine
WORKLOAD = ["--data.samples_per_prompt", "8", "--rollout.max_new_tokens", "32", "--rollout.max_total_tokens", "128",
            "--train.micro_batch_tokens", "128", "--train.freeze_policy_steps", "0", "--eval.interval", "0",
            "--checkpoint.interval", "0", "--checkpoint.export_hf", "false", "--log.progress_bar", "false"]


def load_average() -> float | None:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def run_once(staleness: int, steps: int, workdir: Path) -> dict:
    out = workdir / f"staleness{staleness}-{time.time_ns()}"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
               "oreal.train", "--config", str(CONFIG), "--output-dir", str(out), "--steps", str(steps),
               "--rollout.max_staleness", str(staleness), *WORKLOAD]
    load_before, start = load_average(), time.perf_counter()
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    wall = time.perf_counter() - start
    if done.returncode != 0:
        log = workdir.parent / f"bench_overlap_failed_{staleness}.log"
        log.write_text(done.stdout + done.stderr)
        raise SystemExit(f"bench_overlap: the run with max_staleness {staleness} failed (exit {done.returncode}; "
                         f"full log: {log}):\n{(done.stdout + done.stderr)[-4000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    timed = [r for r in records if r["step"] >= FIRST_TIMED_STEP]

    def median(key: str) -> float:
        return statistics.median(float(r[key]) for r in timed)

    return {"max_staleness": staleness, "steps": steps, "wall_s": wall, "load_before": load_before,
            "load_after": load_average(), "step_times_s": [float(r["time/step"]) for r in timed],
            "median_step_s": median("time/step"), "median_rollout_s": median("time/rollout"),
            "median_judge_s": median("time/judge"), "median_train_s": median("time/train"),
            "median_sync_s": median("time/sync"),
            "staleness_per_step": [float(r["rollout/staleness"]) for r in records],
            "reward_mean_per_step": [float(r["reward/mean"]) for r in records]}


def machine() -> dict:
    import torch
    import transformers

    return {"cpu": platform.processor() or platform.machine(), "usable_cpus": len(os.sched_getaffinity(0)),
            "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__}


def summarise(rows: list[dict]) -> dict:
    by = {s: [t for r in rows if r["max_staleness"] == s for t in r["step_times_s"]] for s in (0, 1)}
    sync, overlap = statistics.median(by[0]), statistics.median(by[1])
    per_round = [b["median_step_s"] / a["median_step_s"] for a, b in zip(rows[0::2], rows[1::2])]
    return {"median_step_s": {"0": sync, "1": overlap}, "ratio_1_over_0": overlap / sync,
            "ratio_per_round": per_round, "timed_steps_per_setting": {str(s): len(v) for s, v in by.items()}}


def markdown(result: dict) -> str:
    s = result["summary"]
    lines = [
        "# One step of overlap (`rollout.max_staleness 1`) against the synchronous step",
        "",
        f"`python -m benchmarks.bench_overlap --steps {result['steps']} --rounds {result['rounds']} --save` "
        f"on {result['machine']['cpu']}, {result['machine']['usable_cpus']} usable CPUs, torch "
        f"{result['machine']['torch']}; the machine was shared (1-minute load average in the table).",
        "",
        f"Config: `configs/tiny_cpu.py` + `{' '.join(WORKLOAD)}`; only `--rollout.max_staleness` differs. "
        f"Median `time/step` over steps {FIRST_TIMED_STEP}..{result['steps']}.",
        "",
        "| run | max_staleness | median step (s) | rollout wait (s) | judge (s) | train (s) | sync (s) | load before/after |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(result["rows"]):
        lines.append(f"| {i + 1} | {r['max_staleness']} | {r['median_step_s']:.3f} | {r['median_rollout_s']:.3f} | "
                     f"{r['median_judge_s']:.3f} | {r['median_train_s']:.3f} | {r['median_sync_s']:.3f} | "
                     f"{r['load_before']:.1f} / {r['load_after']:.1f} |")
    lines += ["", f"Median step over all timed steps: synchronous {s['median_step_s']['0']:.3f} s, overlapped "
              f"{s['median_step_s']['1']:.3f} s: ratio {s['ratio_1_over_0']:.2f} (per round: "
              f"{', '.join(f'{x:.2f}' for x in s['ratio_per_round'])})."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=2, help="pairs of runs (0 then 1)")
    parser.add_argument("--json", help="write the result here")
    parser.add_argument("--save", action="store_true", help="also write benchmarks/results/overlap.{json,md}")
    args = parser.parse_args(argv)
    if args.steps <= FIRST_TIMED_STEP:
        parser.error(f"--steps must exceed {FIRST_TIMED_STEP} (the first steps warm up)")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_overlap_") as tmp:
        for round_ in range(args.rounds):
            for staleness in (0, 1):
                row = run_once(staleness, args.steps, Path(tmp))
                rows.append(row)
                print(f"round {round_ + 1} max_staleness {staleness}: median step {row['median_step_s']:.3f} s "
                      f"(load {row['load_before']:.1f} -> {row['load_after']:.1f})", flush=True)
    result = {"benchmark": "bench_overlap", "steps": args.steps, "rounds": args.rounds, "config": str(CONFIG.name),
              "workload": WORKLOAD, "machine": machine(), "rows": rows, "summary": summarise(rows)}
    print(markdown(result))
    text = json.dumps(result, indent=1)
    if args.json:
        Path(args.json).write_text(text)
    if args.save:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "overlap.json").write_text(text)
        (RESULTS / "overlap.md").write_text(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
