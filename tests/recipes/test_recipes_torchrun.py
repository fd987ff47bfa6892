"""GRPO and PPO end to end under `torchrun --nproc_per_node 2` on CPU, on their tiny configs.

Five launches of `python -m torch.distributed.run ... -m oreal.train`:
  grpo        configs/tiny_cpu_grpo.py --steps 3                    3 steps: 2 epochs x 2 minibatches a step, eval,
                                                                     HF export
  early-stop  configs/tiny_cpu_grpo.py --steps 2, a bound of 1.0001  the first minibatch of a step (ratio exactly 1)
              on the largest importance ratio                        updates, the others are skipped and counted
  ppo         configs/tiny_cpu_ppo.py --steps 3                      critic warm-up (policy frozen) then PPO; the
                                                                     reference for the resume test
  killed      configs/tiny_cpu_ppo.py --steps 3, killed after 2      rank 0 SIGKILLs itself after step 2's checkpoint
  resumed     the killed run with --resume                           must end exactly as `ppo` did (critic included)
The first four run at the same time; the machine's idle time overlaps.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from oreal.algorithms.clipped import CLIPPED_METRICS
from oreal.algorithms.ppo import PPO_METRICS
from torchrun_launch import REPO, Launch, dcp_tensors, read_metrics

GRPO = REPO / "configs" / "tiny_cpu_grpo.py"
PPO = REPO / "configs" / "tiny_cpu_ppo.py"
LAUNCH_TIMEOUT_S = 300


def launch(config: Path, output_dir: Path, *args: str) -> Launch:
    return Launch(config, output_dir, "--log.tensorboard", "false", *args, timeout_s=LAUNCH_TIMEOUT_S)


def _number(value) -> float:
    return float(value)  # also parses the "nan" strings the log writes for NaN (JSON has none)


def _finite(record: dict, *keys: str) -> None:
    for key in keys:
        assert math.isfinite(_number(record[key])), f"step {record['step']}: {key} = {record[key]}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipes")
    quiet = ("--eval.interval", "0", "--checkpoint.export_hf", "false")
    launches = {
        "grpo": launch(GRPO, root / "grpo", "--steps", "3"),
        "early_stop": launch(GRPO, root / "early_stop", "--steps", "2", "--ppo.early_stop_statistic", "max",
                             "--ppo.early_stop_ratio", "1.0001", *quiet),
        "ppo": launch(PPO, root / "ppo", "--steps", "3", *quiet),
        "killed": launch(PPO, root / "resumable", "--steps", "3", "--debug.kill_after_step", "2", *quiet),
    }
    codes = {name: launch.wait() for name, launch in launches.items()}
    killed_steps = [r["step"] for r in read_metrics(root / "resumable")]
    launches["resumed"] = launch(PPO, root / "resumable", "--steps", "3", *quiet, "--resume")
    codes["resumed"] = launches["resumed"].wait()
    return {"root": root, "codes": codes, "logs": {name: launch.output() for name, launch in launches.items()},
            "killed_steps": killed_steps}


def _check_common(records: list[dict], required: tuple[str, ...]) -> None:
    for record in records:
        missing = [key for key in required if key not in record]
        assert not missing, f"step {record['step']} lacks {missing}"
        for key in required:
            _number(record[key])  # every value is a number
        assert record["faults/skipped_steps"] == 0
        assert 0 < record["response/length_mean"] <= 16 and record["packing/micro_batches"] >= 1
        assert record["time/step"] >= record["time/rollout"] + record["time/judge"] + record["time/train"] - 1e-6
        assert record["time/train"] >= record["time/logprobs"] > 0


def test_grpo_three_steps(runs):
    assert runs["codes"]["grpo"] == 0, runs["logs"]["grpo"][-6000:]
    out = runs["root"] / "grpo"
    records = read_metrics(out)
    assert [r["step"] for r in records] == [1, 2, 3]
    _check_common(records, CLIPPED_METRICS)
    for r in records:
        # +5 / -5 rewards, advantages centred within every prompt
        assert r["reward/scaled_mean"] == pytest.approx(5 * r["reward/mean"])
        assert abs(r["advantage/mean"]) < 1e-4 and r["advantage/abs_mean"] >= 0
        # 2 epochs x 2 minibatches, all applied (RLinf's bound of 5 is far away)
        assert r["update/minibatches"] == 4 and r["update/applied"] == 4
        assert r["update/skipped_minibatches"] == 0 == r["update/skipped_minibatches_total"]
        _finite(r, "loss/policy", "policy/entropy", "policy/kl", "policy/clip_fraction", "policy/ratio_mean",
                "policy/ratio_max", "grad_norm/policy")
        assert 0 <= r["policy/clip_fraction"] <= 1 and r["policy/kl"] >= 0
        assert 0.5 < r["policy/ratio_mean"] < 2 and r["policy/ratio_max"] >= 1 - 1e-6
        assert r["policy/updated"] == 1 and r["time/sync"] > 0 and r["lr/policy"] > 0
    assert any(r["policy/ratio_max"] > 1 + 1e-4 for r in records), "the policy never moved between minibatches"
    evals = [json.loads(line) for line in open(out / "eval.jsonl")]
    assert [e["step"] for e in evals] == [3]
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == ["step-000002", "step-000003"]
    from safetensors.torch import load_file

    exported = load_file(str(out / "hf" / "model.safetensors"))
    initial = load_file(str(out / "tiny_model" / "model.safetensors"))
    assert exported.keys() == initial.keys()
    assert any(not torch.equal(exported[name], initial[name]) for name in exported)


def test_early_stop_skips_and_counts(runs):
    assert runs["codes"]["early_stop"] == 0, runs["logs"]["early_stop"][-6000:]
    records = read_metrics(runs["root"] / "early_stop")
    assert [r["step"] for r in records] == [1, 2]
    _check_common(records, CLIPPED_METRICS)
    total = 0
    for r in records:
        assert r["update/minibatches"] == 4
        # The first minibatch of a step sees ratio 1 (old log-probs are this policy's) and updates; once the
        # policy has moved, the largest ratio passes 1.0001 and the minibatch is skipped.
        assert r["update/applied"] >= 1 and r["update/skipped_minibatches"] >= 1
        assert r["update/applied"] + r["update/skipped_minibatches"] == 4
        total += r["update/skipped_minibatches"]
        assert r["update/skipped_minibatches_total"] == total
        assert r["policy/ratio_max"] > 1.0001 and r["policy/updated"] == 1
        _finite(r, "grad_norm/policy", "policy/clip_fraction", "policy/ratio_mean")
    assert "skipped the policy update" not in runs["logs"]["early_stop"]  # an early-stop is not a fault


def test_ppo_three_steps(runs):
    assert runs["codes"]["ppo"] == 0, runs["logs"]["ppo"][-6000:]
    records = read_metrics(runs["root"] / "ppo")
    assert [r["step"] for r in records] == [1, 2, 3]
    _check_common(records, PPO_METRICS)
    first = records[0]
    # Step 1: the policy is frozen while the critic (zero-initialised value head) learns alone.
    assert first["policy/frozen"] == 1 and first["policy/updated"] == 0 and first["update/minibatches"] == 0
    assert math.isnan(_number(first["policy/clip_fraction"])) and first["lr/policy"] == 0
    assert first["critic/value_mean"] == 0 and first["critic/explained_variance"] == 0
    for r in records:
        _finite(r, "critic/value_loss", "critic/explained_variance", "critic/return_mean", "grad_norm/critic")
        assert r["critic/value_loss"] > 0 and r["critic/explained_variance"] <= 1 and r["lr/critic"] > 0
        assert r["reward/scaled_mean"] == pytest.approx(r["reward/mean"])  # +1 / -1
    for r in records[1:]:
        assert r["policy/frozen"] == 0 and r["policy/updated"] == 1 and r["time/sync"] > 0
        assert r["update/minibatches"] == 4 and r["update/applied"] == 4 and r["update/skipped_minibatches"] == 0
        _finite(r, "loss/policy", "policy/entropy", "policy/kl", "policy/clip_fraction", "policy/ratio_mean",
                "policy/ratio_max", "grad_norm/policy")
        assert 0 <= r["policy/clip_fraction"] <= 1 and r["policy/kl"] >= 0
        assert r["critic/value_mean"] != 0  # the critic has learnt something since step 1


def test_ppo_resume_is_exact_with_the_critic(runs, tmp_path):
    codes = runs["codes"]
    assert codes["killed"] != 0, "the run meant to be killed after step 2 finished normally"
    assert runs["killed_steps"] == [1, 2]
    assert codes["resumed"] == 0, runs["logs"]["resumed"][-6000:]
    assert "resumed from" in runs["logs"]["resumed"]
    straight, resumed = read_metrics(runs["root"] / "ppo"), read_metrics(runs["root"] / "resumable")
    assert [r["step"] for r in straight] == [1, 2, 3] == [r["step"] for r in resumed]
    compared = ("loss/policy", "policy/clip_fraction", "policy/ratio_max", "critic/value_loss",
                "critic/explained_variance", "critic/value_mean", "reward/mean", "grad_norm/policy",
                "grad_norm/critic", "lr/policy", "lr/critic")
    for a, b in zip(straight, resumed):
        for key in compared:
            assert str(a[key]) == str(b[key]), f"step {a['step']} {key}: straight {a[key]} != resumed {b[key]}"
    a = dcp_tensors(runs["root"] / "ppo" / "checkpoints" / "step-000003", tmp_path)
    b = dcp_tensors(runs["root"] / "resumable" / "checkpoints" / "step-000003", tmp_path)
    assert a.keys() == b.keys()
    assert any(k.startswith("model.critic.model") for k in a) and any(k.startswith("model.critic.optim") for k in a)
    for name in a:
        assert torch.equal(a[name], b[name]), f"final checkpoint tensor {name} differs"
