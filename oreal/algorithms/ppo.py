"""PPO as in SimpleRL-Zero (`--algorithm ppo`): `PPOTrainer.train_step` is the whole algorithm.

From a base model with no SFT: a critic (a copy of the policy with a zero-initialised value head) gives
V(state) for every response token; the only reward is the judge's verdict on the final answer, placed on
the last response token (less an optional per-token KL penalty against the initial policy, OpenRLHF's
`init_kl_coef`); GAE turns rewards and values into per-token advantages and the critic's targets.

One step:

     1. sample prompts            this rank's share of the step's global batch (resumable sampler)
     2. rollouts                  K samples per prompt (SimpleRL-Zero: 8) from the engine
     3. judge                     reward `ppo.reward_correct` / `ppo.reward_wrong` per sample (with
                                  `ppo.reward_rule` "boxed", SimpleRL-Zero's +1 / -0.5 / -1 without a box)
     4. minibatches               all ranks' samples shuffled and split into `ppo.minibatches`, packed
     5. old log-probs, values     no-grad forwards of the policy, the reference (if a KL term needs it) and
                                  the critic over every micro-batch, before any update
     6. GAE                       token rewards (outcome on the last token, - KL penalty), advantages and
                                  returns per sequence; advantages whitened over the step (all ranks)
     7. epochs x minibatches      per minibatch: the critic's clipped value loss and its update; the
                                  policy's fused clipped surrogate, early-stop or one update
                                  (policy frozen for `train.freeze_policy_steps`: the critic warms up alone)
     8. weight sync               the new policy weights into the rollout engine, in place (if it changed)
"""

from __future__ import annotations

import math
import time

import torch

from oreal.runtime.distributed import all_reduce_sum
from oreal.algorithms.ppo_family import (clipped_value_loss, explained_variance_from_sums, moment_sums, residual_sums,
                       whiten)
from oreal.algorithms.loop import PhaseTimer
from oreal.algorithms.clipped import CLIPPED_METRICS, ClippedUpdateTrainer, Minibatch, PolicyPassStats
from oreal.algorithms.advantages import gae_advantages, kl_penalized_rewards

PPO_METRICS = CLIPPED_METRICS + (
    "critic/value_loss", "critic/explained_variance", "critic/value_mean", "critic/return_mean",
    "grad_norm/critic", "lr/critic",
)


class PPOTrainer(ClippedUpdateTrainer):
    REQUIRED_METRICS = PPO_METRICS

    def train_step(self, step: int) -> dict:
        cfg, parts = self.cfg, self.parts
        timer = PhaseTimer()
        step_start = time.perf_counter()
        frozen = step <= cfg.train.freeze_policy_steps
        lrs = {**self.learning_rates(frozen), "lr/critic": parts.critic_optim.param_groups[0]["lr"]}

        # 1-3. This rank's prompts, K rollouts of each from the engine (the current policy), their verdicts.
        prompts, overlong, samples, correct, group_ids = self.collect(step, timer)
        rewards = self.rewards(correct, samples)  # the final answer's reward, nothing else
        # Each sample's outcome reward rides in its `advantage` until GAE gives the per-token advantages.
        local_samples = self.training_samples(prompts, samples, rewards, correct)

        policy, critic = PolicyPassStats(), CriticPassStats()
        with timer.phase("train"):
            # 4. Minibatches: every rank's samples, shuffled and split, packed into balanced micro-batches.
            minibatches = self.make_minibatches(local_samples, step)

            # 5. Old log-probs (policy, reference) and old values (critic): no-grad forwards before any update.
            with timer.phase("logprobs"):
                self.record_old_logprobs(minibatches)
                self.record_old_values(minibatches)

            # 6. GAE per sequence on the outcome reward (less the KL penalty); advantages whitened over the step.
            value_stats = self.estimate_advantages(minibatches)

            # 7. Epochs over the minibatches: the critic's update, then the policy's (or its early-stop).
            for minibatch in self.passes(minibatches, step):
                critic.add(self.critic_minibatch(step, minibatch))
                if not frozen:
                    policy.add(self.policy_minibatch(step, minibatch, poison=step == cfg.debug.nonfinite_at_step))
            self.advance_schedules(frozen)

        # 8. Weight sync: the engine gets the new policy weights, in place (only when they changed).
        if policy.applied:
            with timer.phase("sync"):
                parts.generator.sync()

        timer.seconds["step"] = time.perf_counter() - step_start
        advantages = self.sequence_advantage_means(minibatches)
        return {**self.step_metrics(timer=timer, samples=samples, correct=correct, group_ids=group_ids,
                                    overlong=overlong, rewards=rewards, advantages=advantages, lrs=lrs,
                                    policy=policy, minibatches=minibatches, frozen=frozen),
                **value_stats, **critic.metrics()}

    # =============================================================================================
    # The pieces of the step
    # =============================================================================================
    @torch.no_grad()
    def record_old_values(self, minibatches: list[Minibatch]) -> None:
        """`extras["old_values"]` of every micro-batch: the critic before this step's updates."""
        critic = self.parts.critic
        critic.eval()
        for mb in minibatches:
            for batch in mb.micro_batches:
                batch.extras["old_values"] = critic(batch).float()

    def estimate_advantages(self, minibatches: list[Minibatch]) -> dict:
        """GAE over every sequence of this rank (sequences never span micro-batches): `extras["advantages"]`
        (whitened over the step when `critic.whiten_advantages`) and `extras["returns"]`; returns the value
        statistics. The backwards recursion runs once for all micro-batches, on the CPU: it is a loop over
        positions whose steps are tiny, which a GPU would spend in kernel launches."""
        cfg, ctx = self.cfg, self.ctx
        c = cfg.critic
        batches = [b for mb in minibatches for b in mb.micro_batches]
        if not batches:
            return dict.fromkeys(("critic/explained_variance", "critic/value_mean", "critic/return_mean"), math.nan)
        token_rewards = [kl_penalized_rewards(b.advantages.float(), b.labels, b.cu_seqlens, b.old_logprobs,
                                              b.ref_logprobs, c.kl_reward_coef) for b in batches]
        labels = torch.cat([b.labels for b in batches]).cpu()
        values = torch.cat([b.extras["old_values"] for b in batches]).cpu()
        lengths = torch.cat([(b.cu_seqlens[1:] - b.cu_seqlens[:-1]).cpu() for b in batches])
        cu_seqlens = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])
        advantages, returns = gae_advantages(torch.cat(token_rewards).cpu(), values, labels, cu_seqlens,
                                             gamma=c.gamma, lam=c.lam)
        action = labels != -100
        local = torch.cat([moment_sums(advantages, action), residual_sums(values, returns, action),
                           torch.where(action, values.double(), 0.0).sum().reshape(1)])
        totals = all_reduce_sum(local.to(ctx.device), ctx).cpu()
        moments, residuals, value_sum = totals[:3], totals[3:8], float(totals[8])
        if c.whiten_advantages:
            advantages = whiten(advantages, action, moments)
        sizes = [b.num_tokens for b in batches]
        for batch, adv, ret in zip(batches, advantages.split(sizes), returns.split(sizes)):
            batch.extras["advantages"], batch.extras["returns"] = adv.to(ctx.device), ret.to(ctx.device)
        n = float(residuals[0])
        nan = math.nan
        return {"critic/explained_variance": explained_variance_from_sums(residuals) if n else nan,
                "critic/value_mean": value_sum / n if n else nan,
                "critic/return_mean": float(residuals[1]) / n if n else nan}

    def policy_advantages(self, batch):
        return batch.extras["advantages"]  # per token

    def on_policy(self, minibatches: list[Minibatch]) -> bool:
        """As GRPO's, unless the KL penalty in the reward needs the old log-probs before GAE."""
        return super().on_policy(minibatches) and not (self.cfg.critic.kl_reward_coef and
                                                       self.parts.reference is not None)

    def critic_minibatch(self, step: int, mb: Minibatch) -> dict:
        """The clipped value loss on every micro-batch, then one update: token mean over the minibatch, all ranks
        (`critic.loss_agg` "token"), or the mean over its sequences of per-sequence token means ("sequence",
        OpenRLHF's `ValueLoss`: `masked_mean(loss, action_mask, dim=-1).mean()`)."""
        parts, ctx = self.parts, self.ctx
        parts.critic.train()
        total = torch.zeros((), dtype=torch.float64, device=ctx.device)
        for batch in mb.micro_batches:
            values = parts.critic(batch)
            if self.cfg.critic.loss_agg == "sequence":
                loss = sequence_mean_value_loss(values, batch, self.cfg.critic.value_clip, mb.sequences)
            else:
                loss = clipped_value_loss(values, batch.extras["old_values"], batch.extras["returns"],
                                          batch.action_mask, self.cfg.critic.value_clip, num_tokens=mb.action_tokens)
            (loss * ctx.world_size).backward()
            total += loss.detach().double()
        loss = float(all_reduce_sum(total.reshape(1), ctx)[0])
        norm, stepped = self.update(step, "critic", parts.critic, parts.critic_optim, self.cfg.critic_optim.grad_clip,
                                    loss)
        self.tick_per_update(parts.critic_sched, self.cfg.critic_optim)
        return {"loss": loss, "grad_norm": norm, "applied": stepped}

    @staticmethod
    def sequence_advantage_means(minibatches: list[Minibatch]) -> torch.Tensor:
        """Per-sequence mean of the (whitened) token advantages of this rank's micro-batches, for the
        `advantage/*` metrics (each rank reports its own micro-batches' sequences)."""
        means = []
        for mb in minibatches:
            for batch in mb.micro_batches:
                if batch.is_padding:
                    continue
                for adv in batch.unpack_actions(batch.extras["advantages"]):
                    if adv.numel():
                        means.append(adv.double().mean())
        return torch.stack(means) if means else torch.zeros(0, dtype=torch.float64)


class CriticPassStats:
    """The critic's per-step statistics over minibatch passes."""

    def __init__(self):
        self.losses: list[float] = []
        self.norms: list[float] = []

    def add(self, mb: dict) -> None:
        self.losses.append(mb["loss"])
        if mb["applied"]:
            self.norms.append(mb["grad_norm"])

    def metrics(self) -> dict:
        nan = math.nan
        return {"critic/value_loss": sum(self.losses) / len(self.losses) if self.losses else nan,
                "grad_norm/critic": sum(self.norms) / len(self.norms) if self.norms else nan}


def sequence_mean_value_loss(values: torch.Tensor, batch, clip: float, num_sequences: torch.Tensor) -> torch.Tensor:
    """The clipped value loss per sequence (token mean over its action tokens), summed over this micro-batch's
    sequences / `num_sequences` (the minibatch's, all ranks): summed over micro-batches and ranks it is the mean
    over sequences of per-sequence means (OpenRLHF's `ValueLoss`)."""
    old, returns, action = batch.extras["old_values"], batch.extras["returns"], batch.action_mask
    clipped = old + (values - old).clamp(-clip, clip)
    per_token = torch.where(action, 0.5 * torch.maximum((values - returns) ** 2, (clipped - returns) ** 2), 0.0)
    lengths = torch.as_tensor(batch.seq_lens, device=values.device)
    seq = torch.repeat_interleave(torch.arange(len(batch.seq_lens), device=values.device), lengths,
                                  output_size=batch.num_tokens)
    sums = torch.zeros(len(batch.seq_lens), dtype=per_token.dtype, device=values.device).index_add(0, seq, per_token)
    counts = torch.zeros_like(sums).index_add(0, seq, action.to(sums.dtype))
    per_sequence = torch.where(counts > 0, sums / counts.clamp(min=1), 0.0)
    return per_sequence.sum() / num_sequences.clamp(min=1)
