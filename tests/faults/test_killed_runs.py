"""Runs that are killed or misdirected, under `torchrun --nproc_per_node 2` on CPU (configs/tiny_cpu.py):

  straight   --steps 3                                    the reference
  killed     --steps 3 --debug.kill_mid_save_step 3      rank 1 is SIGKILLed half-way through step 3's save
  resumed    --steps 3 --resume (the killed run's folder) continues from step 2's checkpoint

The first two run side by side. A fresh run into a used folder is refused before it writes anything.
"""

from __future__ import annotations

import json

import pytest
import torch

from oreal.train import main as train_main
from torchrun_launch import REPO, Launch, dcp_tensors, read_metrics

TINY = REPO / "configs" / "tiny_cpu.py"
FAST = ("--eval.interval", "0", "--log.tensorboard", "false", "--checkpoint.interval", "2")
COMPARED = ("loss/total", "loss/positive", "loss/negative", "loss/kl", "token_rm/loss", "reward/mean",
            "filter/kept_samples", "policy/entropy", "grad_norm/policy", "grad_norm/token_rm", "lr/policy")


def _files(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("killed_runs")
    straight = Launch(TINY, root / "straight", "--steps", "3", *FAST, timeout_s=300)
    killed = Launch(TINY, root / "killed", "--steps", "3", *FAST, "--debug.kill_mid_save_step", "3", timeout_s=300)
    codes = {"straight": straight.wait(), "killed": killed.wait()}
    after_kill = {"checkpoints": sorted(p.name for p in (root / "killed" / "checkpoints").iterdir()),
                  "steps": [r["step"] for r in read_metrics(root / "killed")],
                  "step2": _files(root / "killed" / "checkpoints" / "step-000002")}
    resumed = Launch(TINY, root / "killed", "--steps", "3", *FAST, "--resume", timeout_s=300)
    codes["resumed"] = resumed.wait()
    return {"root": root, "codes": codes, "after_kill": after_kill,
            "logs": {"straight": straight.output(), "killed": killed.output(), "resumed": resumed.output()}}


def test_a_rank_killed_mid_save_resumes_from_the_previous_checkpoint_to_the_same_end(runs, tmp_path):
    codes, logs, root = runs["codes"], runs["logs"], runs["root"]
    assert codes["straight"] == 0, logs["straight"][-6000:]
    assert codes["killed"] != 0, "the run meant to lose a rank during step 3's save finished normally"
    # the half-written checkpoint never got a step-* name; step 2's is whole and stays so
    assert runs["after_kill"]["checkpoints"] == [".tmp-step-000003", "step-000002"], runs["after_kill"]
    assert runs["after_kill"]["steps"] == [1, 2, 3]
    assert codes["resumed"] == 0, logs["resumed"][-6000:]
    assert "resumed from" in logs["resumed"] and "step-000002 (step 2)" in logs["resumed"]

    straight, resumed = read_metrics(root / "straight"), read_metrics(root / "killed")
    assert [r["step"] for r in straight] == [1, 2, 3] == [r["step"] for r in resumed]
    for a, b in zip(straight, resumed):
        for key in COMPARED:
            assert str(a[key]) == str(b[key]), f"step {a['step']} {key}: straight {a[key]} != resumed {b[key]}"
    assert straight[2]["policy/updated"] == 1.0, "step 3 did not update the policy: a weak test"

    from safetensors.torch import load_file

    final_a = load_file(str(root / "straight" / "hf" / "model.safetensors"))
    final_b = load_file(str(root / "killed" / "hf" / "model.safetensors"))
    assert final_a.keys() == final_b.keys()
    assert all(torch.equal(final_a[k], final_b[k]) for k in final_a), "final weights differ"
    a = dcp_tensors(root / "straight" / "checkpoints" / "step-000003", tmp_path)
    b = dcp_tensors(root / "killed" / "checkpoints" / "step-000003", tmp_path)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "final checkpoints differ"
    # nothing already saved was lost: step 2's checkpoint is byte for byte what the killed run wrote
    assert _files(root / "killed" / "checkpoints" / "step-000002") == runs["after_kill"]["step2"]
    assert sorted(p.name for p in (root / "killed" / "checkpoints").iterdir()) == ["step-000002", "step-000003"]


def test_a_fresh_run_into_a_used_folder_is_refused_and_touches_nothing(runs, capsys):
    used = runs["root"] / "straight"
    before = _files(used)
    assert train_main(["--config", str(TINY), "--output-dir", str(used), "--steps", "3"]) == 2
    err = capsys.readouterr().err
    assert "already holds files; pass --resume to continue that run, --overwrite to delete it" in err
    assert _files(used) == before
    assert json.loads((used / "checkpoints" / "step-000003" / "meta.json").read_text())["step"] == 3
