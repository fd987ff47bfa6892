"""Exact resume in each rollout placement, end to end under `torchrun --nproc_per_node 2` on CPU.

For `--rollout.num_engines 2` (two dedicated engine processes) and `--rollout.placement colocated` (an
engine inside each trainer rank): a run of 3 steps, and a run killed (SIGKILL of rank 0) right after step
2's checkpoint then resumed; the resumed run's step-3 metrics, final weights and final checkpoint equal the
uninterrupted run's. The dedicated single-engine case is tests/trainer/test_torchrun.py's.
"""

from __future__ import annotations

import pytest
import torch
from torchrun_launch import REPO, Launch, dcp_tensors, read_metrics

TINY = REPO / "configs" / "tiny_cpu.py"
LAUNCH_TIMEOUT_S = 300
PLACEMENTS = {"two_engines": ("--rollout.num_engines", "2"), "colocated": ("--rollout.placement", "colocated")}
COMPARED = ("loss/total", "loss/positive", "loss/negative", "loss/kl", "token_rm/loss", "reward/mean",
            "filter/kept_samples", "response/length_mean", "policy/entropy", "grad_norm/policy", "lr/policy")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("placement_resume")
    common = ("--steps", "3", "--eval.interval", "0", "--checkpoint.interval", "2")
    first = {}
    for name, option in PLACEMENTS.items():
        first[name] = (Launch(TINY, root / f"{name}_straight", *common, *option, timeout_s=LAUNCH_TIMEOUT_S),
                       Launch(TINY, root / f"{name}_resumable", *common, *option, "--debug.kill_after_step", "2",
                              timeout_s=LAUNCH_TIMEOUT_S))
    results = {}
    for name, (straight, killed) in first.items():
        results[name] = {"straight": straight.wait(), "killed": killed.wait(),
                         "logs": [straight.output(), killed.output()]}
    resumed = {name: Launch(TINY, root / f"{name}_resumable", *common, *PLACEMENTS[name], "--resume",
                            timeout_s=LAUNCH_TIMEOUT_S) for name in PLACEMENTS}
    for name, launch in resumed.items():
        results[name]["resumed"] = launch.wait()
        results[name]["logs"].append(launch.output())
    return root, results


@pytest.mark.parametrize("name", list(PLACEMENTS))
def test_resume_is_exact(runs, name, tmp_path):
    root, results = runs
    r = results[name]
    assert r["straight"] == 0, r["logs"][0][-5000:]
    assert r["killed"] != 0, "the run meant to be killed after step 2 finished normally"
    assert r["resumed"] == 0, r["logs"][2][-5000:]
    assert "resumed from" in r["logs"][2]
    straight = read_metrics(root / f"{name}_straight")
    resumed = read_metrics(root / f"{name}_resumable")
    assert [m["step"] for m in straight] == [1, 2, 3] == [m["step"] for m in resumed]
    assert straight[2]["policy/updated"] == 1.0, "step 3 did not update the policy: weak test"
    for a, b in zip(straight, resumed):
        for key in COMPARED:
            assert str(a[key]) == str(b[key]), f"{name} step {a['step']} {key}: straight {a[key]} != resumed {b[key]}"

    from safetensors.torch import load_file

    final_a = load_file(str(root / f"{name}_straight" / "hf" / "model.safetensors"))
    final_b = load_file(str(root / f"{name}_resumable" / "hf" / "model.safetensors"))
    assert final_a.keys() == final_b.keys()
    for key in final_a:
        assert torch.equal(final_a[key], final_b[key]), f"{name}: final policy weight {key} differs"
    a = dcp_tensors(root / f"{name}_straight" / "checkpoints" / "step-000003", tmp_path)
    b = dcp_tensors(root / f"{name}_resumable" / "checkpoints" / "step-000003", tmp_path)
    assert a.keys() == b.keys() and any("optim" in k for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), f"{name}: final checkpoint tensor {key} differs"
