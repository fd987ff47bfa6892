"""Judger benchmark: agreement with expected labels and answers/second, ours next to Math-Verify.

    python -m benchmarks.bench_judger --json OUT.json      # one run, results as JSON
    python -m benchmarks.bench_judger --save               # also benchmarks/results/judger.{json,md}

Rows: every file of `../shared/data/verifier_pairs/` (pred, gold, expected `equal`), and 1,000
MATH-500 pairs (each reference solution against its own answer, and against the answer of another
problem, so that half the items need the worker processes).

Providers, on the same rows and the same cores:
- `oreal`: `oreal.reward.judge_batch(preds, golds)` with `--workers` worker processes (default 2),
  per-item hard timeout 2 s; the pool is started before the clock starts.
- `math_verify`: `verify(parse(gold), parse(pred))` with its defaults (the way it is used in RL
  trainers), in this process, and spread over a pool of `--workers` processes; both are warmed up
  (imports, first parse) before the clock starts and reused for every file.

Columns: agreement (rows whose verdict equals the label), answers per second, timeouts. On
`combined.jsonl` the rows without a `flags` entry are also reported on their own: those labels are
mathematics, not one tool's policy.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


def _mv_one(args):
    gold, pred = args
    from math_verify import parse, verify

    try:
        return bool(verify(parse(gold), parse(pred)))
    except Exception:  # noqa: BLE001  a crash is a "no" for the peer, as in RL reward code
        return False


def _mv_warm(_):
    _mv_one((r"\frac{1}{2}", r"$x = 0.5$"))  # imports and first-call set-up happen before the clock
    time.sleep(0.3)  # hold this process so the next warm-up task goes to another one


def _mv_chunk(chunk):
    return [_mv_one(x) for x in chunk]


class MathVerifyRunner:
    """Math-Verify in this process and in a warm pool of `workers` spawned processes, reused across files."""

    def __init__(self, workers: int):
        self.workers = workers
        _mv_warm(None)
        self.pool = None
        if workers > 1:
            self.pool = multiprocessing.get_context("spawn").Pool(workers)
            self.pool.map(_mv_warm, range(workers * 2), chunksize=1)

    def run(self, golds, preds, processes: int):
        items = list(zip(golds, preds))
        start = time.perf_counter()
        if processes <= 1 or self.pool is None:
            verdicts = _mv_chunk(items)
        else:
            size = max(1, len(items) // (self.workers * 8))
            chunks = [items[i:i + size] for i in range(0, len(items), size)]
            verdicts = [v for part in self.pool.map(_mv_chunk, chunks) for v in part]
        return verdicts, time.perf_counter() - start

    def close(self):
        if self.pool is not None:
            self.pool.close()
            self.pool.join()


def run_oreal(golds, preds, pool):
    from oreal.reward.judging import judge_batch

    start = time.perf_counter()
    judgements = judge_batch(preds, golds, pool=pool)
    return judgements, time.perf_counter() - start


def load_pairs(path: Path):
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return rows


def math500_pairs(count: int = 1000):
    rows = load_pairs(DATA / "eval" / "math500.jsonl")
    preds, golds, expected = [], [], []
    n = len(rows)
    for i, row in enumerate(rows):
        preds.append(row["solution"])
        golds.append(row["answer"])
        expected.append(True)
    for i, row in enumerate(rows):
        other = rows[(i * 7 + 3) % n]
        preds.append(row["solution"])
        golds.append(other["answer"])
        expected.append(row["answer"] == other["answer"])
    return preds[:count], golds[:count], expected[:count]


def agreement(verdicts, labels):
    return sum(bool(v) == bool(l) for v, l in zip(verdicts, labels))


def environment(workers: int) -> dict:
    import mpmath
    import sympy

    versions = {"python": platform.python_version(), "sympy": sympy.__version__, "mpmath": mpmath.__version__}
    for name in ("math_verify", "latex2sympy2_extended"):
        try:
            from importlib.metadata import version

            versions[name] = version(name.replace("_", "-"))
        except Exception:  # noqa: BLE001
            versions[name] = "not installed"
    try:
        from importlib.metadata import version

        versions["oreal"] = version("oreal")
    except Exception:  # noqa: BLE001
        versions["oreal"] = "source tree"
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {"versions": versions, "machine": {"cpu": cpu, "cpu_count": os.cpu_count(), "usable_cpus": usable,
                                              "platform": platform.platform(), "load_average_1min": load},
            "workers": workers, "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", default=None, help="write results to this JSON file")
    ap.add_argument("--save", action="store_true", help="also write benchmarks/results/judger.{json,md}")
    ap.add_argument("--workers", type=int, default=2, help="processes per provider (the '2 cores' setup)")
    ap.add_argument("--skip-math500", action="store_true", help="only the verifier_pairs files")
    args = ap.parse_args(argv)

    pairs_dir = DATA / "verifier_pairs"
    if not pairs_dir.is_dir():
        print(f"bench_judger: {pairs_dir} not found (shared data must sit beside the repository)", file=sys.stderr)
        return 2
    from oreal.reward.worker_pool import JudgePool

    pool = JudgePool(num_workers=args.workers)
    pool.compare_many([("1", "2")] * args.workers, timeout=60)  # start the workers before timing
    mv = MathVerifyRunner(args.workers)

    rows_out = []
    files = sorted(pairs_dir.glob("*.jsonl"), key=lambda p: (p.name == "combined.jsonl", p.name))
    for path in files:
        rows = load_pairs(path)
        golds = [r["gold"] if isinstance(r["gold"], str) else json.dumps(r["gold"]) for r in rows]
        preds = [r["pred"] if isinstance(r["pred"], str) else json.dumps(r["pred"]) for r in rows]
        labels = [bool(r["equal"]) for r in rows]
        ours, t_ours = run_oreal(golds, preds, pool)
        ours_v = [j.correct for j in ours]
        mv_v, t_mv1 = mv.run(golds, preds, 1)
        _, t_mvn = mv.run(golds, preds, args.workers)
        subsets = [("all rows", list(range(len(rows))))]
        if path.name == "combined.jsonl":
            subsets.append(("rows without flags", [i for i, r in enumerate(rows) if not r.get("flags")]))
        for label, idx in subsets:
            rows_out.append({
                "file": path.name, "subset": label, "rows": len(idx),
                "oreal_agree": agreement([ours_v[i] for i in idx], [labels[i] for i in idx]),
                "math_verify_agree": agreement([mv_v[i] for i in idx], [labels[i] for i in idx]),
                "oreal_answers_per_s": len(rows) / t_ours,
                "math_verify_answers_per_s_1proc": len(rows) / t_mv1,
                "math_verify_answers_per_s": len(rows) / t_mvn,
                "oreal_timeouts": sum(j.reason == "timeout" for j in ours),
                "oreal_wrong_rows": [i for i in idx if ours_v[i] != labels[i]],
                "math_verify_wrong_rows": [i for i in idx if mv_v[i] != labels[i]],
            })
    math500 = None
    if not args.skip_math500:
        preds, golds, expected = math500_pairs(1000)
        ours, t_ours = run_oreal(golds, preds, pool)
        from oreal.reward.extract import extract_answer

        aligned = sum(j.pred == extract_answer(p) for j, p in zip(ours, preds))
        mv_v, t_mvn = mv.run(golds, preds, args.workers)
        math500 = {"pairs": len(preds), "oreal_seconds": t_ours, "oreal_answers_per_s": len(preds) / t_ours,
                   "oreal_results": len(ours), "oreal_results_aligned": aligned,
                   "oreal_agree": agreement([j.correct for j in ours], expected),
                   "oreal_timeouts": sum(j.reason == "timeout" for j in ours),
                   "math_verify_seconds": t_mvn, "math_verify_answers_per_s": len(preds) / t_mvn,
                   "math_verify_agree": agreement(mv_v, expected)}
    pool.close()
    mv.close()
    result = {"benchmark": "judger", "environment": environment(args.workers), "rows": rows_out,
              "math500_1000": math500}
    table = markdown(result)
    print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    if args.save:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "judger.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        (RESULTS / "judger.md").write_text(table + "\n", encoding="utf-8")
    return 0


def markdown(result: dict) -> str:
    env = result["environment"]
    v = env["versions"]
    m = env["machine"]
    lines = [
        "# Judger benchmark (`python -m benchmarks.bench_judger`)",
        "",
        f"{env['date']}; python {v['python']}, sympy {v['sympy']}, mpmath {v['mpmath']}, "
        f"math-verify {v['math_verify']}, latex2sympy2_extended {v['latex2sympy2_extended']}; "
        f"{m['cpu']}, {m['usable_cpus']} usable CPUs ({m['platform']}, 1-minute load average "
        f"{m['load_average_1min']:.1f} at the end: the machine was shared); {env['workers']} processes per provider.",
        "",
        "Agreement = rows whose verdict equals the expected label. The per-file rows include the rows that "
        "`combined.jsonl` flags as one tool's policy (decimal commas, ordered lists, a disputed label); "
        "the must-show number is the unflagged `combined.jsonl` row. Answers/s: oreal `judge_batch` with "
        f"{env['workers']} worker processes; Math-Verify `verify(parse(gold), parse(pred))` in 1 and in "
        f"{env['workers']} processes.",
        "",
        "| file | rows | oreal agree | math_verify agree | oreal answers/s | math_verify answers/s (1 proc) "
        f"| math_verify answers/s ({env['workers']} procs) | oreal timeouts |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        name = r["file"] + (f" ({r['subset']})" if r["subset"] != "all rows" else "")
        lines.append(
            f"| {name} | {r['rows']} | {r['oreal_agree']} ({100 * r['oreal_agree'] / r['rows']:.1f}%) "
            f"| {r['math_verify_agree']} ({100 * r['math_verify_agree'] / r['rows']:.1f}%) "
            f"| {r['oreal_answers_per_s']:,.0f} | {r['math_verify_answers_per_s_1proc']:,.0f} "
            f"| {r['math_verify_answers_per_s']:,.0f} | {r['oreal_timeouts']} |")
    m5 = result.get("math500_1000")
    if m5:
        lines += [
            "",
            f"MATH-500, {m5['pairs']} pairs (each solution against its own answer and against another "
            f"problem's): oreal {m5['oreal_seconds']:.2f} s ({m5['oreal_answers_per_s']:,.0f} answers/s), "
            f"{m5['oreal_results']} results, {m5['oreal_results_aligned']} aligned with their input, "
            f"{m5['oreal_agree']} agree with the expected label, {m5['oreal_timeouts']} timeouts; "
            f"Math-Verify ({env['workers']} procs) {m5['math_verify_seconds']:.2f} s "
            f"({m5['math_verify_answers_per_s']:,.0f} answers/s), {m5['math_verify_agree']} agree.",
        ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
