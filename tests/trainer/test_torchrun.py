"""End to end under `torchrun --nproc_per_node 2` on CPU: the tiny config trains for real, and resume is exact.

Four launches of `python -m torch.distributed.run ... -m oreal.train --config configs/tiny_cpu.py`:
  e2e       --steps 3 --debug.nonfinite_at_step 3      the whole step (rollout, judge, token RM, loss, optimizer,
                                                        sync, checkpoint), then a NaN loss at step 3 is skipped
  straight  --steps 4                                   reference for the resume test
  killed    --steps 4 --debug.kill_after_step 2         rank 0 SIGKILLs itself right after step 2's checkpoint
  resumed   --steps 4 --resume (same output dir)        continues the killed run
The first three run at the same time (they are independent; the machine's idle time overlaps).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from oreal.algorithms.oreal import REQUIRED_METRICS
from torchrun_launch import REPO, Launch, dcp_tensors, read_metrics

TINY = REPO / "configs" / "tiny_cpu.py"
LAUNCH_TIMEOUT_S = 240


def launch(output_dir: Path, *args: str) -> Launch:
    return Launch(TINY, output_dir, *args, timeout_s=LAUNCH_TIMEOUT_S)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("torchrun")
    e2e = launch(root / "e2e", "--steps", "3", "--debug.nonfinite_at_step", "3")
    straight = launch(root / "straight", "--steps", "4")
    killed = launch(root / "resumable", "--steps", "4", "--debug.kill_after_step", "2")
    codes = {"e2e": e2e.wait(), "straight": straight.wait(), "killed": killed.wait()}
    killed_checkpoints = sorted(p.name for p in (root / "resumable" / "checkpoints").glob("step-*"))
    killed_steps = [r["step"] for r in read_metrics(root / "resumable")]
    resumed = launch(root / "resumable", "--steps", "4", "--resume")
    codes["resumed"] = resumed.wait()
    return {"root": root, "codes": codes, "logs": {"e2e": e2e.output(), "straight": straight.output(),
                                                    "killed": killed.output(), "resumed": resumed.output()},
            "killed_checkpoints": killed_checkpoints, "killed_steps": killed_steps}


def _number(value) -> float:
    return float(value)  # also parses the "nan" strings the log writes for NaN (JSON has none)


def test_three_steps_end_to_end(runs):
    assert runs["codes"]["e2e"] == 0, runs["logs"]["e2e"][-6000:]
    out = runs["root"] / "e2e"
    records = read_metrics(out)
    assert [r["step"] for r in records] == [1, 2, 3]
    for record in records:
        missing = [key for key in REQUIRED_METRICS if key not in record]
        assert not missing, f"step {record['step']} lacks {missing}"
        for key in REQUIRED_METRICS:
            _number(record[key])  # every value is a number
    # Step 1: the policy is frozen while the token RM trains.
    assert records[0]["policy/frozen"] == 1.0 and records[0]["policy/updated"] == 0.0
    assert records[0]["lr/policy"] == 0.0 and records[0]["lr/token_rm"] > 0
    for r in records:
        if r["filter/kept_samples"] == 0:
            continue
        assert math.isfinite(_number(r["token_rm/loss"])) and 0.0 <= r["token_rm/accuracy"] <= 1.0
        assert r["filter/kept_samples"] == 2 * r["filter/kept_prompts"]  # one correct + one wrong each
        assert r["packing/micro_batches"] >= 1
        if r["step"] < 3:  # the terms add up to the fused loss
            parts = r["loss/positive"] + r["loss/negative"] + r["loss/kl"]
            assert abs(parts - r["loss/total"]) <= 1e-5 + 1e-4 * abs(r["loss/total"])
    step2, step3 = records[1], records[2]
    assert step2["filter/kept_samples"] > 0, "step 2 kept nothing: the optimizer and the sync were not exercised"
    assert step2["policy/updated"] == 1.0 and step2["time/sync"] > 0 and step2["lr/policy"] > 0
    assert math.isfinite(_number(step2["grad_norm/policy"])) and step2["faults/skipped_steps"] == 0
    # Step 3's policy loss is made NaN (--debug.nonfinite_at_step 3): the update is skipped and counted,
    # nothing is synced, and the token RM still trains. The run is seeded: step 3 keeps samples (3 prompts).
    assert step3["filter/kept_samples"] > 0, "step 3 kept nothing: the poisoned loss was never computed"
    assert math.isnan(_number(step3["loss/total"])) and step3["policy/updated"] == 0.0
    assert step3["faults/skipped_steps"] == 1 and step3["time/sync"] == 0
    assert math.isfinite(_number(step3["token_rm/loss"]))
    assert "skipped the policy update" in runs["logs"]["e2e"]
    for r in records:
        assert 0 < r["response/length_mean"] <= 16 and r["response/length_max"] <= 16
        assert r["reward/mean"] == pytest.approx(2 * r["reward/pass_rate"] - 1)
        assert r["time/step"] >= r["time/rollout"] + r["time/judge"] + r["time/train"] + r["time/sync"] - 1e-6
        assert r["throughput/tokens_per_s"] > 0

    # Checkpoints (last 2 kept, nothing half-written), TensorBoard events, evaluation, best, HF export.
    checkpoints = sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith(("step-", ".tmp")))
    assert checkpoints == ["step-000002", "step-000003"]
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    evals = [json.loads(line) for line in open(out / "eval.jsonl")]
    assert [e["step"] for e in evals] == [2, 3]
    assert all(0 <= e["eval/tiny_arith_eval/pass@1"] <= e["eval/tiny_arith_eval/pass@2"] <= 1 for e in evals)
    best = json.loads((out / "checkpoints" / "best.json").read_text())
    assert best["step"] in (2, 3) and (out / "checkpoints" / best["checkpoint"]).is_dir()

    from safetensors.torch import load_file

    exported = load_file(str(out / "hf" / "model.safetensors"))
    initial = load_file(str(out / "tiny_model" / "model.safetensors"))
    assert exported.keys() == initial.keys()
    changed = [name for name in exported if not torch.equal(exported[name], initial[name])]
    assert changed, "the policy was updated at step 2, yet the exported weights equal the initial ones"
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out / "hf")
    assert sum(p.numel() for p in model.parameters()) > 0


def test_resume_is_exact(runs, tmp_path):
    codes = runs["codes"]
    assert codes["straight"] == 0, runs["logs"]["straight"][-6000:]
    assert codes["killed"] != 0, "the run meant to be killed after step 2 finished normally"
    assert runs["killed_checkpoints"] == ["step-000002"], runs["killed_checkpoints"]
    assert runs["killed_steps"] == [1, 2]
    assert codes["resumed"] == 0, runs["logs"]["resumed"][-6000:]
    assert "resumed from" in runs["logs"]["resumed"]

    straight = read_metrics(runs["root"] / "straight")
    resumed = read_metrics(runs["root"] / "resumable")
    assert [r["step"] for r in straight] == [1, 2, 3, 4] == [r["step"] for r in resumed]
    compared = ("loss/total", "loss/positive", "loss/negative", "loss/kl", "token_rm/loss", "token_rm/accuracy",
                "reward/mean", "filter/kept_samples", "response/length_mean", "policy/entropy", "policy/kl",
                "grad_norm/policy", "grad_norm/token_rm", "lr/policy", "lr/token_rm")
    for a, b in zip(straight, resumed):
        for key in compared:
            assert str(a[key]) == str(b[key]), f"step {a['step']} {key}: straight {a[key]} != resumed {b[key]}"
    assert any(r["policy/updated"] for r in straight[2:]), "steps 3-4 never updated the policy: weak test"

    from safetensors.torch import load_file

    final_a = load_file(str(runs["root"] / "straight" / "hf" / "model.safetensors"))
    final_b = load_file(str(runs["root"] / "resumable" / "hf" / "model.safetensors"))
    assert final_a.keys() == final_b.keys()
    for name in final_a:
        assert torch.equal(final_a[name], final_b[name]), f"final policy weight {name} differs"
    # The whole final checkpoint: policy, token RM, both optimizers' states.
    a = dcp_tensors(runs["root"] / "straight" / "checkpoints" / "step-000004", tmp_path)
    b = dcp_tensors(runs["root"] / "resumable" / "checkpoints" / "step-000004", tmp_path)
    assert a.keys() == b.keys() and any("token_rm" in k for k in a) and any("optim" in k for k in a)
    for name in a:
        assert torch.equal(a[name], b[name]), f"final checkpoint tensor {name} differs"
