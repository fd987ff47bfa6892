"""Launching `torchrun --nproc_per_node 2 -m oreal.train` from tests and reading what the runs wrote, shared by
the end-to-end test files."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A TCP port free on this machine now, for a rendezvous or a test server."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Launch:
    """One torchrun training job in its own process group, killed as a whole if it overruns its deadline.

    Output goes to `<output_dir>.log`; the progress bar is off so that the log stays readable.
    """

    def __init__(self, config: Path, output_dir: Path, *args: str, timeout_s: float):
        self.output_dir = output_dir
        self.log_path = output_dir.with_suffix(".log")
        self.timeout_s = timeout_s
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                   "--master_port", str(free_port()), "-m", "oreal.train", "--config", str(config),
                   "--output-dir", str(output_dir), "--log.progress_bar", "false", *args]
        # One thread per rank whatever the load: resumed runs must reproduce uninterrupted ones bit for bit
        # (see oreal.runtime.budget.explicit_threads).
        env = {**os.environ, "OMP_NUM_THREADS": "1", "OREAL_CPU_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        self.log = open(self.log_path, "w")
        self.process = subprocess.Popen(command, cwd=REPO, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        self.deadline = time.monotonic() + timeout_s

    def wait(self) -> int:
        try:
            return self.process.wait(timeout=max(1.0, self.deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
            pytest.fail(f"torchrun overran {self.timeout_s}s; log:\n{self.output()[-4000:]}")
        finally:
            self.log.close()

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")


def read_metrics(output_dir: Path) -> list[dict]:
    """The run's `metrics.jsonl`, one dict per step."""
    with open(output_dir / "metrics.jsonl") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def dcp_tensors(checkpoint: Path, tmp: Path) -> dict:
    """Every tensor of a distributed checkpoint by its flattened key, less the per-rank RNG states."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    target = tmp / f"{checkpoint.parent.parent.name}.pt"
    dcp_to_torch_save(str(checkpoint), str(target))
    state = torch.load(target, weights_only=False)
    flat = {}

    def walk(prefix, value):
        if isinstance(value, dict):
            for key, item in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), item)
        elif isinstance(value, torch.Tensor):
            flat[prefix] = value

    walk("", state)
    return {k: v for k, v in flat.items() if not k.startswith("rank")}  # per-rank RNG states differ by design
