"""The OREAL trainer: `Trainer.train_step` is the whole algorithm, top to bottom; `Trainer.fit` the loop.

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

import math
import os
import signal
import sys
import time
import warnings
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
import torch.distributed as dist

from oreal.checkpoint import CheckpointManager, export_hf, latest_checkpoint
from oreal.components import param_dtype
from oreal.config import Config
from oreal.data import Rollout as TrainingSample
from oreal.data import pack_rollouts
from oreal.distributed import DistContext, all_reduce_sum
from oreal.evaluation import BEST_METRIC, evaluate
from oreal.filtering import select_samples
from oreal.loss_terms import loss_term_sums
from oreal.metrics import MetricsLogger
from oreal.reward.advantages import rloo_advantages
from oreal.token_rm import token_rm_loss

# Every key below is in every line of metrics.jsonl ("nan" where a step had nothing to measure).
REQUIRED_METRICS = (
    "reward/mean", "reward/pass_rate", "filter/kept_prompts", "filter/kept_samples", "filter/all_correct_prompts",
    "filter/all_wrong_prompts", "response/length_mean", "response/length_max", "response/truncated_fraction",
    "policy/entropy", "policy/kl", "loss/total", "loss/positive", "loss/negative", "loss/kl", "token_rm/loss",
    "token_rm/accuracy", "grad_norm/policy", "grad_norm/token_rm", "lr/policy", "lr/token_rm",
    "throughput/tokens_per_s", "throughput/rollout_tokens_per_s", "throughput/train_tokens_per_s", "time/rollout",
    "time/judge", "time/train", "time/sync", "time/step", "faults/skipped_steps", "policy/frozen",
    "policy/updated", "data/overlong_prompts", "packing/micro_batches", "judge/timeouts",
)


class PhaseTimer:
    """Wall-clock seconds per named phase of a step."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


def apply_update(module: torch.nn.Module, optimizer: torch.optim.Optimizer, max_norm: float,
                 loss_is_finite: bool = True) -> tuple[float, bool]:
    """Clip and step, or skip a non-finite update. Returns (gradient norm before clipping, stepped).

    The norm is global (FSDP2's DTensor gradients are reduced across ranks), so every rank takes
    the same decision. A skipped update leaves the parameters and the optimizer state untouched.
    """
    params = [p for p in module.parameters() if p.grad is not None]
    if not params:
        return math.nan, False
    norm = torch.nn.utils.get_total_norm([p.grad for p in params], norm_type=2.0, foreach=True)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    norm_value = float(norm)
    if not (loss_is_finite and math.isfinite(norm_value)):
        optimizer.zero_grad(set_to_none=True)
        return norm_value, False
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm, foreach=True)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm_value, True


def step_seed(seed: int, step: int, salt: int = 0) -> int:
    """A sampling seed from (seed, step) alone, so that a resumed step samples what the original would have."""
    return (seed * 1_000_003 + step * 7_919 + salt * 104_729) % (2**31 - 1)


class Trainer:
    def __init__(self, cfg: Config, parts, *, checkpoints: CheckpointManager, metrics: MetricsLogger | None = None):
        self.cfg = cfg
        self.parts = parts
        self.ctx: DistContext = parts.ctx
        self.checkpoints = checkpoints
        self.metrics = metrics or MetricsLogger(cfg.output_dir, enabled=False, total_steps=cfg.train.steps)
        self.skipped_steps = 0
        self.best_step: int | None = None
        self.best_score = -math.inf

    # =============================================================================================
    # The step
    # =============================================================================================
    def train_step(self, step: int) -> dict:
        cfg, parts = self.cfg, self.parts
        timer = PhaseTimer()
        step_start = time.perf_counter()
        frozen = step <= cfg.train.freeze_policy_steps
        lrs = self.learning_rates(frozen)

        # 1. Sample prompts: this rank's share of the step's global batch.
        prompts, overlong = self.sample_prompts(cfg.rollout.max_new_tokens)

        # 2. Rollouts: K samples per prompt from the engine, which holds the current policy.
        with timer.phase("rollout"):
            samples = parts.generator.generate([p.input_ids for p in prompts], cfg.data.samples_per_prompt,
                                               self.sampling(step))

        # 3. Judge each response against its prompt's gold answer: reward +1 or -1.
        with timer.phase("judge"):
            correct = self.judge(prompts, samples)
        rewards = torch.tensor([1.0 if c else -1.0 for c in correct])
        group_ids = self.group_ids(samples)

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
                **self.timing_metrics(timer, policy_stats), **parts.judge.counters()}

    # =============================================================================================
    # The pieces of the step
    # =============================================================================================
    def learning_rates(self, frozen: bool) -> dict:
        parts = self.parts
        return {"lr/policy": 0.0 if frozen else parts.policy_optim.param_groups[0]["lr"],
                "lr/token_rm": parts.rm_optim.param_groups[0]["lr"] if parts.rm_optim is not None else 0.0}

    def sample_prompts(self, max_new_tokens: int) -> tuple[list, int]:
        """This rank's prompts of the step, less those over `data.max_prompt_tokens` or too long to leave
        room for a full response (they are counted in `data/overlong_prompts`)."""
        prompts = self.parts.dataset.batch(self.parts.sampler.next_indices())
        self.prompts_per_rank = len(prompts)
        budget = min(self.cfg.data.max_prompt_tokens, self.cfg.rollout.max_total_tokens - max_new_tokens)
        usable = [p for p in prompts if len(p.input_ids) <= budget]
        return usable, len(prompts) - len(usable)

    def sampling(self, step: int, *, eval_mode: bool = False):
        from oreal.rollout import SamplingParams

        if eval_mode:
            e = self.cfg.eval
            return SamplingParams(temperature=e.temperature, top_p=e.top_p, max_new_tokens=e.max_new_tokens,
                                  stop_token_ids=self.parts.stop_token_ids, seed=step_seed(self.cfg.train.seed, 0, 1))
        r = self.cfg.rollout
        return SamplingParams(temperature=r.temperature, top_p=r.top_p, top_k=r.top_k, max_new_tokens=r.max_new_tokens,
                              stop_token_ids=self.parts.stop_token_ids, seed=step_seed(self.cfg.train.seed, step))

    def judge(self, prompts: list, samples: list[list]) -> list[bool]:
        """One verdict per sample, prompt-major. The judge sees special tokens (a stop word must be visible)."""
        decode = self.parts.tokenizer.decode
        texts = [decode(s.token_ids, skip_special_tokens=False) for group in samples for s in group]
        golds = [p.gold_answer for p, group in zip(prompts, samples) for _ in group]
        questions = [p.example.question for p, group in zip(prompts, samples) for _ in group]
        return self.parts.judge(texts, golds, questions)

    def group_ids(self, samples: list[list]) -> torch.Tensor:
        """A step-unique id per prompt (rank * prompts per rank + local index) for each sample."""
        first = self.ctx.rank * self.prompts_per_rank
        return torch.tensor([first + i for i, group in enumerate(samples) for _ in group], dtype=torch.long)

    @staticmethod
    def training_samples(prompts, samples, advantages, correct, kept) -> list[TrainingSample]:
        flat = [(p, s) for p, group in zip(prompts, samples) for s in group]
        return [TrainingSample(prompt_ids=flat[i][0].input_ids, response_ids=flat[i][1].token_ids,
                               advantage=float(advantages[i]), is_positive=bool(correct[i])) for i in kept]

    def pack(self, kept_local: list[TrainingSample]) -> tuple[list, tuple]:
        """This rank's micro-batches of every rank's kept samples, and the global (positive tokens,
        negative tokens, sequences) counts.

        Packing balances all kept samples over ranks and micro-batches, so it sees the global list;
        every rank gets the same number of micro-batches (padding ones where it has fewer). The counts
        are all-reduced once, here, and reused by every micro-batch's loss.
        """
        ctx = self.ctx
        gathered = [None] * ctx.world_size
        dist.all_gather_object(gathered, kept_local, group=self.parts.object_group)
        everyone = [sample for part in gathered for sample in part]
        if not everyone:  # every rank sees the same (empty) list: all skip together
            return [], (None, None, None)
        batches, self.packing_report = pack_rollouts(everyone, max_tokens=self.cfg.train.micro_batch_tokens,
                                                     world_size=ctx.world_size, rank=ctx.rank,
                                                     pad_token_id=self.parts.tokenizer.pad_token_id or 0)
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
            with nullcontext() if train else torch.no_grad():
                out = parts.policy(batch, rm_scores=batch.rm_scores, ref_logprobs=batch.ref_logprobs,
                                   pos_tokens=pos_tokens, neg_tokens=neg_tokens)
                loss = out.loss * math.nan if poison else out.loss
                if train:
                    (loss * ctx.world_size).backward()
            sums += loss_term_sums(batch, out._replace(loss=loss), kl_coef=loss_cfg.kl_coef,
                                   pos_coef=loss_cfg.pos_coef, neg_coef=loss_cfg.neg_coef, pos_tokens=pos_tokens,
                                   neg_tokens=neg_tokens)
        total, positive, negative, kl_term, entropy, k3, actions, tokens = all_reduce_sum(sums, ctx).tolist()
        self.trained_tokens = tokens
        return dict(zip(names, (total, positive, negative, kl_term, entropy / actions if actions else math.nan,
                                k3 / actions if actions else math.nan)))

    def update(self, step: int, what: str, module, optimizer, max_norm: float, loss: float) -> tuple[float, bool]:
        norm, stepped = apply_update(module, optimizer, max_norm, math.isfinite(loss))
        if not stepped:
            self.skipped_steps += 1
            message = (f"step {step}: skipped the {what} update, its loss ({loss}) or gradient norm ({norm}) is "
                       f"not finite ({self.skipped_steps} updates skipped so far)")
            warnings.warn(message, RuntimeWarning, stacklevel=2)
            self.metrics.message(f"WARNING: {message}")
        return norm, stepped

    def advance_schedules(self, frozen: bool) -> None:
        """Once per step, whatever was kept: the policy's schedule counts its unfrozen steps, the RM's every step."""
        if not frozen:
            self.parts.policy_sched.step()
        if self.parts.rm_sched is not None:
            self.parts.rm_sched.step()

    # =============================================================================================
    # Metrics
    # =============================================================================================
    def rollout_metrics(self, samples, correct, group_ids, kept, overlong) -> dict:
        """Rewards, filtering and response lengths over all ranks (one all-reduce, one max)."""
        ctx = self.ctx
        lengths = [len(s.token_ids) for group in samples for s in group]
        truncated = sum(1 for group in samples for s in group if s.finish_reason == "length")
        groups: dict[int, list[bool]] = {}
        for g, c in zip(group_ids.tolist(), correct):
            groups.setdefault(g, []).append(c)
        all_correct = sum(1 for v in groups.values() if all(v))
        all_wrong = sum(1 for v in groups.values() if not any(v))
        local = [len(correct), sum(correct), sum(lengths), truncated, all_correct, all_wrong,
                 len(groups) - all_correct - all_wrong, len(kept), overlong]
        n, right, total_len, n_trunc, n_all_correct, n_all_wrong, mixed, n_kept, n_overlong = \
            all_reduce_sum(local, ctx).tolist()
        longest = torch.tensor([max(lengths, default=0)], dtype=torch.int64, device=ctx.device)
        if ctx.world_size > 1:
            dist.all_reduce(longest, op=dist.ReduceOp.MAX)
        self.generated_tokens = total_len
        nan = math.nan
        return {"reward/mean": (2 * right - n) / n if n else nan, "reward/pass_rate": right / n if n else nan,
                "filter/kept_prompts": mixed, "filter/kept_samples": n_kept,
                "filter/all_correct_prompts": n_all_correct, "filter/all_wrong_prompts": n_all_wrong,
                "response/length_mean": total_len / n if n else nan, "response/length_max": float(longest.item()),
                "response/truncated_fraction": n_trunc / n if n else nan, "data/overlong_prompts": n_overlong}

    def timing_metrics(self, timer: PhaseTimer, policy_stats: dict) -> dict:
        s = timer.seconds
        out = {f"time/{phase}": s.get(phase, 0.0) for phase in ("rollout", "judge", "train", "sync", "step")}
        out["throughput/tokens_per_s"] = _rate(self.generated_tokens, s["step"])
        out["throughput/rollout_tokens_per_s"] = _rate(self.generated_tokens, s.get("rollout", 0.0))
        out["throughput/train_tokens_per_s"] = _rate(self.trained_tokens, s.get("train", 0.0))
        report = getattr(self, "packing_report", None)
        if report is not None and self.trained_tokens:
            out["packing/largest_over_mean"] = float(report.largest_over_rank_mean)
        return out

    # =============================================================================================
    # Evaluation
    # =============================================================================================
    def evaluate(self) -> dict:
        """pass@1 and pass@k on every eval set, with the same engine and judge as training."""
        start = time.perf_counter()
        sampling = self.sampling(0, eval_mode=True)
        budget = self.cfg.rollout.max_total_tokens - self.cfg.eval.max_new_tokens
        sets = [type(s)(s.name, [p for p in s.prompts if len(p.input_ids) <= budget]) for s in self.parts.eval_sets]
        metrics = evaluate(
            sets, samples=self.cfg.eval.samples,
            generate=lambda prompts, n: self.parts.generator.generate([p.input_ids for p in prompts], n, sampling),
            judge=self.judge, reduce_sum=lambda values: all_reduce_sum(values, self.ctx).tolist())
        metrics["time/eval"] = time.perf_counter() - start
        return metrics

    # =============================================================================================
    # The loop
    # =============================================================================================
    def trainer_state(self) -> dict:
        return {"skipped_steps": self.skipped_steps, "best_step": self.best_step,
                "best_score": self.best_score if math.isfinite(self.best_score) else None}

    def checkpoint_parts(self) -> dict:
        parts = self.parts
        models = {"policy": (parts.policy, parts.policy_optim)}
        schedulers = {"policy": parts.policy_sched}
        if parts.token_rm is not None:
            models["token_rm"] = (parts.token_rm, parts.rm_optim)
            schedulers["token_rm"] = parts.rm_sched
        return dict(models=models, schedulers=schedulers, sampler=parts.sampler)

    def resume(self) -> int:
        """Load the checkpoint `--resume` names; returns the step it ends at (0: start fresh)."""
        cfg = self.cfg
        if not cfg.resume:
            return 0
        if cfg.resume == "latest":
            path = latest_checkpoint(self.checkpoints.root)
            if path is None:
                self.notice(f"--resume: no checkpoint in {self.checkpoints.root} yet; starting fresh")
                return 0
        else:
            path = Path(cfg.resume)
        state = self.checkpoints.load(path, **self.checkpoint_parts())
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.best_step = state.get("best_step")
        self.best_score = state["best_score"] if state.get("best_score") is not None else -math.inf
        self.notice(f"resumed from {path} (step {state['step']})")
        return int(state["step"])

    def notice(self, text: str) -> None:
        if self.ctx.is_main:
            print(f"oreal-train: {text}", file=sys.stderr, flush=True)

    def fit(self, start: int = 0) -> dict:
        """Train from step `start` (0, or what `resume()` returned) to `train.steps`; returns the last metrics."""
        cfg = self.cfg
        total = cfg.train.steps
        last: dict = {}
        self.parts.generator.sync()  # the engine now holds exactly the trainer's (initial or resumed) weights
        if cfg.eval.at_start and start == 0 and self.parts.eval_sets:
            self.metrics.log_eval(0, self.evaluate())
        for step in range(start + 1, total + 1):
            metrics = self.train_step(step)
            improved = False
            if self.parts.eval_sets and cfg.eval.interval and (step % cfg.eval.interval == 0 or step == total):
                results = self.evaluate()
                self.metrics.log_eval(step, results)
                metrics.update(results)
                if math.isfinite(results[BEST_METRIC]) and results[BEST_METRIC] > self.best_score:
                    self.best_score, self.best_step, improved = results[BEST_METRIC], step, True
            self.metrics.log_step(step, metrics)
            last = metrics
            if (cfg.checkpoint.interval and step % cfg.checkpoint.interval == 0) or step == total or improved:
                self.checkpoints.save(step, trainer_state=self.trainer_state(), **self.checkpoint_parts())
                if improved:
                    self.checkpoints.record_best(step, self.best_score, BEST_METRIC)
            if step == cfg.debug.kill_after_step and self.ctx.is_main:
                sys.stdout.flush()
                sys.stderr.flush()
                os.kill(os.getpid(), signal.SIGKILL)  # a hard kill, as a crash or a preemption would be
        if cfg.checkpoint.export_hf:  # in the compute dtype (bf16 on GPU), as Hugging Face checkpoints ship
            export_hf(self.parts.policy.lm, self.parts.hf_config, self.parts.tokenizer, Path(cfg.output_dir) / "hf",
                      dtype=param_dtype(cfg, self.ctx))
        return last


def _rate(tokens: float, seconds: float) -> float:
    return tokens / seconds if seconds > 0 else 0.0


def run(cfg: Config) -> int:
    """Build everything, train, clean up. Returns the process exit code."""
    from oreal.components import SetupError, build
    from oreal.distributed import init_distributed

    ctx = init_distributed(cfg.train.device)
    torch.manual_seed(cfg.train.seed)
    parts = None
    try:
        try:
            parts = build(cfg, ctx)
        except SetupError as exc:
            if ctx.is_main:
                print(f"oreal-train: error: {exc}", file=sys.stderr, flush=True)
            return 2
        trainer = Trainer(cfg, parts, checkpoints=CheckpointManager(cfg.output_dir,
                                                                    keep_last=cfg.checkpoint.keep_last))
        start_step = trainer.resume()
        metrics = MetricsLogger(cfg.output_dir, enabled=ctx.is_main, total_steps=cfg.train.steps,
                                start_step=start_step, tensorboard=cfg.log.tensorboard,
                                progress_bar=cfg.log.progress_bar)
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
