"""Per-step metrics: one JSON object per line in `<output_dir>/metrics.jsonl`, TensorBoard scalars, and a
progress bar with ETA, all on rank 0 (other ranks get a logger that does nothing).

On resume the JSONL log is cut back to the steps the checkpoint covers, so a run killed after
logging a step it never checkpointed does not list that step twice.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Mapping

METRICS_FILE = "metrics.jsonl"
EVAL_FILE = "eval.jsonl"


def _jsonable(value: Any) -> Any:
    """Plain JSON numbers (non-finite floats become strings, as JSON has no NaN)."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def truncate_jsonl(path: Path, last_step: int) -> None:
    """Keep only the records of `path` whose `step` is at most `last_step` (atomic rewrite)."""
    if not path.exists():
        return
    kept = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a kill: drop it
                continue
            if record.get("step", 0) <= last_step:
                kept.append(line)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.writelines(line + "\n" for line in kept)
    os.replace(tmp, path)


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


class MetricsLogger:
    """Writes step metrics to JSONL and TensorBoard and drives the progress bar (rank 0 only)."""

    def __init__(self, output_dir: str | Path, *, enabled: bool, total_steps: int, start_step: int = 0,
                 tensorboard: bool = True, progress_bar: bool = True):
        self.enabled = enabled
        self.total_steps = total_steps
        self._writer = None
        self._bar = None
        if not enabled:
            return
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.output_dir / METRICS_FILE
        self.eval_path = self.output_dir / EVAL_FILE
        truncate_jsonl(self.path, start_step)
        truncate_jsonl(self.eval_path, start_step)
        if tensorboard:
            self._writer = _summary_writer(self.output_dir / "tensorboard", purge_step=start_step + 1)
        if progress_bar:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, desc="oreal", unit="step", dynamic_ncols=True,
                             file=sys.stderr, mininterval=0)

    def log_step(self, step: int, metrics: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": time.time(), **{k: _jsonable(v) for k, v in metrics.items()}}
        self._append(self.path, record)
        self._scalars(step, metrics)
        if self._bar is not None:
            shown = {key: metrics[key] for key in ("reward/mean", "loss/total", "throughput/tokens_per_s")
                     if key in metrics and isinstance(metrics[key], (int, float))}
            self._bar.set_postfix({k.split("/")[-1]: f"{v:.4g}" for k, v in shown.items()}, refresh=False)
            self._bar.update(1)

    def log_eval(self, step: int, metrics: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        self._append(self.eval_path, {"step": step, "time": time.time(),
                                      **{k: _jsonable(v) for k, v in metrics.items()}})
        self._scalars(step, metrics)
        if self._bar is not None:
            self._bar.write(f"step {step} eval: " + ", ".join(
                f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float)))

    def message(self, text: str) -> None:
        """A line on the console that does not break the progress bar."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.flush()
            self._writer.close()
            self._writer = None
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def _append(self, path: Path, record: dict) -> None:
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def _scalars(self, step: int, metrics: Mapping[str, Any]) -> None:
        if self._writer is None:
            return
        for key, value in metrics.items():
            value = _jsonable(value)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self._writer.add_scalar(key, value, step)
        self._writer.flush()


def _summary_writer(log_dir: Path, purge_step: int):
    """TensorBoard's writer; without the `tensorboard` package, a warning and no events (JSONL still works)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        warnings.warn(f"TensorBoard events disabled: {exc}; install `tensorboard`", stacklevel=3)
        return None
    return SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)
