"""Per-step metrics, all on rank 0 (other ranks get a logger that does nothing):

- `<output_dir>/metrics.jsonl`: one JSON object per step (and `eval.jsonl` per evaluation);
- TensorBoard scalars (`log.tensorboard`);
- Weights & Biases (`log.wandb`, optional dependency `pip install oreal[wandb]`): the same keys as
  metrics.jsonl, at the same steps; `WANDB_MODE=offline` (or any other wandb setting in the
  environment) is honoured, and a resumed run continues the same W&B run (its id is kept in
  `<output_dir>/wandb_run_id.txt`);
- the console (`log.console`): one line per step with the numbers one watches (reward, pass rate,
  kept prompts, loss, KL, entropy, tokens/s, where the step's time went, ETA), on stderr; and a
  tqdm progress bar (`log.progress_bar`) only where stderr is a terminal, so logs piped to a file
  stay one clean line per step.

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
from dataclasses import dataclass
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
    """Writes step metrics to JSONL, TensorBoard and W&B, and to the console (rank 0 only)."""

    def __init__(self, output_dir: str | Path, *, enabled: bool, total_steps: int, start_step: int = 0,
                 tensorboard: bool = True, progress_bar: bool = True, console: bool = True,
                 wandb: "WandbOptions | None" = None, name: str = "oreal"):
        self.enabled = enabled
        self.total_steps = total_steps
        self.name = name
        self._writer = None
        self._bar = None
        self._wandb = None
        self._console = console
        self._start_step = start_step
        self._started = time.perf_counter()
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
        if wandb is not None:
            self._wandb = start_wandb_run(wandb, self.output_dir, resumed=start_step > 0)
        if progress_bar and _is_terminal(sys.stderr):
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, desc=name, unit="step", dynamic_ncols=True,
                             file=sys.stderr, mininterval=0)

    @classmethod
    def from_log_config(cls, log, output_dir: str | Path, *, enabled: bool, total_steps: int, start_step: int = 0,
                        run_config: Mapping[str, Any] | None = None, name: str = "oreal") -> "MetricsLogger":
        """The logger a run's `log` section (`oreal.runtime.config.LogConfig`) asks for."""
        wandb = None
        if log.wandb:
            wandb = WandbOptions(project=log.wandb_project, run_name=log.wandb_run_name, entity=log.wandb_entity,
                                 config=run_config)
        return cls(output_dir, enabled=enabled, total_steps=total_steps, start_step=start_step,
                   tensorboard=log.tensorboard, progress_bar=log.progress_bar, console=log.console, wandb=wandb,
                   name=name)

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
        if self._console:
            self.message(console_line(step, self.total_steps, metrics, eta_s=self._eta(step), name=self.name))

    def _eta(self, step: int) -> float | None:
        """Seconds left at the mean pace of the steps this process has run."""
        done = step - self._start_step
        if done <= 0:
            return None
        return (time.perf_counter() - self._started) / done * max(self.total_steps - step, 0)

    def log_eval(self, step: int, metrics: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        self._append(self.eval_path, {"step": step, "time": time.time(),
                                      **{k: _jsonable(v) for k, v in metrics.items()}})
        self._scalars(step, metrics)
        if self._console or self._bar is not None:
            self.message(f"{self.name} step {step} eval: " + ", ".join(
                f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float)))

    def message(self, text: str) -> None:
        """A line on the console that does not break the progress bar."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text, file=sys.stderr)  # above the bar, on its stream (tqdm defaults to stdout)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
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
        if self._writer is None and self._wandb is None:
            return
        numbers = {}
        for key, value in metrics.items():
            if hasattr(value, "item"):
                value = value.item()
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                numbers[key] = value
        if self._writer is not None:
            for key, value in numbers.items():
                if math.isfinite(value):  # TensorBoard plots no gap for a NaN; W&B does
                    self._writer.add_scalar(key, value, step)
            self._writer.flush()
        if self._wandb is not None:
            self._wandb.log(numbers, step=step)


def _summary_writer(log_dir: Path, purge_step: int):
    """TensorBoard's writer; without the `tensorboard` package, a warning and no events (JSONL still works)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        warnings.warn(f"TensorBoard events disabled: {exc}; install `tensorboard`", stacklevel=3)
        return None
    return SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)


# --------------------------------------------------------------------------------------------------
# The console line
# --------------------------------------------------------------------------------------------------

# (metric key, label, format) in the order they are shown; a key the step did not log is left out.
CONSOLE_FIELDS = (
    ("reward/mean", "reward", "{:.3f}"),
    ("reward/pass_rate", "pass", "{:.3f}"),
    ("filter/kept_prompts", "kept", "{:.0f}"),
    ("loss/total", "loss", "{:.4g}"),
    ("loss/sft", "loss", "{:.4f}"),
    ("policy/kl", "kl", "{:.3g}"),
    ("policy/entropy", "entropy", "{:.3f}"),
    ("throughput/tokens_per_s", "tok/s", "{:.0f}"),
)
TIME_PHASES = ("rollout", "judge", "train", "sync", "eval")


def _number(value: Any) -> float | None:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def format_duration(seconds: float) -> str:
    """`42s`, `3m07s`, `2h05m`."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def console_line(step: int, total: int, metrics: Mapping[str, Any], *, eta_s: float | None = None,
                 name: str = "oreal") -> str:
    """One line for a step: `oreal step 3/90 | reward 0.412 | ... | 12.3s (rollout 8.1, train 3.2) | ETA 17m02s`."""
    parts = [f"{name} step {step}/{total}"]
    shown = set()
    for key, label, fmt in CONSOLE_FIELDS:
        value = _number(metrics.get(key))
        if value is not None and label not in shown:
            parts.append(f"{label} {fmt.format(value)}")
            shown.add(label)
    step_s = _number(metrics.get("time/step"))
    split = [(phase, _number(metrics.get(f"time/{phase}"))) for phase in TIME_PHASES]
    split_text = ", ".join(f"{phase} {value:.1f}" for phase, value in split if value is not None and value > 0)
    if step_s is not None:
        parts.append(f"{step_s:.1f}s" + (f" ({split_text})" if split_text else ""))
    elif split_text:
        parts.append(split_text)
    if eta_s is not None:
        parts.append(f"ETA {format_duration(eta_s)}")
    return " | ".join(parts)


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


# --------------------------------------------------------------------------------------------------
# Weights & Biases
# --------------------------------------------------------------------------------------------------

WANDB_ID_FILE = "wandb_run_id.txt"


@dataclass(frozen=True)
class WandbOptions:
    """Where a run goes on W&B; everything else (mode, API key, base URL) comes from wandb's environment
    variables, so `WANDB_MODE=offline` keeps the run on disk under `<output_dir>/wandb/`."""

    project: str = "oreal"
    run_name: str = ""  # "": the output directory's name
    entity: str = ""
    config: Mapping[str, Any] | None = None  # the resolved run config, shown on the run's page


def wandb_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("wandb") is not None


def start_wandb_run(options: WandbOptions, output_dir: Path, *, resumed: bool):
    """A W&B run writing under `output_dir`; a resumed training run continues the run it started."""
    try:
        import wandb
    except ImportError:
        raise RuntimeError("--log.wandb true needs the wandb package: pip install 'oreal[wandb]' "
                           "(or pip install wandb)") from None
    id_file = output_dir / WANDB_ID_FILE
    run_id = id_file.read_text().strip() if resumed and id_file.is_file() else None
    run = wandb.init(project=options.project or None, entity=options.entity or None,
                     name=options.run_name or output_dir.resolve().name, dir=str(output_dir),
                     config=dict(options.config) if options.config else None, id=run_id,
                     resume="allow" if run_id else None,
                     settings=wandb.Settings(console="off", x_disable_stats=True))
    id_file.write_text(run.id + "\n")
    return run
