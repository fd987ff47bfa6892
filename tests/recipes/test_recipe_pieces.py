"""The GRPO / PPO recipe pieces, in one process: rewards and advantages, PPO's statistics over ranks, the critic,
the clipped policy module, minibatching, the minibatch early-stop, and the recipe configs."""

from __future__ import annotations

import math
import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import oreal
from oreal.runtime.config import Config, ConfigError, load_config_file, needs_reference, parse_args
from oreal.data import TrainingSample, pack_rollouts
from oreal.algorithms.ppo_family import (explained_variance, explained_variance_from_sums, moment_sums, residual_sums,
                       should_skip_minibatch, whiten)
from oreal.algorithms.advantages import (gae_advantages, group_normalized_advantages, kl_penalized_rewards,
                                     outcome_token_rewards)

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs"
VOCAB = 97


def random_rollouts(rng: np.random.Generator, count: int, *, empty_every: int = 0) -> list[TrainingSample]:
    """Rollouts of random lengths; every `empty_every`-th one has an empty response (no action token)."""
    out = []
    for i in range(count):
        prompt = rng.integers(0, VOCAB, size=int(rng.integers(1, 6)))
        length = 0 if empty_every and i % empty_every == 0 else int(rng.integers(1, 9))
        out.append(TrainingSample(prompt, rng.integers(0, VOCAB, size=length), advantage=float(rng.normal()),
                           is_positive=bool(rng.random() < 0.5)))
    return out


def one_batch(rollouts):
    batches, _ = pack_rollouts(rollouts, max_tokens=sum(r.num_tokens for r in rollouts))
    assert len(batches) == 1
    return batches[0]


# --------------------------------------------------------------------------------------------------
# Rewards and advantages
# --------------------------------------------------------------------------------------------------

def test_outcome_rewards_sit_on_the_last_action_token():
    rng = np.random.default_rng()
    batch = one_batch(random_rollouts(rng, 9, empty_every=4))
    rewards = torch.from_numpy(rng.normal(size=batch.num_sequences)).float()
    out = outcome_token_rewards(rewards, batch.labels, batch.cu_seqlens)
    expected = torch.zeros(batch.num_tokens)
    for i, piece in enumerate(batch.unpack(torch.arange(batch.num_tokens))):
        actions = [int(t) for t in piece if batch.labels[t] != -100]
        if actions:
            expected[actions[-1]] = rewards[i]
    assert torch.equal(out, expected)
    assert (out != 0).sum() == sum(1 for r in batch.seq_lens if r) - sum(
        1 for length, p in zip(batch.seq_lens, batch.prompt_lens) if length == p)
    with pytest.raises(ValueError, match="rewards"):
        outcome_token_rewards(rewards[:-1], batch.labels, batch.cu_seqlens)


def test_kl_penalty_in_the_reward():
    rng = np.random.default_rng()
    batch = one_batch(random_rollouts(rng, 6))
    rewards = torch.tensor(rng.choice([-1.0, 1.0], size=batch.num_sequences), dtype=torch.float32)
    lp, ref = -torch.rand(batch.num_tokens) * 3, -torch.rand(batch.num_tokens) * 3
    coef = float(rng.uniform(0.001, 0.1))
    out = kl_penalized_rewards(rewards, batch.labels, batch.cu_seqlens, lp, ref, coef)
    action = batch.labels != -100
    expected = outcome_token_rewards(rewards, batch.labels, batch.cu_seqlens) - coef * torch.where(action, lp - ref, 0)
    torch.testing.assert_close(out, expected)
    assert torch.equal(out[~action], torch.zeros_like(out[~action]))
    assert torch.equal(kl_penalized_rewards(rewards, batch.labels, batch.cu_seqlens, lp, None, coef),
                       outcome_token_rewards(rewards, batch.labels, batch.cu_seqlens))


def test_grpo_advantages_do_not_depend_on_the_reward_scale():
    """+5 / -5 (RLinf) and +1 / -1 give the same group-normalised advantages: only the verdicts matter."""
    rng = np.random.default_rng()
    correct = rng.random(64) < 0.4
    groups = torch.arange(64) // 16
    five = group_normalized_advantages(torch.from_numpy(np.where(correct, 5.0, -5.0)), groups)
    one = group_normalized_advantages(torch.from_numpy(np.where(correct, 1.0, -1.0)), groups)
    torch.testing.assert_close(five, one, rtol=1e-5, atol=1e-5)
    for g in range(4):
        chunk = five[g * 16:(g + 1) * 16]
        assert abs(float(chunk.sum())) < 1e-5  # centred within each prompt


def test_gae_with_outcome_reward_on_packed_batch_matches_per_sequence():
    rng = np.random.default_rng()
    rollouts = random_rollouts(rng, 7, empty_every=3)
    batch = one_batch(rollouts)
    rewards = torch.tensor(rng.choice([-1.0, 1.0], size=batch.num_sequences), dtype=torch.float32)
    values = torch.where(batch.labels != -100, torch.randn(batch.num_tokens), 0.0)
    adv, ret = gae_advantages(outcome_token_rewards(rewards, batch.labels, batch.cu_seqlens), values, batch.labels,
                              batch.cu_seqlens, gamma=1.0, lam=0.95)
    for i, (v, a) in enumerate(zip(batch.unpack_actions(values), batch.unpack_actions(adv))):
        n = v.numel()
        expected, running = [0.0] * n, 0.0
        for t in reversed(range(n)):  # reward only at the end, gamma = 1
            delta = (float(rewards[i]) if t == n - 1 else 0.0) + (float(v[t + 1]) if t + 1 < n else 0.0) - float(v[t])
            running = delta + 0.95 * running
            expected[t] = running
        torch.testing.assert_close(a.double(), torch.tensor(expected, dtype=torch.float64), atol=1e-5, rtol=1e-5)
    action = batch.labels != -100
    torch.testing.assert_close(ret[action], adv[action] + values[action])


# --------------------------------------------------------------------------------------------------
# PPO statistics summed over ranks
# --------------------------------------------------------------------------------------------------

def test_explained_variance_from_sums_over_split_data():
    for _ in range(10):
        n = random.randint(3, 200)
        returns = torch.randn(n) * random.uniform(0.1, 5)
        values = returns * random.uniform(-1, 1) + torch.randn(n) * random.uniform(0, 2)
        mask = torch.rand(n) < 0.8
        mask[:2] = True
        cut = random.randint(0, n)  # two "ranks" hold one part each
        sums = residual_sums(values[:cut], returns[:cut], mask[:cut]) + residual_sums(values[cut:], returns[cut:],
                                                                                      mask[cut:])
        assert explained_variance_from_sums(sums) == pytest.approx(float(explained_variance(values, returns, mask)),
                                                                   abs=1e-5)
    constant = torch.full((5,), 2.0)
    assert explained_variance_from_sums(residual_sums(torch.randn(5), constant, torch.ones(5, dtype=torch.bool))) == 0
    assert explained_variance_from_sums(torch.zeros(5)) == 0.0


def test_whiten_over_split_data_equals_global_whitening():
    x = torch.randn(300) * 3 + 1.5
    mask = torch.rand(300) < 0.7
    cut = 123
    sums = moment_sums(x[:cut], mask[:cut]) + moment_sums(x[cut:], mask[cut:])
    out = torch.cat([whiten(x[:cut], mask[:cut], sums), whiten(x[cut:], mask[cut:], sums)])
    picked = x[mask].double()
    expected = (picked - picked.mean()) / (picked.std() + 1e-8)
    torch.testing.assert_close(out[mask].double(), expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(out[~mask], torch.zeros_like(out[~mask]))
    assert torch.equal(whiten(x, mask, torch.zeros(3)), torch.zeros_like(x))


def test_skip_decision():
    assert should_skip_minibatch(torch.tensor(5.01), 5.0)
    assert not should_skip_minibatch(torch.tensor(4.99), 5.0)
    assert not should_skip_minibatch(torch.tensor(1e9), 0.0)  # 0: the early-stop is off


# --------------------------------------------------------------------------------------------------
# The critic and the clipped policy module
# --------------------------------------------------------------------------------------------------

def tiny_lm(seed: int = 0):
    from oreal.model import load_causal_lm
    from oreal.model.tiny import tiny_qwen2_config

    torch.manual_seed(seed)
    return load_causal_lm(tiny_qwen2_config(VOCAB, hidden_size=32, intermediate_size=64), dtype=torch.float32,
                          attn_backend="sdpa")


def test_value_model_reads_the_state_before_each_action():
    from oreal.model import forward_hidden
    from oreal.algorithms.clipped_models import ValueModel

    rng = np.random.default_rng()
    rollouts = random_rollouts(rng, 5, empty_every=4)
    batch = one_batch(rollouts)
    critic = ValueModel(tiny_lm())
    assert torch.count_nonzero(critic(batch)) == 0  # zero-initialised value head
    assert not hasattr(critic.lm.lm_head, "weight")  # the vocabulary projection is dropped
    torch.nn.init.normal_(critic.score_head.weight)
    assert critic.score_head.bias is None  # OpenRLHF's value head has no bias
    values = critic(batch)
    action = batch.labels != -100
    raw = critic.score_head(forward_hidden(critic.lm, batch)).squeeze(-1)
    torch.testing.assert_close(values[action], raw[action])  # read at t, the position that predicts labels[t]
    assert torch.equal(values[~action], torch.zeros_like(values[~action]))
    # V(s_t) cannot depend on the action taken at t: change the last response token of every sequence.
    changed = [TrainingSample(r.prompt_ids, np.concatenate([r.response_ids[:-1], (r.response_ids[-1:] + 1) % VOCAB]))
               if len(r.response_ids) else r for r in rollouts]
    other = critic(one_batch(changed))
    torch.testing.assert_close(other[action], values[action])


@pytest.mark.parametrize("loss_agg", ["token", "sequence"])
def test_clipped_policy_module_is_the_fused_loss_on_its_hidden_states(loss_agg):
    from oreal.model import forward_hidden, lm_head_weight
    from oreal.algorithms.clipped_models import ClippedSurrogatePolicy, ClipSettings

    batch = one_batch(random_rollouts(np.random.default_rng(), 6))
    settings = ClipSettings(clip_low=0.2, clip_high=0.28, kl_coef=0.05, loss_agg=loss_agg, temperature=0.7,
                            backend="torch")
    policy = ClippedSurrogatePolicy(tiny_lm(), settings)
    advantages, old = torch.randn(batch.num_sequences), -torch.rand(batch.num_tokens) * 4
    ref = -torch.rand(batch.num_tokens) * 4
    num_tokens = torch.tensor(float((batch.labels != -100).sum() * 3))  # as if two other ranks held as many
    out = policy(batch, advantages=advantages, old_logprobs=old, ref_logprobs=ref, num_tokens=num_tokens)
    expected = oreal.fused_policy_loss(forward_hidden(policy.lm, batch), lm_head_weight(policy.lm), batch.labels,
                                       batch.cu_seqlens, advantages, old, ref, clip_low=0.2, clip_high=0.28,
                                       kl_coef=0.05, loss_agg=loss_agg, temperature=0.7,
                                       num_tokens=num_tokens if loss_agg == "token" else None, backend="torch")
    torch.testing.assert_close(out.loss, expected.loss)
    torch.testing.assert_close(out.logprobs, expected.logprobs)
    torch.testing.assert_close(out.clip_fraction, expected.clip_fraction)


# --------------------------------------------------------------------------------------------------
# Minibatches and the early-stop, with a one-process stand-in for the distributed trainer
# --------------------------------------------------------------------------------------------------

def make_trainer(*, minibatches=3, epochs=2, early_stop_ratio=0.0, statistic="mean", lr=1e-2, seed=0,
                 reference=False):
    """A `ClippedUpdateTrainer` on one process (world size 1: no collective runs) with a real tiny policy."""
    from oreal.algorithms.clipped import ClippedUpdateTrainer
    from oreal.algorithms.clipped_models import ClippedSurrogatePolicy, ClipSettings

    cfg = Config()
    cfg.algorithm = "grpo"
    cfg.train.seed, cfg.train.micro_batch_tokens = seed, 40
    cfg.ppo.minibatches, cfg.ppo.epochs = minibatches, epochs
    cfg.ppo.early_stop_ratio, cfg.ppo.early_stop_statistic = early_stop_ratio, statistic
    cfg.policy_optim.grad_clip = 1.0
    policy = ClippedSurrogatePolicy(tiny_lm(), ClipSettings(backend="torch"))
    ref_policy = None
    if reference:
        from oreal.algorithms.policy import ReferencePolicy

        ref_policy = ReferencePolicy(tiny_lm(seed=3), backend="torch")
    parts = SimpleNamespace(ctx=SimpleNamespace(rank=0, world_size=1, device=torch.device("cpu"), is_main=True),
                            tokenizer=SimpleNamespace(pad_token_id=0), policy=policy, reference=ref_policy,
                            policy_optim=torch.optim.AdamW(policy.parameters(), lr=lr), policy_sched=None,
                            object_group=None)
    trainer = ClippedUpdateTrainer(cfg, parts, checkpoints=None)
    trainer.gather_per_rank = lambda local: [list(local)]  # one rank: every sample is local
    return trainer


def test_minibatches_partition_the_samples_and_are_reproducible():
    rng = np.random.default_rng()
    samples = random_rollouts(rng, 17)
    for i, s in enumerate(samples):
        s.advantage = float(i)  # a tag to find each sample again
    trainer = make_trainer(minibatches=4)
    minibatches = trainer.make_minibatches(samples, step=5)
    assert len(minibatches) == 4
    seen = sorted(int(a) for mb in minibatches for b in mb.micro_batches if not b.is_padding
                  for a in b.advantages.tolist())
    assert seen == list(range(17))  # each sample in exactly one minibatch
    for mb in minibatches:
        real = [b for b in mb.micro_batches if not b.is_padding]
        assert float(mb.action_tokens) == sum(int((b.labels != -100).sum()) for b in real)
        assert all(b.num_tokens <= 40 for b in mb.micro_batches)
    again = trainer.make_minibatches(samples, step=5)
    tags = lambda mbs: [[b.advantages.tolist() for b in mb.micro_batches] for mb in mbs]  # noqa: E731
    assert tags(again) == tags(minibatches)  # (seed, step) decides the split: a resumed step repeats it
    assert tags(trainer.make_minibatches(samples, step=6)) != tags(minibatches)
    passes = list(trainer.passes(minibatches, step=5))
    assert len(passes) == 2 * 4
    assert sorted(map(id, passes[:4])) == sorted(map(id, minibatches)) == sorted(map(id, passes[4:]))
    assert len(trainer.make_minibatches(samples[:2], step=1)) == 2  # fewer samples than minibatches
    assert trainer.make_minibatches([], step=1) == []


def _params(module):
    return [p.detach().clone() for p in module.parameters()]


@pytest.mark.parametrize("statistic", ["mean", "max"])
def test_early_stop_skips_the_update_and_counts_it(statistic):
    rng = np.random.default_rng()
    samples = random_rollouts(rng, 12)
    # A tiny bound: the very first minibatch already has ratio 1 > 0.5, so every minibatch is skipped.
    trainer = make_trainer(minibatches=2, epochs=2, early_stop_ratio=0.5, statistic=statistic)
    minibatches = trainer.make_minibatches(samples, step=1)
    trainer.record_old_logprobs(minibatches)
    before = _params(trainer.parts.policy)
    results = [trainer.policy_minibatch(1, mb) for mb in trainer.passes(minibatches, step=1)]
    assert all(r["skipped"] and not r["applied"] for r in results)
    assert trainer.skipped_minibatches == 4
    assert all(torch.equal(a, b) for a, b in zip(before, _params(trainer.parts.policy)))  # nothing moved
    assert all(p.grad is None for p in trainer.parts.policy.parameters())  # the gradients were dropped
    assert all(r["ratio_max"] == pytest.approx(1.0, abs=1e-5) for r in results)  # the policy never changed


def test_minibatches_update_until_the_ratio_is_too_large():
    """With a bound just above 1 on the largest ratio, the first minibatch (ratio exactly 1: the old log-probs
    are this policy's) updates; the next ones see the moved policy and are skipped."""
    rng = np.random.default_rng()
    samples = random_rollouts(rng, 12)
    trainer = make_trainer(minibatches=2, epochs=2, early_stop_ratio=1.0 + 1e-4, statistic="max", lr=5e-2)
    minibatches = trainer.make_minibatches(samples, step=1)
    trainer.record_old_logprobs(minibatches)
    before = _params(trainer.parts.policy)
    results = [trainer.policy_minibatch(1, mb) for mb in trainer.passes(minibatches, step=1)]
    assert results[0]["applied"] and not results[0]["skipped"]
    assert results[0]["ratio_max"] == pytest.approx(1.0, abs=1e-5) and math.isfinite(results[0]["grad_norm"])
    assert all(r["skipped"] for r in results[1:]) and trainer.skipped_minibatches == 3
    assert any(not torch.equal(a, b) for a, b in zip(before, _params(trainer.parts.policy)))
    assert max(r["ratio_max"] for r in results[1:]) > 1.0 + 1e-4


def test_policy_pass_statistics_are_token_weighted():
    from oreal.algorithms.clipped import PolicyPassStats

    rng = np.random.default_rng()
    trainer = make_trainer(minibatches=3, epochs=1, reference=True)
    minibatches = trainer.make_minibatches(random_rollouts(rng, 15), step=2)
    trainer.record_old_logprobs(minibatches)
    assert all(b.ref_logprobs is not None for mb in minibatches for b in mb.micro_batches)
    stats = PolicyPassStats()
    for mb in trainer.passes(minibatches, step=2):
        stats.add(trainer.policy_minibatch(2, mb))
    metrics = stats.metrics(has_reference=True)
    assert metrics["update/minibatches"] == 3 and metrics["update/applied"] == 3
    assert metrics["update/skipped_minibatches"] == 0
    assert 0.0 <= metrics["policy/clip_fraction"] <= 1.0
    assert metrics["policy/ratio_max"] >= 1.0 - 1e-6 and 0.5 < metrics["policy/ratio_mean"] < 2.0
    assert metrics["policy/kl"] > 0 and math.isfinite(metrics["grad_norm/policy"])
    assert metrics["policy/entropy"] > 0
    assert stats.sums["tokens"] == sum(float(mb.action_tokens) for mb in minibatches)


# --------------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------------

def test_algorithm_option_switches_any_oreal_config():
    for name in ("tiny_cpu.py", "oreal_7b.py", "demo_cpu.py"):
        path = CONFIGS / name
        if not path.exists():
            continue
        cfg = parse_args(["--config", str(path), "--algorithm", "grpo"]).config
        assert cfg.algorithm == "grpo" and not needs_reference(cfg)
        cfg = parse_args(["--config", str(path), "--algorithm", "ppo", "--critic.kl_reward_coef", "0.01"]).config
        assert cfg.algorithm == "ppo" and needs_reference(cfg)
    assert needs_reference(load_config_file(CONFIGS / "tiny_cpu.py"))  # OREAL's KL


@pytest.mark.parametrize("args, option", [
    (["--algorithm", "dpo"], "--algorithm"),
    (["--algorithm", "grpo", "--ppo.epochs", "0"], "--ppo.epochs"),
    (["--ppo.minibatches", "0"], "--ppo.minibatches"),
    (["--ppo.clip_low", "1.0"], "--ppo.clip_low"),
    (["--ppo.loss_agg", "seq"], "--ppo.loss_agg"),
    (["--ppo.early_stop_ratio", "-1"], "--ppo.early_stop_ratio"),
    (["--ppo.early_stop_statistic", "median"], "--ppo.early_stop_statistic"),
    (["--ppo.reward_correct", "-5", "--ppo.reward_wrong", "5"], "--ppo.reward_correct"),
    (["--critic.gamma", "0"], "--critic.gamma"),
    (["--critic.lam", "1.5"], "--critic.lam"),
    (["--critic_optim.lr", "0"], "--critic_optim.lr"),
    (["--algorithm", "grpo", "--data.samples_per_prompt", "1"], "--data.samples_per_prompt"),
])
def test_bad_recipe_options_name_the_option(args, option):
    with pytest.raises(ConfigError, match=option.replace(".", r"\.")):
        parse_args(["--config", str(CONFIGS / "tiny_cpu.py"), *args])


def test_ppo_accepts_one_sample_per_prompt():
    cfg = parse_args(["--config", str(CONFIGS / "tiny_cpu.py"), "--algorithm", "ppo",
                      "--data.samples_per_prompt", "1"]).config
    assert cfg.data.samples_per_prompt == 1


def test_rlinf_grpo_recipe_numbers():
    small = load_config_file(CONFIGS / "grpo_1p5b.py").validate()
    large = load_config_file(CONFIGS / "grpo_7b.py").validate()
    for cfg in (small, large):
        assert cfg.algorithm == "grpo" and cfg.data.prompts_per_step == 512 and cfg.data.format == "areal"
        assert (cfg.ppo.reward_correct, cfg.ppo.reward_wrong) == (5.0, -5.0)
        assert (cfg.ppo.clip_low, cfg.ppo.clip_high, cfg.ppo.kl_coef) == (0.2, 0.2, 0.0)
        assert (cfg.ppo.minibatches, cfg.ppo.epochs, cfg.ppo.early_stop_ratio) == (4, 1, 5.0)
        assert cfg.ppo.early_stop_scope == "micro_batch" and cfg.ppo.whiten_advantages  # normalize_advantages
        assert cfg.rollout.max_total_tokens == 28672 and cfg.data.max_prompt_tokens == 1024
        assert cfg.rollout.max_new_tokens == 28672 - 1024 and (cfg.rollout.temperature, cfg.rollout.top_p) == (1, 1)
        o = cfg.policy_optim
        assert (o.lr, o.min_lr, o.betas, o.eps, o.weight_decay) == (2e-5, 2e-5, (0.9, 0.95), 1e-5, 0.05)
        assert not needs_reference(cfg)
    assert "1.5B" in small.model.path and small.data.samples_per_prompt == 16 and small.policy_optim.grad_clip == 0.8
    assert "7B" in large.model.path and large.data.samples_per_prompt == 32 and large.policy_optim.grad_clip == 1.0
    # use_valid_token_scale False / True, recompute_logprobs True / False, shuffle_rollout False / True
    assert (small.ppo.loss_agg, small.ppo.old_logprobs, small.ppo.shuffle) == ("sequence", "recompute", False)
    assert (large.ppo.loss_agg, large.ppo.old_logprobs, large.ppo.shuffle) == ("step_token", "engine", True)


def test_simplerl_zero_ppo_recipe_numbers():
    cfg = load_config_file(CONFIGS / "ppo_zero_7b.py").validate()
    assert cfg.algorithm == "ppo" and cfg.model.path.endswith("Qwen2.5-Math-7B") and not cfg.critic.path
    assert (cfg.data.prompts_per_step, cfg.data.samples_per_prompt, cfg.ppo.minibatches) == (1024, 8, 64)
    assert cfg.data.prompts_per_step * cfg.data.samples_per_prompt // cfg.ppo.minibatches == 128  # train_batch_size
    assert (cfg.policy_optim.lr, cfg.critic_optim.lr) == (5e-7, 9e-6)
    for o in (cfg.policy_optim, cfg.critic_optim):
        assert (o.betas, o.min_lr / o.lr, o.warmup_ratio, o.warmup_from_zero, o.schedule_unit) == \
            ((0.9, 0.95), pytest.approx(0.1), 0.03, True, "update")
    assert (cfg.ppo.reward_rule, cfg.ppo.reward_correct, cfg.ppo.reward_wrong, cfg.ppo.reward_unboxed) == \
        ("boxed", 1.0, -0.5, -1.0)
    assert (cfg.ppo.loss_temperature, cfg.ppo.loss_agg, cfg.critic.loss_agg) == (1.0, "sequence", "sequence")
    assert (cfg.critic.kl_reward_coef, cfg.critic.gamma, cfg.critic.lam, cfg.critic.value_clip) == (0.01, 1.0, 0.95, 0.2)
    assert (cfg.rollout.temperature, cfg.rollout.max_new_tokens, cfg.data.max_prompt_tokens) == (0.6, 3000, 1024)
    assert cfg.ppo.epochs == 1 and cfg.ppo.early_stop_ratio == 0 and needs_reference(cfg)
    assert "level3to5" in cfg.data.train_files[0]


@pytest.mark.parametrize("name, algorithm", [("tiny_cpu_grpo.py", "grpo"), ("tiny_cpu_ppo.py", "ppo")])
def test_tiny_recipe_configs(name, algorithm):
    cfg = load_config_file(CONFIGS / name).validate()
    assert cfg.algorithm == algorithm and cfg.model.tiny.enabled and cfg.train.device == "cpu"
    assert cfg.ppo.epochs * cfg.ppo.minibatches > 1  # several updates a step


def test_ppo_advantages_over_all_micro_batches():
    """PPO's GAE, run once over every micro-batch of the rank, equals GAE per micro-batch; whitening and the
    value statistics are over all of the step's action tokens."""
    from oreal.algorithms.clipped import Minibatch
    from oreal.algorithms.ppo import PPOTrainer

    rng = np.random.default_rng()
    cfg = Config()
    cfg.algorithm = "ppo"
    cfg.ppo.reward_correct, cfg.ppo.reward_wrong = 1.0, -0.5
    cfg.critic.gamma, cfg.critic.lam, cfg.critic.kl_reward_coef = 0.99, 0.9, 0.05
    parts = SimpleNamespace(ctx=SimpleNamespace(rank=0, world_size=1, device=torch.device("cpu"), is_main=True))
    trainer = PPOTrainer(cfg, parts, checkpoints=None)
    minibatches = []
    for _ in range(2):
        rollouts = random_rollouts(rng, 9, empty_every=5)
        for r in rollouts:  # PPO's samples carry their outcome reward in `advantage` until GAE
            r.advantage = 1.0 if r.is_positive else -0.5
        batches, _ = pack_rollouts(rollouts, max_tokens=30)
        for b in batches:
            b.old_logprobs, b.ref_logprobs = -torch.rand(b.num_tokens) * 3, -torch.rand(b.num_tokens) * 3
            b.extras["old_values"] = torch.where(b.labels != -100, torch.randn(b.num_tokens), 0.0)
        minibatches.append(Minibatch(batches))
    stats = trainer.estimate_advantages(minibatches)
    batches = [b for mb in minibatches for b in mb.micro_batches]
    raw, returns, values, per_batch = [], [], [], []
    for b in batches:
        outcome = torch.where(b.is_positive, 1.0, -0.5)
        token_rewards = kl_penalized_rewards(outcome, b.labels, b.cu_seqlens, b.old_logprobs, b.ref_logprobs, 0.05)
        adv, ret = gae_advantages(token_rewards, b.extras["old_values"], b.labels, b.cu_seqlens, gamma=0.99, lam=0.9)
        action = b.labels != -100
        torch.testing.assert_close(b.extras["returns"], ret)
        raw.append(adv[action]), returns.append(ret[action]), values.append(b.extras["old_values"][action])
        per_batch.append(adv)
    flat = torch.cat(raw).double()
    for b, adv in zip(batches, per_batch):
        action = b.labels != -100
        expected = (adv[action].double() - flat.mean()) / (flat.std() + 1e-8)
        torch.testing.assert_close(b.extras["advantages"][action].double(), expected, atol=1e-5, rtol=1e-5)
        assert torch.equal(b.extras["advantages"][~action], torch.zeros_like(b.extras["advantages"][~action]))
    ret_all, val_all = torch.cat(returns), torch.cat(values)
    assert stats["critic/explained_variance"] == pytest.approx(
        float(explained_variance(val_all, ret_all, torch.ones_like(ret_all, dtype=torch.bool))), abs=1e-5)
    assert stats["critic/value_mean"] == pytest.approx(float(val_all.mean()), abs=1e-6)
    assert stats["critic/return_mean"] == pytest.approx(float(ret_all.mean()), abs=1e-6)
