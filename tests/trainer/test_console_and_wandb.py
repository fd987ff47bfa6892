"""What a run tells its user: a console line per step, a progress bar only on a terminal, and an optional
Weights & Biases run (offline here) holding the same keys and values as metrics.jsonl."""

from __future__ import annotations

import glob
import importlib.util
import io
import json
import random
import struct
import sys
import time
from pathlib import Path

import pytest

from oreal.runtime.config import ConfigError, LogConfig
from oreal.runtime.metrics import WANDB_ID_FILE, MetricsLogger, console_line, format_duration

SEED = random.randrange(1_000_000)


def step_metrics(rng: random.Random) -> dict:
    return {"reward/mean": rng.random(), "reward/pass_rate": rng.random(), "filter/kept_prompts": rng.randint(0, 64),
            "loss/total": rng.uniform(-1, 1), "policy/kl": rng.random() / 100, "policy/entropy": rng.uniform(0, 3),
            "throughput/tokens_per_s": rng.uniform(100, 5000), "time/step": rng.uniform(1, 9),
            "time/rollout": rng.uniform(0, 5), "time/judge": rng.uniform(0, 1), "time/train": rng.uniform(0, 3),
            "time/sync": rng.uniform(0, 1)}


def test_console_line_shows_what_one_watches_in_order():
    rng = random.Random(SEED)
    m = step_metrics(rng)
    line = console_line(7, 90, m, eta_s=3725, name="oreal")
    labels = [part.split(" ")[0] for part in line.split(" | ")[1:]]
    assert line.startswith("oreal step 7/90 | ")
    assert labels[:8] == ["reward", "pass", "kept", "loss", "kl", "entropy", "tok/s", f"{m['time/step']:.1f}s"]
    assert f"reward {m['reward/mean']:.3f}" in line and f"kept {m['filter/kept_prompts']}" in line
    assert f"(rollout {m['time/rollout']:.1f}, judge {m['time/judge']:.1f}, train {m['time/train']:.1f}" in line
    assert line.endswith("ETA 1h02m")
    # Keys a step did not log (SFT has no reward) are left out, non-finite values too.
    sft = console_line(3, 10, {"loss/sft": 1.25, "policy/kl": float("nan"), "time/step": 0.5}, name="sft")
    assert sft == "sft step 3/10 | loss 1.2500 | 0.5s"
    assert [format_duration(s) for s in (0, 59.4, 61, 3599, 3600, 7501)] == ["0s", "59s", "1m01s", "59m59s",
                                                                              "1h00m", "2h05m"]


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_only_on_a_terminal_and_a_line_per_step(tmp_path, monkeypatch):
    rng = random.Random(SEED)
    monkeypatch.setattr("sys.stderr", io.StringIO())  # piped: no bar, plain lines
    logger = MetricsLogger(tmp_path / "piped", enabled=True, total_steps=3, tensorboard=False)
    assert logger._bar is None
    for step in (1, 2, 3):
        logger.log_step(step, step_metrics(rng))
    logger.close()
    lines = sys.stderr.getvalue().splitlines()
    assert [line.split(" | ")[0] for line in lines] == ["oreal step 1/3", "oreal step 2/3", "oreal step 3/3"]
    assert "ETA" in lines[0] and "\r" not in "".join(lines)

    terminal = FakeTerminal()
    monkeypatch.setattr("sys.stderr", terminal)
    logger = MetricsLogger(tmp_path / "tty", enabled=True, total_steps=2, tensorboard=False)
    assert logger._bar is not None
    logger.log_step(1, step_metrics(rng))
    logger.close()
    assert "oreal step 1/2 | reward" in terminal.getvalue() and "1/2" in terminal.getvalue()

    quiet = io.StringIO()
    monkeypatch.setattr("sys.stderr", quiet)
    logger = MetricsLogger(tmp_path / "quiet", enabled=True, total_steps=2, tensorboard=False, console=False)
    logger.log_step(1, step_metrics(rng))
    logger.close()
    assert quiet.getvalue() == ""


def wandb_history(run_dir) -> dict[int, dict]:
    """step -> logged values, read from an offline run's .wandb file (a LevelDB-style log of protobuf records:
    a 7-byte file header, then 32 KiB blocks of [crc32 u32, length u16, type u8] + payload)."""
    from wandb.proto import wandb_internal_pb2

    (path,) = glob.glob(str(run_dir / "run-*.wandb"))
    data = open(path, "rb").read()
    assert data[:4] == b":W&B"
    history, pos, pending, block = {}, 7, b"", 32768
    while pos + 7 <= len(data):
        room = block - pos % block
        if room < 7:
            pos += room
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:
            pos += room
            continue
        payload, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        pending = payload if kind in (1, 2) else pending + payload
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            if record.WhichOneof("record_type") == "history":
                # a key with "/" travels as its parts (`nested_key`)
                items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
                history.setdefault(items["_step"], {}).update(items)
    return history


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb is not installed (pip install wandb)")
def test_wandb_offline_run_holds_the_metrics_keys(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    rng = random.Random(SEED)
    log = LogConfig(tensorboard=False, progress_bar=False, console=False, wandb=True, wandb_project="oreal-test",
                    wandb_run_name=f"run-{SEED}")
    out = tmp_path / "run"
    logger = MetricsLogger.from_log_config(log, out, enabled=True, total_steps=3, run_config={"seed": SEED})
    for step in (1, 2):
        logger.log_step(step, step_metrics(rng))
    logger.log_eval(2, {"eval/mean_pass@1": rng.random(), "eval/heldout/pass@1": rng.random()})
    logger.close()
    run_id = (out / WANDB_ID_FILE).read_text().strip()
    (run_dir,) = glob.glob(str(out / "wandb" / f"offline-run-*-{run_id}"))
    # wandb's service process writes the file: give it a moment to finish after `finish()` returned
    deadline = time.monotonic() + 30
    while sorted(history := wandb_history(Path(run_dir))) != [1, 2] or "eval/mean_pass@1" not in history[2]:
        assert time.monotonic() < deadline, f"the offline run holds only {history}"
        time.sleep(0.2)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2] and sorted(history) == [1, 2]
    for record in records + evals:  # every key of metrics.jsonl / eval.jsonl, with its value, at its step
        logged = history[record["step"]]
        for key, value in record.items():
            if key not in ("step", "time"):
                assert logged[key] == pytest.approx(value, rel=1e-12), key

    # A resumed run continues the same W&B run.
    logger = MetricsLogger.from_log_config(log, out, enabled=True, total_steps=3, start_step=2)
    logger.log_step(3, step_metrics(rng))
    logger.close()
    assert (out / WANDB_ID_FILE).read_text().strip() == run_id
    assert len(glob.glob(str(out / "wandb" / f"offline-run-*-{run_id}"))) == 2


def test_wandb_option_without_the_package_is_one_clear_error(monkeypatch):
    from oreal.runtime import config as config_module

    real = importlib.util.find_spec
    monkeypatch.setattr(config_module.importlib.util, "find_spec",
                        lambda name, *a: None if name == "wandb" else real(name, *a))
    demo = Path(__file__).resolve().parents[2] / "configs" / "tiny_cpu.py"
    with pytest.raises(ConfigError, match=r"--log.wandb.*pip install"):
        config_module.parse_args(["--config", str(demo), "--log.wandb", "true"])
    assert config_module.parse_args(["--config", str(demo), "--log.wandb_project", "x"]).config.log.wandb is False
