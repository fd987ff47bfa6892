"""GRPO as in RLinf's math recipe (`--algorithm grpo`): `GRPOTrainer.train_step` is the whole algorithm.

One step:

     1. sample prompts            this rank's share of the step's global batch (resumable sampler)
     2. rollouts                  K samples per prompt from the engine, which holds the current policy
     3. judge                     reward `ppo.reward_correct` / `ppo.reward_wrong` per sample (RLinf: +5 / -5)
     4. group-normalised          (r - mean) / (std + eps) over the K samples of each prompt; every sample is
        advantages                trained on (a prompt whose samples all agree has advantage 0 everywhere);
                                  with `ppo.whiten_advantages` (RLinf's `normalize_advantages: True`) whitened
                                  again over all response tokens of the step, all ranks
     5. minibatches               all ranks' samples (shuffled, or each rank's in order) split into
                                  `ppo.minibatches`, packed
     6. old log-probs             a no-grad forward of the policy, the engine's, or (exactly on-policy) none;
                                  the reference's with `ppo.kl_coef`
     7. epochs x minibatches      fused clipped surrogate (token normaliser per minibatch, per step, or per
                                  sequence); RLinf's early stop per micro-batch or per minibatch; one clipped
                                  AdamW update per minibatch
     8. weight sync               the new policy weights into the rollout engine, in place (if it changed)
"""

from __future__ import annotations

import time

import torch

from oreal.algorithms.loop import PhaseTimer
from oreal.algorithms.clipped import ClippedUpdateTrainer, PolicyPassStats
from oreal.algorithms.advantages import group_normalized_advantages
from oreal.algorithms.ppo_family import token_moment_sums, whiten_from_sums
from oreal.runtime.distributed import all_reduce_sum


class GRPOTrainer(ClippedUpdateTrainer):
    def train_step(self, step: int) -> dict:
        cfg, parts = self.cfg, self.parts
        timer = PhaseTimer()
        step_start = time.perf_counter()
        frozen = step <= cfg.train.freeze_policy_steps
        lrs = self.learning_rates(frozen)

        # 1-3. This rank's prompts, K rollouts of each from the engine (the current policy), their verdicts.
        prompts, overlong, samples, correct, group_ids = self.collect(step, timer)
        rewards = self.rewards(correct, samples)  # +5 or -5 (configurable)

        # 4. Group-normalised advantages over the K samples of each prompt; every sample is trained on.
        advantages = group_normalized_advantages(rewards, group_ids, eps=cfg.ppo.group_norm_eps)
        if cfg.ppo.whiten_advantages:
            advantages = self.whiten_over_step(advantages, samples)
        local_samples = self.training_samples(prompts, samples, advantages, correct)

        policy = PolicyPassStats()
        minibatches = []
        with timer.phase("train"):
            if not frozen:
                # 5. Minibatches: every rank's samples, shuffled and split, packed into balanced micro-batches.
                minibatches = self.make_minibatches(local_samples, step)

                # 6. Old log-probs: a no-grad forward of the policy before the first update (and the reference's).
                with timer.phase("logprobs"):
                    self.record_old_logprobs(minibatches)

                # 7. Epochs over the minibatches: clipped surrogate, early-stop or one update per minibatch.
                for minibatch in self.passes(minibatches, step):
                    policy.add(self.policy_minibatch(step, minibatch, poison=step == cfg.debug.nonfinite_at_step))
            self.advance_schedules(frozen)

        # 8. Weight sync: the engine gets the new policy weights, in place (only when they changed).
        if policy.applied:
            with timer.phase("sync"):
                parts.generator.sync()

        timer.seconds["step"] = time.perf_counter() - step_start
        return self.step_metrics(timer=timer, samples=samples, correct=correct, group_ids=group_ids,
                                 overlong=overlong, rewards=rewards, advantages=advantages, lrs=lrs, policy=policy,
                                 minibatches=minibatches, frozen=frozen)

    def whiten_over_step(self, advantages: torch.Tensor, samples: list[list]) -> torch.Tensor:
        """RLinf's `normalize_advantages: True` for GRPO: the group-normalised advantages whitened again over every
        response token of the step, all data-parallel ranks together (masked mean and std in float64, std + 1e-5).
        RLinf's collocated actor applies it twice (rlinf/workers/megatron_worker.py, `run_training`: once with the
        unbiased std where it computes the advantages, then with the biased one under "Advantage normalization");
        so does this. Each sample's response length is its weight."""
        lengths = torch.tensor([len(s.token_ids) for group in samples for s in group], dtype=torch.float64)
        out = advantages.double()
        for unbiased in (True, False):
            sums = all_reduce_sum(token_moment_sums(out, lengths), self.ctx).cpu()
            out = whiten_from_sums(out, sums, unbiased=unbiased)
        return out.to(advantages.dtype)
