"""The OREAL trainer: `Trainer.train_step` is the whole algorithm, top to bottom. The loop, rollouts, judging,
updates, metrics, evaluation and checkpoints are shared with the other algorithms (`oreal.algorithms.loop`);
`run` builds the trainer of `cfg.algorithm` (oreal here; grpo and ppo in `oreal.algorithms`).

One step (OREAL, arXiv 2502.06781; DESIGN.md "Data flow"):

     1. sample prompts            this rank's share of the step's global batch (resumable sampler)
     2. rollouts                  K samples per prompt from the engine, which holds the current policy
     3. judge                     reward +1 / -1 per sample against the gold answer
     4. RLOO advantages           over the K samples of each prompt, before filtering
     5. filter                    drop all-correct and all-wrong prompts; keep one correct and one wrong
                                  sample of each other prompt
     6. token-RM scores           per action token of the kept samples of all ranks, packed into balanced
                                  micro-batches (the token RM reads the same packed layout as the policy);
                                  the RM's BCE gradients accumulate in the same forward, applied in step 10
     7. policy forward + loss     the same packed micro-batches through the policy and the fused OREAL loss,
                                  with the global positive/negative token counts (all-reduced once per step)
                                  and the frozen reference's log-probs
     8. gradient accumulation     over the micro-batches
     9. optimizer step            AdamW with clipping; skipped while the policy is frozen, and skipped with
                                  a warning and a counter when the loss or the gradient is not finite
    10. token-RM update           binary cross-entropy of sigmoid(mean score) against the outcome
    11. weight sync               the new policy weights into the rollout engine, in place

Gradient scale: each micro-batch's fused loss is normalised by the global token counts, so the
step's loss is the plain sum over micro-batches and ranks; FSDP2 averages gradients over ranks,
so every backward is scaled by the world size to turn that average back into the sum.

Determinism (exact resume): sampling seeds and the filter's choices derive from (seed, step), the
sampler and the RNGs are checkpointed, and nothing depends on what ran before a step but the
checkpointed state.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist

from oreal.runtime.checkpoint import CheckpointError, CheckpointManager
from oreal.runtime.config import Config, ConfigError
from oreal.data import TrainingSample
from oreal.data import pack_rollouts
from oreal.runtime.distributed import all_reduce_sum
from oreal.algorithms.filtering import select_samples
from oreal.algorithms.loss_terms import loss_term_sums
from oreal.runtime.metrics import MetricsLogger
from oreal.algorithms.loop import ENGINE_LOGPROBS, BaseTrainer, PhaseTimer, _rate, apply_update, step_seed  # noqa: F401 (re-exported)
from oreal.algorithms.advantages import rloo_advantages
from oreal.algorithms.token_rm import token_rm_loss

# Every key below is in every line of metrics.jsonl ("nan" where a step had nothing to measure).
REQUIRED_METRICS = (
    "reward/mean", "reward/pass_rate", "filter/kept_prompts", "filter/kept_samples", "filter/all_correct_prompts",
    "filter/all_wrong_prompts", "response/length_mean", "response/length_max", "response/truncated_fraction",
    "policy/entropy", "policy/kl", "loss/total", "loss/positive", "loss/negative", "loss/kl", "token_rm/loss",
    "token_rm/accuracy", "grad_norm/policy", "grad_norm/token_rm", "lr/policy", "lr/token_rm",
    "throughput/tokens_per_s", "throughput/rollout_tokens_per_s", "throughput/train_tokens_per_s", "time/rollout",
    "time/judge", "time/train", "time/sync", "time/step", "faults/skipped_steps", "policy/frozen",
    "policy/updated", "data/overlong_prompts", "packing/micro_batches", "judge/timeouts", "rollout/logprob_abs_diff",
    "rollout/staleness", "rollout/policy_version",
)


class Trainer(BaseTrainer):
    """OREAL (arXiv 2502.06781): RLOO, the one-pair filter, the token RM and the fused OREAL loss."""

    REQUIRED_METRICS = REQUIRED_METRICS

    # =============================================================================================
    # The step
    # =============================================================================================
    def train_step(self, step: int) -> dict:
        cfg, parts = self.cfg, self.parts
        timer = PhaseTimer()
        step_start = time.perf_counter()
        frozen = step <= cfg.train.freeze_policy_steps
        lrs = self.learning_rates(frozen)

        # 1-3. This rank's prompts, K rollouts of each from the engine (the current policy), their verdicts.
        prompts, overlong, samples, correct, group_ids = self.collect(step, timer)
        rewards = torch.tensor([1.0 if c else -1.0 for c in correct])  # the outcome reward: +1 or -1

        # 4. RLOO advantages over the K samples of each prompt, before filtering.
        advantages = rloo_advantages(rewards, group_ids)

        # 5. Filter: drop all-correct and all-wrong prompts; keep one correct and one wrong sample of the others.
        kept = select_samples(correct, group_ids.tolist(), seed=cfg.train.seed, step=step,
                              one_pair_per_prompt=cfg.loss.filter_groups)
        kept_samples = self.training_samples(prompts, samples, advantages, correct, kept)

        with timer.phase("train"):
            # 6. Token-RM scores of every action token, on the kept samples of all ranks packed into
            #    micro-batches (global token counts all-reduced once); its BCE gradients accumulate.
            micro_batches, (pos_tokens, neg_tokens, num_sequences) = self.pack(kept_samples)
            rm_stats = self.score_with_token_rm(micro_batches, num_sequences)

            # 7-8. Policy forward + fused OREAL loss (global counts, reference log-probs), accumulated.
            policy_stats = self.policy_loss(micro_batches, pos_tokens, neg_tokens, train=not frozen,
                                            poison=step == cfg.debug.nonfinite_at_step)

            # 9. Optimizer step: clipped; skipped while frozen, or (warning + counter) on a non-finite update.
            policy_norm, policy_updated = math.nan, False
            if micro_batches and not frozen:
                policy_norm, policy_updated = self.update(step, "policy", parts.policy, parts.policy_optim,
                                                          cfg.policy_optim.grad_clip, policy_stats["loss/total"])

            # 10. Token-RM update: BCE of sigmoid(mean score over a response) against its outcome.
            rm_norm = math.nan
            if micro_batches and parts.token_rm is not None:
                rm_norm, _ = self.update(step, "token RM", parts.token_rm, parts.rm_optim, cfg.rm_optim.grad_clip,
                                         rm_stats["token_rm/loss"])
            self.advance_schedules(frozen)

        # 11. Weight sync: the engine gets the new policy weights, in place (only when they changed).
        if policy_updated:
            with timer.phase("sync"):
                parts.generator.sync()

        timer.seconds["step"] = time.perf_counter() - step_start
        rollout_stats = self.rollout_metrics(samples, correct, group_ids, kept, overlong)
        return {**rollout_stats, **lrs, **rm_stats, **policy_stats,
                "grad_norm/policy": policy_norm, "grad_norm/token_rm": rm_norm,
                "policy/frozen": float(frozen), "policy/updated": float(policy_updated),
                "faults/skipped_steps": float(self.skipped_steps),
                "packing/micro_batches": float(len(micro_batches)),
                **self.logprob_gap_metrics(), **self.timing_metrics(timer, policy_stats), **parts.judge.counters()}

    # =============================================================================================
    # The pieces of the step
    # =============================================================================================
    def learning_rates(self, frozen: bool) -> dict:
        parts = self.parts
        return {"lr/policy": 0.0 if frozen else parts.policy_optim.param_groups[0]["lr"],
                "lr/token_rm": parts.rm_optim.param_groups[0]["lr"] if parts.rm_optim is not None else 0.0}

    @staticmethod
    def training_samples(prompts, samples, advantages, correct, kept) -> list[TrainingSample]:
        flat = [(p, s) for p, group in zip(prompts, samples) for s in group]
        return [TrainingSample(prompt_ids=flat[i][0].input_ids, response_ids=flat[i][1].token_ids,
                               advantage=float(advantages[i]), is_positive=bool(correct[i]),
                               extras={ENGINE_LOGPROBS: flat[i][1].logprobs}) for i in kept]

    def pack(self, kept_local: list[TrainingSample]) -> tuple[list, tuple]:
        """This rank's micro-batches of every rank's kept samples, and the global (positive tokens,
        negative tokens, sequences) counts.

        Packing balances all kept samples over ranks and micro-batches, so it sees the global list;
        every rank gets the same number of micro-batches (padding ones where it has fewer). The counts
        are all-reduced once, here, and reused by every micro-batch's loss.
        """
        ctx = self.ctx
        everyone = self.gather_samples(kept_local)
        if not everyone:  # every rank sees the same (empty) list: all skip together
            return [], (None, None, None)
        batches, self.packing_report = pack_rollouts(everyone, max_tokens=self.machine_budget()[0],
                                                     world_size=ctx.world_size, rank=ctx.rank,
                                                     pad_token_id=self.parts.tokenizer.pad_token_id or 0,
                                                     shared_prompts=self.cfg.train.share_prompts)
        batches = [b.to(ctx.device) for b in batches]
        local = torch.zeros(3, dtype=torch.float64, device=ctx.device)
        for b in batches:
            if not b.is_padding:
                pos, neg = b.action_token_counts()
                local += torch.stack([pos.double(), neg.double(), pos.new_tensor(b.num_sequences).double()])
        counts = all_reduce_sum(local, ctx).float()
        return batches, (counts[0], counts[1], counts[2])

    def score_with_token_rm(self, micro_batches: list, num_sequences) -> dict:
        """Set `rm_scores` on every micro-batch and accumulate the RM's BCE gradients; returns global stats.

        Accuracy: the share of sequences whose mean-score sign matches their outcome, scored before
        this step's RM update (so on samples the RM has not trained on).
        """
        rm = self.parts.token_rm
        if rm is None or not micro_batches:
            return {"token_rm/loss": math.nan, "token_rm/accuracy": math.nan}
        ctx = self.ctx
        sums = torch.zeros(3, dtype=torch.float64, device=ctx.device)  # loss, right sign, sequences
        rm.train()
        for batch in micro_batches:
            scores = rm(batch)
            loss, logits, real = token_rm_loss(scores, batch, num_sequences)
            (loss * ctx.world_size).backward()
            batch.rm_scores = scores.detach()
            right = ((logits > 0) == batch.is_positive) & real
            sums += torch.stack([loss.detach().double(), right.sum().double(), real.sum().double()])
        loss, right, sequences = all_reduce_sum(sums, ctx).tolist()
        return {"token_rm/loss": loss, "token_rm/accuracy": right / sequences if sequences else math.nan}

    def policy_loss(self, micro_batches: list, pos_tokens, neg_tokens, *, train: bool, poison: bool = False) -> dict:
        """Fused OREAL loss per micro-batch, backward when training (accumulating); the step's global terms.

        While the policy is frozen this is a forward only, for the entropy / KL / loss metrics.
        `poison` (debug.nonfinite_at_step) makes the loss NaN, to exercise the skip path.
        """
        names = ("loss/total", "loss/positive", "loss/negative", "loss/kl", "policy/entropy", "policy/kl")
        if not micro_batches:
            self.trained_tokens = 0.0
            return dict.fromkeys(names, math.nan)
        parts, ctx, loss_cfg = self.parts, self.ctx, self.cfg.loss
        sums = torch.zeros(8, dtype=torch.float64, device=ctx.device)
        parts.policy.train(train)
        for batch in micro_batches:
            batch.ref_logprobs = parts.reference(batch) if parts.reference is not None else None
            # Data sampled by older weights (rollout.max_staleness 1): the loss weights each token by the
            # truncated importance ratio against the engine's log-probs (oreal.ops.loss, "off-policy OREAL").
            behavior = batch.extras.get(ENGINE_LOGPROBS) if self.data_staleness > 0 else None
            with nullcontext() if train else torch.no_grad():
                out = parts.policy(batch, rm_scores=batch.rm_scores, ref_logprobs=batch.ref_logprobs,
                                   pos_tokens=pos_tokens, neg_tokens=neg_tokens, behavior_logprobs=behavior)
                self.note_logprob_gap(batch, out.logprobs)  # the weights the engine sampled with
                loss = out.loss * math.nan if poison else out.loss
                if train:
                    (loss * ctx.world_size).backward()
            sums += loss_term_sums(batch, out._replace(loss=loss), kl_coef=loss_cfg.kl_coef,
                                   pos_coef=loss_cfg.pos_coef, neg_coef=loss_cfg.neg_coef, pos_tokens=pos_tokens,
                                   neg_tokens=neg_tokens, behavior_logprobs=behavior,
                                   importance_cap=loss_cfg.importance_cap)
        total, positive, negative, kl_term, entropy, k3, actions, tokens = all_reduce_sum(sums, ctx).tolist()
        self.trained_tokens = tokens
        return dict(zip(names, (total, positive, negative, kl_term, entropy / actions if actions else math.nan,
                                k3 / actions if actions else math.nan)))


def trainer_class(algorithm: str) -> type[BaseTrainer]:
    """The trainer of `--algorithm`: OREAL's (here), or GRPO's / PPO's (`oreal.algorithms`)."""
    if algorithm == "oreal":
        return Trainer
    from oreal.algorithms import recipe_trainer

    return recipe_trainer(algorithm)


def run(cfg: Config) -> int:
    """Build everything, train, clean up. Returns the process exit code."""
    from oreal.algorithms.assemble import build
    from oreal.runtime.setup_errors import SetupError
    from oreal.runtime.distributed import init_distributed
    from oreal.runtime.output_folder import check_output_folder, prepare_output_folder

    try:  # every rank reads the folder before any rank writes to it (the barrier below)
        check_output_folder(cfg.output_dir, resume=bool(cfg.resume), overwrite=cfg.overwrite)
    except ConfigError as exc:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"oreal-train: error: {exc}", file=sys.stderr, flush=True)
        return 2
    ctx = init_distributed(cfg.train.device)
    if dist.is_initialized():
        dist.barrier()
    if ctx.is_main:
        prepare_output_folder(cfg.output_dir, resume=bool(cfg.resume), overwrite=cfg.overwrite)
    if dist.is_initialized():
        dist.barrier()
    torch.manual_seed(cfg.train.seed)
    parts = None
    try:
        try:
            parts = build(cfg, ctx)
        except SetupError as exc:
            if ctx.is_main:
                print(f"oreal-train: error: {exc}", file=sys.stderr, flush=True)
            return 2
        trainer = trainer_class(cfg.algorithm)(cfg, parts, checkpoints=CheckpointManager(
            cfg.output_dir, keep_last=cfg.checkpoint.keep_last, kill_mid_save_step=cfg.debug.kill_mid_save_step))
        try:
            start_step = trainer.resume()
        except CheckpointError as exc:
            if ctx.is_main:
                print(f"oreal-train: error: {exc}", file=sys.stderr, flush=True)
            return 2
        metrics = MetricsLogger.from_log_config(cfg.log, cfg.output_dir, enabled=ctx.is_main,
                                                total_steps=cfg.train.steps, start_step=start_step,
                                                run_config=dataclasses.asdict(cfg), name=cfg.algorithm)
        trainer.metrics = metrics
        try:
            trainer.fit(start_step)
        finally:
            metrics.close()
        return 0
    finally:
        if parts is not None:
            parts.close()
        if dist.is_initialized():
            dist.destroy_process_group()
