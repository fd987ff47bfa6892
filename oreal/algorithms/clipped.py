"""The clipped-surrogate update shared by GRPO and PPO, on top of the common trainer machinery.

One step's update, after the samples have their advantages:

    minibatches     the step's samples of all ranks, shuffled by (seed, step) and split into `ppo.minibatches`
                    groups (`ppo.shuffle` false: minibatch j holds the j-th contiguous share of every rank's
                    samples, as RLinf splits each rank's batch), each packed into balanced micro-batches (every
                    rank gets as many)
    old log-probs   the behaviour log-probs: a no-grad forward of the policy over every micro-batch before the
                    first update (RLinf's `recompute_logprobs: True`, verl), or the engine's own log-probs of
                    the sampled tokens (`ppo.old_logprobs` "engine", RLinf's 7B recipe); when the update is
                    exactly on-policy they are the detached current log-probs and the forward is skipped; the
                    reference's when a KL term needs them
    epochs          `ppo.epochs` passes over the minibatches (in a (seed, step, epoch)-seeded order when
                    shuffled); per minibatch: fused clipped-surrogate loss per micro-batch, normalised by the
                    minibatch's global token count (DAPO), by the step's (`ppo.loss_agg` "step_token", RLinf's
                    `use_valid_token_scale`) or per sequence ("sequence"), backward, then
                      - early stop (`ppo.early_stop_ratio`): with scope "micro_batch" (RLinf) the loss of a
                        micro-batch whose token-mean ratio, averaged over the ranks, exceeds the bound is zeroed
                        (`update/zeroed_micro_batches`) and the update goes on with the rest; with scope
                        "minibatch" the whole minibatch's gradients are dropped when its ratio (token mean over
                        all ranks, or max) exceeds it (`update/skipped_minibatches`)
                      - update: clip and step (skipped and counted in `faults/skipped_steps` if not finite)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist

from oreal.data import PackedBatch, pack_rollouts
from oreal.data import TrainingSample
from oreal.runtime.distributed import all_reduce_sum, gathered_within_step
from oreal.algorithms.ppo_family import should_skip_minibatch
from oreal.algorithms.loop import ENGINE_LOGPROBS, BaseTrainer

if TYPE_CHECKING:
    from oreal.rollout.types import Rollout

# Every key below is in every line of metrics.jsonl of a GRPO or PPO run ("nan" where nothing was measured).
CLIPPED_METRICS = (
    "reward/mean", "reward/pass_rate", "reward/scaled_mean", "advantage/mean", "advantage/abs_mean",
    "filter/kept_prompts", "filter/kept_samples", "filter/all_correct_prompts", "filter/all_wrong_prompts",
    "response/length_mean", "response/length_max", "response/truncated_fraction", "data/overlong_prompts",
    "loss/policy", "policy/entropy", "policy/kl", "policy/clip_fraction", "policy/ratio_mean", "policy/ratio_max",
    "update/minibatches", "update/applied", "update/skipped_minibatches", "update/skipped_minibatches_total",
    "update/zeroed_micro_batches",
    "grad_norm/policy", "lr/policy", "policy/frozen", "policy/updated", "faults/skipped_steps",
    "packing/micro_batches", "throughput/tokens_per_s", "throughput/rollout_tokens_per_s",
    "throughput/train_tokens_per_s", "time/rollout", "time/judge", "time/logprobs", "time/train", "time/sync",
    "time/step", "judge/timeouts", "rollout/logprob_abs_diff",
)


@dataclass
class Minibatch:
    """One optimizer update's share of the step: this rank's micro-batches and global counts (all ranks)."""

    micro_batches: list[PackedBatch]
    action_tokens: torch.Tensor | None = None  # 0-d float: the loss's token normaliser
    sequences: torch.Tensor | None = None  # 0-d float: sequences with at least one action token
    tokens: float = 0.0  # all tokens, prompts included (throughput)


def active_sequences(batch: PackedBatch) -> int:
    """Sequences of `batch` with at least one action token (host-side metadata, no device sync)."""
    if batch.is_padding:
        return 0
    return sum(1 for length, prompt in zip(batch.seq_lens, batch.prompt_lens) if length > prompt)


class PolicyPassStats:
    """Per-step policy statistics, accumulated over minibatch passes (token-weighted means, a max, counts)."""

    def __init__(self):
        self.sums = {"loss": 0.0, "clipped": 0.0, "ratio": 0.0, "entropy": 0.0, "k3": 0.0, "tokens": 0.0}
        self.ratio_max = 0.0
        self.passes = self.applied = self.skipped = self.zeroed = 0
        self.norms: list[float] = []

    def add(self, mb: dict) -> None:
        for key in self.sums:
            self.sums[key] += mb[key]
        self.ratio_max = max(self.ratio_max, mb["ratio_max"])
        self.passes += 1
        self.applied += int(mb["applied"])
        self.skipped += int(mb["skipped"])
        self.zeroed += int(mb.get("zeroed", 0))
        if mb["applied"]:
            self.norms.append(mb["grad_norm"])

    def metrics(self, has_reference: bool) -> dict:
        s, nan = self.sums, math.nan
        tokens = s["tokens"]
        per_token = (lambda v: v / tokens) if tokens else (lambda v: nan)
        return {"loss/policy": s["loss"] / self.passes if self.passes else nan,
                "policy/entropy": per_token(s["entropy"]),
                "policy/kl": per_token(s["k3"]) if has_reference else nan,
                "policy/clip_fraction": per_token(s["clipped"]), "policy/ratio_mean": per_token(s["ratio"]),
                "policy/ratio_max": self.ratio_max if self.passes else nan,
                "update/minibatches": float(self.passes), "update/applied": float(self.applied),
                "update/skipped_minibatches": float(self.skipped),
                "update/zeroed_micro_batches": float(self.zeroed),
                "grad_norm/policy": sum(self.norms) / len(self.norms) if self.norms else nan}


class ClippedUpdateTrainer(BaseTrainer):
    """GRPO's and PPO's shared update; subclasses write `train_step` and say where advantages come from."""

    REQUIRED_METRICS = CLIPPED_METRICS

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.skipped_minibatches = 0  # over the run (checkpointed)
        self.step_action_tokens: torch.Tensor | None = None  # the step's action tokens, all ranks and minibatches

    # ---------------------------------------------------------------------------------------------
    # Samples and minibatches
    # ---------------------------------------------------------------------------------------------
    def rewards(self, correct: list[bool], samples: list[list[Rollout]]) -> torch.Tensor:
        """The judge's verdicts as rewards: `ppo.reward_correct` / `ppo.reward_wrong` (RLinf: +5 / -5); with
        `ppo.reward_rule` "boxed", SimpleRL-Zero's rule: `ppo.reward_unboxed` for a response without "boxed"."""
        p = self.cfg.ppo
        verdicts = [p.reward_correct if c else p.reward_wrong for c in correct]
        if p.reward_rule == "boxed":
            decode = self.parts.tokenizer.decode
            texts = [decode(s.token_ids, skip_special_tokens=False) for group in samples for s in group]
            verdicts = simplerl_rewards(correct, texts, correct_reward=p.reward_correct, wrong_reward=p.reward_wrong,
                                        unboxed_reward=p.reward_unboxed)
        return torch.tensor(verdicts, dtype=torch.float32)

    def training_samples(self, prompts, samples, advantages, correct) -> list[TrainingSample]:
        """Every sample of every prompt (nothing is filtered), with its advantage and verdict, and the engine's
        log-probs as its behaviour log-probs when `ppo.old_logprobs` is "engine"."""
        engine = self.cfg.ppo.old_logprobs == "engine"
        flat = [(p, s) for p, group in zip(prompts, samples) for s in group]
        return [TrainingSample(prompt_ids=p.input_ids, response_ids=s.token_ids, advantage=float(a),
                               is_positive=bool(c), old_logprobs=s.logprobs if engine else None,
                               extras={ENGINE_LOGPROBS: s.logprobs})
                for (p, s), a, c in zip(flat, advantages.tolist(), correct)]

    def make_minibatches(self, local_samples: list[TrainingSample], step: int) -> list[Minibatch]:
        """Every rank's samples, shuffled by (seed, step), split into `ppo.minibatches` groups, each packed into
        this rank's balanced micro-batches; global token and sequence counts all-reduced once."""
        ctx, cfg = self.ctx, self.cfg
        by_rank = self.gather_per_rank(local_samples)
        everyone = [sample for part in by_rank for sample in part]
        if not everyone:
            self.packing_report = None
            self.step_action_tokens = None
            return []
        count = min(cfg.ppo.minibatches, len(everyone))
        if cfg.ppo.shuffle:
            order = np.random.default_rng([cfg.train.seed, step, 0x6D62]).permutation(len(everyone))
            chunks = [c for c in np.array_split(order, count) if len(c)]
        else:  # RLinf without shuffle_rollout: minibatch j is the j-th contiguous share of every rank's batch
            starts = np.cumsum([0] + [len(part) for part in by_rank])
            per_rank = [np.array_split(np.arange(a, b), count) for a, b in zip(starts, starts[1:])]
            chunks = [c for c in (np.concatenate([split[j] for split in per_rank]) for j in range(count)) if len(c)]
        minibatches, worst = [], None
        for chunk in chunks:
            batches, report = pack_rollouts([everyone[i] for i in chunk], max_tokens=self.machine_budget()[0],
                                            world_size=ctx.world_size, rank=ctx.rank,
                                            pad_token_id=self.parts.tokenizer.pad_token_id or 0,
                                            shared_prompts=self.cfg.train.share_prompts)
            if worst is None or report.largest_over_rank_mean > worst.largest_over_rank_mean:
                worst = report
            minibatches.append(Minibatch([b.to(ctx.device) for b in batches]))
        self.packing_report = worst
        rows = []  # per minibatch: action tokens (on the device: no host sync), sequences, tokens (host metadata)
        for mb in minibatches:
            real = [b for b in mb.micro_batches if not b.is_padding]
            actions = sum((b.action_mask.sum() for b in real), torch.zeros((), dtype=torch.int64, device=ctx.device))
            host = torch.tensor([sum(active_sequences(b) for b in real), sum(b.num_tokens for b in real)],
                                dtype=torch.float64, device=ctx.device)
            rows.append(torch.cat([actions.double().reshape(1), host]))
        counts = all_reduce_sum(torch.stack(rows), ctx)
        for mb, (actions, sequences, tokens) in zip(minibatches, counts):
            mb.action_tokens, mb.sequences, mb.tokens = actions.float(), sequences.float(), float(tokens)
        self.step_action_tokens = counts[:, 0].sum().float()  # "step_token": the whole step's (all minibatches)
        return minibatches

    def passes(self, minibatches: list[Minibatch], step: int):
        """`ppo.epochs` passes over the minibatches, each in an order seeded by (seed, step, epoch), or in
        order when `ppo.shuffle` is off (RLinf iterates its split in order)."""
        for epoch in range(self.cfg.ppo.epochs):
            order = range(len(minibatches))
            if self.cfg.ppo.shuffle:
                order = np.random.default_rng([self.cfg.train.seed, step, epoch, 0x6570]).permutation(len(minibatches))
            for index in order:
                yield minibatches[int(index)]

    # ---------------------------------------------------------------------------------------------
    # Old log-probs and the policy update
    # ---------------------------------------------------------------------------------------------
    def on_policy(self, minibatches: list[Minibatch]) -> bool:
        """Whether the step's update is exactly on-policy: one epoch over one minibatch, with recomputed behaviour
        log-probs (the engine generated with the current weights: every step syncs before it samples). The
        behaviour log-probs are then the detached current ones, and no forward is needed to get them."""
        p = self.cfg.ppo
        return p.old_logprobs == "recompute" and p.epochs == 1 and len(minibatches) == 1

    @torch.no_grad()
    def record_old_logprobs(self, minibatches: list[Minibatch]) -> None:
        """`old_logprobs` (and `ref_logprobs` when a reference is built) of every micro-batch: a no-grad forward
        of the current policy, in eval mode, before any update of the step; kept as packed from the engine's
        log-probs with `ppo.old_logprobs` "engine"; None (the loss's own, detached) when `on_policy`."""
        parts = self.parts
        parts.policy.eval()
        mode = "engine" if self.cfg.ppo.old_logprobs == "engine" else "on_policy" if self.on_policy(minibatches) \
            else "forward"
        for mb in minibatches:
            for batch in mb.micro_batches:
                if mode == "forward":
                    zeros = torch.zeros(batch.num_tokens, dtype=torch.float32, device=batch.device)
                    batch.old_logprobs = parts.policy(batch, advantages=zeros, old_logprobs=zeros).logprobs.float()
                    self.note_logprob_gap(batch, batch.old_logprobs)
                elif mode == "on_policy":
                    batch.old_logprobs = None
                elif batch.old_logprobs is None:  # a padding micro-batch has no sampled tokens
                    batch.old_logprobs = torch.zeros(batch.num_tokens, dtype=torch.float32, device=batch.device)
                batch.ref_logprobs = parts.reference(batch).float() if parts.reference is not None else None
        if mode == "forward":
            self.close_logprob_gap()  # every action token was noted

    def policy_advantages(self, batch: PackedBatch) -> torch.Tensor:
        """The advantages the loss reads: per sequence `[S]` (GRPO) or per token `[T]` (PPO)."""
        return batch.advantages

    def policy_minibatch(self, step: int, mb: Minibatch, *, poison: bool = False) -> dict:
        """Forward-backward of one minibatch through the fused clipped surrogate, then update or skip it.

        Returns the minibatch's global statistics (sums over its tokens, the largest ratio, whether it was
        applied or skipped, the gradient norm). `poison` (debug.nonfinite_at_step) makes the loss NaN.
        """
        parts, ctx, p = self.parts, self.ctx, self.cfg.ppo
        parts.policy.train()
        sums = torch.zeros(6, dtype=torch.float64, device=ctx.device)  # loss, clipped, ratio, entropy, k3, tokens
        ratio_max = torch.zeros((), dtype=torch.float32, device=ctx.device)
        zeroed = torch.zeros((), dtype=torch.float32, device=ctx.device)
        per_micro_batch = bool(p.early_stop_ratio) and p.early_stop_scope == "micro_batch"
        num_tokens = self.step_action_tokens if p.loss_agg == "step_token" else mb.action_tokens
        last = len(mb.micro_batches) - 1
        with gathered_within_step(parts.policy, self.machine_budget()[1]) as before_micro_batch:
            for index, batch in enumerate(mb.micro_batches):
                before_micro_batch(last=index == last)
                out = parts.policy(batch, advantages=self.policy_advantages(batch), old_logprobs=batch.old_logprobs,
                                   ref_logprobs=batch.ref_logprobs, num_tokens=num_tokens)
                self.note_logprob_gap(batch, out.logprobs)  # until the step's first update
                loss = out.loss
                if p.loss_agg == "sequence":  # the call averaged over its own sequences: re-weight to the minibatch's
                    loss = loss * (active_sequences(batch) / mb.sequences.clamp(min=1))
                if per_micro_batch:  # RLinf: zero this micro-batch's loss if its ratio (mean over ranks) is too large
                    keep = micro_batch_within_bound(out.ratio_mean, p.early_stop_ratio, ctx.world_size)
                    loss = loss * keep
                    zeroed += 1 - keep
                if poison:
                    loss = loss * math.nan
                (loss * ctx.world_size).backward()
                action = batch.action_mask
                tokens = action.sum().double()
                k3 = torch.zeros((), dtype=torch.float64, device=ctx.device)
                if batch.ref_logprobs is not None:
                    d = batch.ref_logprobs.double() - out.logprobs.double()
                    k3 = torch.where(action, torch.exp(d) - d - 1, 0.0).sum()
                sums += torch.stack([loss.detach().double(), out.clip_fraction.double() * tokens,
                                     out.ratio_mean.double() * tokens,
                                     torch.where(action, out.entropy.double(), 0.0).sum(), k3, tokens])
                ratio_max = torch.maximum(ratio_max, out.ratio_max.float())
        loss, clipped, ratio, entropy, k3, tokens = all_reduce_sum(sums, ctx).tolist()
        if ctx.world_size > 1:
            dist.all_reduce(ratio_max, op=dist.ReduceOp.MAX)
        statistic = ratio_max if p.early_stop_statistic == "max" else torch.tensor(ratio / tokens if tokens else 0.0)
        stats = {"loss": loss, "clipped": clipped, "ratio": ratio, "entropy": entropy, "k3": k3, "tokens": tokens,
                 "ratio_max": float(ratio_max), "applied": False, "skipped": False, "grad_norm": math.nan,
                 "zeroed": int(zeroed.item()) if per_micro_batch else 0}
        minibatch_bound = p.early_stop_ratio if p.early_stop_scope == "minibatch" else None
        if should_skip_minibatch(statistic, minibatch_bound or None):  # every rank holds the same statistic
            parts.policy_optim.zero_grad(set_to_none=True)
            self.skipped_minibatches += 1
            stats["skipped"] = True
        else:
            stats["grad_norm"], stats["applied"] = self.update(step, "policy", parts.policy, parts.policy_optim,
                                                               self.cfg.policy_optim.grad_clip, loss)
        self.close_logprob_gap()
        self.tick_per_update(parts.policy_sched, self.cfg.policy_optim)
        return stats

    # ---------------------------------------------------------------------------------------------
    # Metrics and state
    # ---------------------------------------------------------------------------------------------
    def learning_rates(self, frozen: bool) -> dict:
        return {"lr/policy": 0.0 if frozen else self.parts.policy_optim.param_groups[0]["lr"]}

    def advantage_metrics(self, rewards: torch.Tensor, advantages: torch.Tensor) -> dict:
        """Mean scaled reward over the step's samples, and mean / mean absolute advantage over the (per-sequence)
        `advantages` this rank holds, all ranks together."""
        n, r, m, a, abs_a = all_reduce_sum([rewards.numel(), rewards.double().sum(), advantages.numel(),
                                            advantages.double().sum(), advantages.double().abs().sum()],
                                           self.ctx).tolist()
        nan = math.nan
        return {"reward/scaled_mean": r / n if n else nan, "advantage/mean": a / m if m else nan,
                "advantage/abs_mean": abs_a / m if m else nan}

    def step_metrics(self, *, timer, samples, correct, group_ids, overlong, rewards, advantages, lrs: dict,
                     policy: PolicyPassStats, minibatches: list[Minibatch], frozen: bool) -> dict:
        """The metrics every GRPO / PPO step logs (`CLIPPED_METRICS`); PPO adds its critic's."""
        self.trained_tokens = sum(mb.tokens for mb in minibatches) * self.cfg.ppo.epochs
        kept = list(range(len(correct)))  # nothing is filtered
        return {**self.rollout_metrics(samples, correct, group_ids, kept, overlong),
                **self.advantage_metrics(rewards, advantages), **lrs,
                **policy.metrics(has_reference=self.parts.reference is not None),
                "update/skipped_minibatches_total": float(self.skipped_minibatches),
                "policy/frozen": float(frozen), "policy/updated": float(policy.applied > 0),
                "faults/skipped_steps": float(self.skipped_steps),
                "packing/micro_batches": float(sum(len(mb.micro_batches) for mb in minibatches)),
                **self.logprob_gap_metrics(), **self.timing_metrics(timer),
                "time/logprobs": timer.seconds.get("logprobs", 0.0),
                **self.parts.judge.counters()}

    def trainer_state(self) -> dict:
        return {**super().trainer_state(), "skipped_minibatches": self.skipped_minibatches}

    def load_trainer_state(self, state: dict) -> None:
        super().load_trainer_state(state)
        self.skipped_minibatches = int(state.get("skipped_minibatches", 0))


def micro_batch_within_bound(ratio_mean: torch.Tensor, bound: float, world_size: int) -> torch.Tensor:
    """RLinf's micro-batch early stop (`early_stop_imp_ratio`): 1.0 when this micro-batch's token-mean ratio,
    averaged over the data-parallel ranks (each holds as many micro-batches), is at most `bound`, else 0.0
    (the micro-batch's loss is then multiplied by 0). A micro-batch without tokens counts as ratio 0. No host
    synchronisation: the factor stays on the device."""
    ratio = torch.nan_to_num(ratio_mean.detach().float().reshape(1), nan=0.0).clone()
    if world_size > 1:
        dist.all_reduce(ratio)
        ratio = ratio / world_size
    return (ratio <= bound).float().reshape(())


def simplerl_rewards(correct: list[bool], texts: list[str], *, correct_reward: float, wrong_reward: float,
                     unboxed_reward: float) -> list[float]:
    """SimpleRL-Zero's rule reward (hkust-nlp/simpleRL-reason, branch v0, train/openrlhf/trainer/ppo_utils/
    experience_maker.py, `preprocess_box_response_for_qwen_prompt`): `correct_reward` (+1) for a correct
    answer, `wrong_reward` (-0.5) for a wrong one, and `unboxed_reward` (-1) whenever the response contains no
    "boxed" at all, whatever its answer (the check comes last there and overrides)."""
    return [unboxed_reward if "boxed" not in text else correct_reward if ok else wrong_reward
            for ok, text in zip(correct, texts)]
