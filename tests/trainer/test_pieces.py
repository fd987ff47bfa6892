"""The trainer's single-purpose pieces, in one process: schedules, pass@k, the filter, the skip-on-non-finite
update, metrics files, checkpoints, the token RM, the policy/reference modules and the loss terms."""

from __future__ import annotations

import itertools
import json
import math
import random

import numpy as np
import pytest
import torch

import oreal
from oreal.runtime.checkpoint import CheckpointError, CheckpointManager, latest_checkpoint, list_checkpoints
from oreal.data import PromptSampler, TrainingSample, pack_rollouts
from oreal.runtime.evaluation import pass_at_k
from oreal.algorithms.filtering import select_samples
from oreal.runtime.metrics import MetricsLogger, read_jsonl
from oreal.runtime.schedule import WarmupCosine, warmup_cosine
from oreal.algorithms.oreal import apply_update


# --------------------------------------------------------------------------------------------------
# LR schedule
# --------------------------------------------------------------------------------------------------

def test_warmup_cosine_shape():
    rng = random.Random()
    for _ in range(20):
        warmup, total = rng.randint(0, 10), rng.randint(11, 200)
        floor = rng.uniform(0.0, 0.9)
        f = WarmupCosine(warmup, total, floor)
        for s in range(warmup):
            assert f(s) == pytest.approx((s + 1) / warmup)
        assert f(warmup) == pytest.approx(1.0)
        assert f(total) == pytest.approx(floor) and f(total + 5) == pytest.approx(floor)
        decay = [f(s) for s in range(warmup, total + 1)]
        assert all(a >= b - 1e-12 for a, b in zip(decay, decay[1:]))
        mid = warmup + (total - warmup) / 2
        if float(mid).is_integer():
            assert f(int(mid)) == pytest.approx(floor + (1 - floor) / 2)


def test_scheduler_drives_the_optimizer_lr():
    param = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.AdamW([param], lr=5e-7)
    scheduler = warmup_cosine(optimizer, lr=5e-7, min_lr=1e-7, warmup_steps=10, total_steps=80)
    lrs = []
    for _ in range(90):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == pytest.approx(5e-8) and lrs[9] == pytest.approx(5e-7)
    assert lrs[80] == pytest.approx(1e-7) and min(lrs[10:]) >= 1e-7 - 1e-15


# --------------------------------------------------------------------------------------------------
# pass@k and the sample filter
# --------------------------------------------------------------------------------------------------

def test_pass_at_k_matches_enumeration():
    rng = random.Random()
    for _ in range(30):
        n = rng.randint(1, 8)
        c = rng.randint(0, n)
        k = rng.randint(1, n)
        outcomes = [True] * c + [False] * (n - c)
        subsets = list(itertools.combinations(range(n), k))
        expected = sum(any(outcomes[i] for i in s) for s in subsets) / len(subsets)
        assert pass_at_k(n, c, k) == pytest.approx(expected)
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)


def test_filter_keeps_one_correct_and_one_wrong_of_mixed_prompts():
    rng = np.random.default_rng()
    K, prompts = 8, 40
    correct = (rng.random(K * prompts) < rng.random(prompts).repeat(K)).tolist()
    groups = np.arange(prompts).repeat(K).tolist()
    kept = select_samples(correct, groups, seed=3, step=7)
    by_group = {}
    for i in kept:
        by_group.setdefault(groups[i], []).append(correct[i])
    for g in range(prompts):
        outcomes = correct[g * K:(g + 1) * K]
        if all(outcomes) or not any(outcomes):
            assert g not in by_group
        else:
            assert sorted(by_group[g]) == [False, True]
    # Deterministic, and a prompt's choice does not depend on the other prompts (i.e. on the rank layout).
    assert kept == select_samples(correct, groups, seed=3, step=7)
    half = prompts // 2 * K
    assert [i for i in kept if i >= half] == [half + i for i in select_samples(correct[half:], groups[half:],
                                                                               seed=3, step=7)]
    assert select_samples(correct, groups, seed=3, step=8) != kept or len(kept) < 4
    every = select_samples(correct, groups, seed=3, step=7, one_pair_per_prompt=False)
    assert set(kept) <= set(every) and all(0 < sum(correct[g * K:(g + 1) * K]) < K for g in {groups[i] for i in every})


# --------------------------------------------------------------------------------------------------
# Skip on a non-finite update
# --------------------------------------------------------------------------------------------------

def _model_and_optimizer():
    model = torch.nn.Linear(5, 3)
    return model, torch.optim.AdamW(model.parameters(), lr=0.1)


def test_apply_update_steps_and_clips():
    model, optimizer = _model_and_optimizer()
    before = [p.detach().clone() for p in model.parameters()]
    (model(torch.randn(4, 5)).pow(2).sum() * 100).backward()
    expected = torch.sqrt(sum(p.grad.pow(2).sum() for p in model.parameters())).item()
    norm, stepped = apply_update(model, optimizer, max_norm=1.0)
    assert stepped and norm == pytest.approx(expected, rel=1e-5) and norm > 1.0
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("poison", ["nan_grad", "inf_grad", "nan_loss"])
def test_apply_update_skips_non_finite(poison):
    model, optimizer = _model_and_optimizer()
    model(torch.randn(4, 5)).sum().backward()
    if poison == "nan_grad":
        model.weight.grad[0, 0] = math.nan
    elif poison == "inf_grad":
        model.bias.grad[1] = math.inf
    before = [p.detach().clone() for p in model.parameters()]
    norm, stepped = apply_update(model, optimizer, max_norm=1.0, loss_is_finite=poison != "nan_loss")
    assert not stepped
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert not optimizer.state  # no moment was touched
    assert all(p.grad is None for p in model.parameters())
    assert (not math.isfinite(norm)) == (poison != "nan_loss")


# --------------------------------------------------------------------------------------------------
# Metrics files
# --------------------------------------------------------------------------------------------------

def test_metrics_jsonl_tensorboard_and_resume_truncation(tmp_path):
    logger = MetricsLogger(tmp_path, enabled=True, total_steps=5, progress_bar=True)
    for step in range(1, 5):
        logger.log_step(step, {"loss/total": step * 0.5, "policy/kl": math.nan, "n": step})
    logger.log_eval(4, {"eval/x/pass@1": 0.25})
    logger.close()
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert records[2]["loss/total"] == 1.5 and records[0]["policy/kl"] == "nan"
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    with open(tmp_path / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 5, "loss/to')  # a line cut short by a kill
    MetricsLogger(tmp_path, enabled=True, total_steps=5, start_step=2, progress_bar=False).close()
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2]
    assert read_jsonl(tmp_path / "eval.jsonl") == []
    # A logger on another rank writes nothing.
    MetricsLogger(tmp_path / "other", enabled=False, total_steps=5).log_step(1, {"a": 1})
    assert not (tmp_path / "other").exists()


# --------------------------------------------------------------------------------------------------
# Checkpoints (one process: DCP needs no process group)
# --------------------------------------------------------------------------------------------------

def _stateful_run():
    model, optimizer = _model_and_optimizer()
    scheduler = warmup_cosine(optimizer, lr=0.1, min_lr=0.01, warmup_steps=2, total_steps=10)
    sampler = PromptSampler(50, 10, seed=4)
    return model, optimizer, scheduler, sampler


def _train(model, optimizer, scheduler, sampler, steps):
    for _ in range(steps):
        sampler.next_indices()
        model(torch.randn(3, 5)).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()


def test_checkpoint_round_trip_is_exact(tmp_path):
    model, optimizer, scheduler, sampler = _stateful_run()
    _train(model, optimizer, scheduler, sampler, 3)
    manager = CheckpointManager(tmp_path, keep_last=2)
    path = manager.save(3, models={"policy": (model, optimizer)}, schedulers={"policy": scheduler}, sampler=sampler,
                        trainer_state={"skipped_steps": 1, "best_step": None})
    expected_params = [p.detach().clone() for p in model.parameters()]
    expected_moments = [s["exp_avg"].clone() for s in optimizer.state.values()]
    expected_draw = torch.rand(4)
    expected_indices = sampler.next_indices()
    expected_lr = optimizer.param_groups[0]["lr"]

    fresh = _stateful_run()  # a new process: new objects, different state
    _train(*fresh, 1)
    model2, optimizer2, scheduler2, sampler2 = fresh
    state = manager.load(path, models={"policy": (model2, optimizer2)}, schedulers={"policy": scheduler2},
                         sampler=sampler2)
    assert state == {"skipped_steps": 1, "best_step": None, "step": 3}
    assert all(torch.equal(a, b) for a, b in zip(expected_params, model2.parameters()))
    assert all(torch.equal(a, s["exp_avg"]) for a, s in zip(expected_moments, optimizer2.state.values()))
    assert optimizer2.param_groups[0]["lr"] == expected_lr and scheduler2.last_epoch == 3
    assert torch.equal(torch.rand(4), expected_draw)  # RNG restored
    assert sampler2.next_indices() == expected_indices


def test_checkpoint_of_an_optimizer_that_never_stepped(tmp_path):
    """Checkpointing a frozen policy's optimizer must not give it a phantom step (exact resume after the freeze)."""
    model, optimizer, scheduler, sampler = _stateful_run()
    twin = _stateful_run()
    twin[0].load_state_dict(model.state_dict())
    manager = CheckpointManager(tmp_path, keep_last=2)
    path = manager.save(1, models={"policy": (model, optimizer)}, schedulers={"policy": scheduler}, sampler=sampler,
                        trainer_state={})
    assert not optimizer.state
    resumed = _stateful_run()
    manager.load(path, models={"policy": (resumed[0], resumed[1])}, schedulers={"policy": resumed[2]},
                 sampler=resumed[3])
    assert not resumed[1].state
    batch = torch.randn(3, 5)
    for m, o in ((model, optimizer), (resumed[0], resumed[1]), (twin[0], twin[1])):
        m(batch).pow(2).mean().backward()
        o.step()
    assert torch.equal(model.weight, twin[0].weight) and torch.equal(resumed[0].weight, twin[0].weight)


def test_checkpoints_are_atomic_and_pruned(tmp_path):
    model, optimizer, scheduler, sampler = _stateful_run()
    manager = CheckpointManager(tmp_path, keep_last=2)
    kwargs = dict(models={"policy": (model, optimizer)}, schedulers={"policy": scheduler}, sampler=sampler)
    (manager.root / ".tmp-step-000009").mkdir(parents=True)  # debris of a kill mid-save
    for step in (1, 2, 3, 4):
        _train(model, optimizer, scheduler, sampler, 1)
        manager.save(step, trainer_state={"best_step": 2}, **kwargs)
    names = sorted(p.name for p in manager.root.iterdir())
    assert names == ["step-000002", "step-000003", "step-000004"]  # best (2) survives pruning
    assert [s for s, _ in list_checkpoints(manager.root)] == [2, 3, 4]
    assert latest_checkpoint(manager.root).name == "step-000004"
    incomplete = manager.root / "step-000007"
    incomplete.mkdir()  # no .metadata: not a checkpoint
    assert latest_checkpoint(manager.root).name == "step-000004"
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        manager.load(incomplete, **kwargs)
    meta = manager.root / "step-000004" / "meta.json"
    meta.write_text(json.dumps({"step": 4, "world_size": 8}))
    with pytest.raises(CheckpointError, match="written by 8 ranks, this run has 1"):
        manager.load(manager.root / "step-000004", **kwargs)


# --------------------------------------------------------------------------------------------------
# Token RM, policy and reference modules, loss terms (a tiny random Qwen2, no FSDP)
# --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_lm_factory():
    from oreal.model import load_causal_lm
    from oreal.model.tiny import tiny_qwen2_config

    config = tiny_qwen2_config(48, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64)

    def make(seed=0):
        torch.manual_seed(seed)
        return load_causal_lm(config, dtype=torch.float32, attn_backend="sdpa", liger=False)

    return make


def _batch(vocab=48, sequences=6, seed=None):
    rng = np.random.default_rng(seed)
    rollouts = []
    for i in range(sequences):
        rollouts.append(TrainingSample(prompt_ids=rng.integers(1, vocab, rng.integers(1, 6)),
                                response_ids=rng.integers(1, vocab, rng.integers(1, 9)),
                                advantage=float(rng.normal()), is_positive=bool(i % 2)))
    batches, _ = pack_rollouts(rollouts, max_tokens=10_000)
    assert len(batches) == 1
    return batches[0]


def test_token_rm_scores_align_with_labels(tiny_lm_factory):
    from oreal.model import forward_hidden
    from oreal.algorithms.token_rm import TokenRewardModel

    rm = TokenRewardModel(tiny_lm_factory(), head_init="zero")
    batch = _batch()
    assert torch.count_nonzero(rm(batch)) == 0  # zero-initialised head
    assert rm.score_head.bias is None  # OREAL's scalar head has no bias
    torch.nn.init.normal_(rm.score_head.weight)
    scores = rm(batch)
    raw = rm.score_head(forward_hidden(rm.lm, batch)).squeeze(-1)
    action = batch.labels != -100
    assert torch.equal(scores[~action], torch.zeros_like(scores[~action]))
    positions = action.nonzero().squeeze(-1)
    torch.testing.assert_close(scores[positions], raw[positions])  # OREAL: read where the policy's logit for it is
    rm.reads = "following"
    torch.testing.assert_close(rm(batch)[positions], raw[positions + 1])  # the option: read at t+1, after the token
    assert not hasattr(rm.lm.lm_head, "weight")  # the vocabulary projection is dropped


def test_token_rm_learns_the_outcome(tiny_lm_factory):
    from oreal.algorithms.token_rm import TokenRewardModel, sequence_mean_scores, token_rm_loss

    rm = TokenRewardModel(tiny_lm_factory(), head_init="zero")
    batch = _batch(sequences=8)
    loss, logits, real = token_rm_loss(rm(batch), batch, num_sequences=torch.tensor(8.0))
    assert loss.item() == pytest.approx(math.log(2), rel=1e-6) and real.all()
    # The loss is the mean BCE of sigmoid(mean action-token score) against the outcome.
    torch.nn.init.normal_(rm.score_head.weight, std=0.1)
    scores = rm(batch)
    loss, logits, _ = token_rm_loss(scores, batch, torch.tensor(8.0))
    means = torch.stack([s.mean() for s in batch.unpack_actions(scores)])
    torch.testing.assert_close(logits, means)
    torch.testing.assert_close(sequence_mean_scores(scores, batch), means)
    expected = torch.nn.functional.binary_cross_entropy_with_logits(means, batch.is_positive.float())
    torch.testing.assert_close(loss, expected)
    optimizer = torch.optim.AdamW(rm.parameters(), lr=3e-3)
    first = loss.item()
    for _ in range(60):
        loss, logits, _ = token_rm_loss(rm(batch), batch, torch.tensor(8.0))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < first / 2
    assert torch.equal(logits > 0, batch.is_positive)


def test_policy_and_reference_log_probs(tiny_lm_factory):
    from oreal.model import forward_hidden
    from oreal.algorithms.policy import LossCoefficients, PolicyWithLoss, ReferencePolicy

    batch = _batch(seed=None)
    batch.rm_scores = torch.randn(batch.num_tokens)
    reference = ReferencePolicy(tiny_lm_factory(seed=1), backend="torch")
    ref_lp = reference(batch)
    # Against a plain, unpacked forward of each sequence.
    for i, (ids, prompt_len) in enumerate(zip(batch.unpack(batch.input_ids[0]), batch.prompt_lens)):
        logits = reference.lm(input_ids=ids[None]).logits[0].double()
        expected = torch.log_softmax(logits, -1)[torch.arange(len(ids) - 1), ids[1:]][prompt_len - 1:]
        torch.testing.assert_close(batch.unpack_actions(ref_lp)[i].double(), expected, atol=1e-5, rtol=1e-5)
    coefficients = LossCoefficients(kl_coef=0.05, pos_coef=1.0, neg_coef=0.5, backend="torch")
    policy = PolicyWithLoss(tiny_lm_factory(seed=2), coefficients)
    pos, neg = (t.float() for t in batch.action_token_counts())
    out = policy(batch, rm_scores=batch.rm_scores, ref_logprobs=ref_lp, pos_tokens=pos, neg_tokens=neg)
    hidden = forward_hidden(policy.lm, batch)
    direct = oreal.fused_oreal_loss(hidden, policy.lm.lm_head.weight, batch.labels, batch.cu_seqlens,
                                    batch.advantages, batch.is_positive, batch.rm_scores, ref_lp, kl_coef=0.05,
                                    pos_coef=1.0, neg_coef=0.5, pos_tokens=pos, neg_tokens=neg, backend="torch")
    torch.testing.assert_close(out.loss, direct.loss)
    out.loss.backward()
    assert policy.lm.lm_head.weight.grad is not None and policy.lm.model.embed_tokens.weight.grad is not None
    assert all(p.grad is None for p in reference.parameters())

    from oreal.algorithms.loss_terms import TERMS, loss_term_sums

    batch.ref_logprobs = ref_lp
    sums = dict(zip(TERMS, loss_term_sums(batch, out, kl_coef=0.05, pos_coef=1.0, neg_coef=0.5, pos_tokens=pos,
                                          neg_tokens=neg).tolist()))
    assert sums["positive"] + sums["negative"] + sums["kl"] == pytest.approx(sums["total"], rel=1e-5, abs=1e-7)
    assert sums["kl"] > 0 and sums["action_tokens"] == int((batch.labels != -100).sum())
