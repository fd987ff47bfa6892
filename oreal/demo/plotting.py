"""The demo's training-curve figure: reward, held-out pass@1 and response length per RL step.

    plot_runs({"OREAL": run_dir_a, "GRPO": run_dir_b}, "curves.png", start_pass1=0.42)

Per-step panels draw the raw values faintly and a 10-step trailing mean on top. Each run directory holds the trainer's `metrics.jsonl` (one line per step: `reward/mean`,
`response/length_mean`, ...) and `eval.jsonl` (one line per evaluation: `eval/mean_pass@1`).
`start_pass1`, the SFT model's held-out pass@1, is drawn at step 0 of the pass@1 panel when the
runs did not evaluate at the start themselves. Matplotlib runs on its file-only "Agg" backend, so
no display is needed.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Mapping

METRICS_FILE = "metrics.jsonl"
EVAL_FILE = "eval.jsonl"
PASS_KEY = "eval/mean_pass@1"
PANELS = (("reward/mean", "mean reward (+1 right, -1 wrong)"),
          (PASS_KEY, "held-out pass@1"),
          ("response/length_mean", "response length (tokens)"))


def _number(value) -> float:
    try:
        value = float(value)  # NaN arrives as the string "nan"
    except (TypeError, ValueError):
        return math.nan
    return value


def read_records(path: str | Path) -> list[dict]:
    """The JSON lines of `path` ([] when it does not exist); a line cut short by a kill is skipped."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of `key`, finite values only, by step."""
    points = sorted((int(r["step"]), _number(r.get(key))) for r in records if "step" in r and key in r)
    points = [(s, v) for s, v in points if math.isfinite(v)]
    return [s for s, _ in points], [v for _, v in points]


def moving_average(values: list[float], window: int) -> list[float]:
    """Trailing mean over up to `window` points (the first points average what exists so far)."""
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_runs(runs: Mapping[str, str | Path], path: str | Path, *, start_pass1: float | None = None,
              title: str = "") -> Path:
    """Three panels (reward, held-out pass@1, response length) with one line per run; saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for (key, label), ax in zip(PANELS, axes):
        for name, run_dir in runs.items():
            run_dir = Path(run_dir)
            records = read_records(run_dir / (EVAL_FILE if key == PASS_KEY else METRICS_FILE))
            steps, values = series(records, key)
            if key == PASS_KEY and start_pass1 is not None and 0 not in steps:
                steps, values = [0] + steps, [start_pass1] + values
            if not steps:
                continue
            if key == PASS_KEY:
                ax.plot(steps, values, marker="o", markersize=4, label=name)
            else:  # per-step values are noisy: faint raw line, bold trailing mean over 10 steps
                line, = ax.plot(steps, values, alpha=0.3, linewidth=1)
                ax.plot(steps, moving_average(values, 10), color=line.get_color(), linewidth=2,
                        label=f"{name} (10-step mean)")
        if key == PASS_KEY:
            if start_pass1 is not None:
                ax.axhline(start_pass1, color="grey", linestyle="--", linewidth=1, label="SFT")
            ax.set_ylim(0, 1)
        ax.set_xlabel("RL step")
        ax.set_title(label)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
