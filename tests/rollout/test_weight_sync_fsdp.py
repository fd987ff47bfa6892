"""Must-show: FSDP2 trainer ranks (torchrun, gloo) -> transformers engine process, bit for bit."""

import json
import os
import subprocess
import sys
from pathlib import Path

from torchrun_launch import free_port

WORKER = Path(__file__).resolve().parent / "fsdp_sync_worker.py"


def test_fsdp2_sync_is_bit_exact_and_greedy_generation_matches(tmp_path):
    env = dict(os.environ, OUT_DIR=str(tmp_path), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(WORKER)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())

    assert r0["modes"] == ["shard0"]  # every parameter is an FSDP2 Shard(0) DTensor
    assert (r0["gather"], r0["receive"], r0["gather2"]) == ("shm", "inplace", "p2p")
    assert r0["buckets"] > 5 and "model.embed_tokens.weight" in r0["split"]
    assert not all(r0["before"]["bit_equal"].values())  # the engine really started elsewhere

    for key in ("after1", "after2"):  # after an optimizer step and a sync: bit for bit
        assert r0[key]["names_equal"]
        assert all(r0[key]["bit_equal"].values()), [n for n, ok in r0[key]["bit_equal"].items() if not ok]
        assert r0[key]["max_abs_diff"] == 0.0
    assert (r0["version1"], r0["version2"]) == (1, 2) == (r1["version1"], r1["version2"])

    assert r0["greedy_engine"] == r0["greedy_trainer"]
    assert r0["greedy_logprob_diff"] < 1e-4
    assert r0["versions_seen"] == [1]

    for r in (r0, r1):  # the failed sync raised the same error on both ranks
        assert r["fault"].startswith("EngineSyncError") and "must not be used" in r["fault"]
    assert r0["after_fault_generate"].startswith("EngineBrokenError")
