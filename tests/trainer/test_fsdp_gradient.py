"""Over 2 ranks: the trainer's FSDP2 gradient equals the single-process gradient of the global OREAL loss, and
generation requests travel to rank 0's engine and back (an engine failure reaches every rank)."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path
from torchrun_launch import free_port

SCRIPT = Path(__file__).with_name("fsdp_gradient_check.py")


def test_distributed_gradient_is_the_global_gradient(tmp_path):
    out = tmp_path / "result.json"
    seed = random.randrange(1 << 30)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), str(SCRIPT), str(out), str(seed)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=240,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    r = json.loads(out.read_text())
    assert (r["pos"], r["neg"]) == (r["pos_ref"], r["neg_ref"])  # counts all-reduced over ranks
    assert r["micro_batches"] >= 2 and r["sequences"] >= 10
    assert abs(r["loss"] - r["reference_loss"]) <= 1e-5 * max(1.0, abs(r["reference_loss"])), r
    assert r["worst_relative"] < 1e-4, r
    for rank, routing in enumerate(r["routing"]):
        assert routing["routed"], f"rank {rank} got samples of other prompts"
        assert "rollout engine 0 of 1" in routing["failure"] and "owned by trainer rank 0" in routing["failure"]
        assert "exit code 17" in routing["failure"]
    assert r["routing"][0]["engine_calls"] == 3  # one engine call per request, whatever the number of ranks
