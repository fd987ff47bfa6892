"""What every algorithm's trainer shares: rollouts, judging, gathering samples, updates, metrics, evaluation,
checkpoints and the loop. Each algorithm's `train_step` (OREAL in `oreal.algorithms.oreal`, GRPO and PPO in this
package) is written top to bottom on these pieces.

Gradient scale (all algorithms): each micro-batch's loss is normalised by global counts (all ranks, all
micro-batches of an update), so an update's loss is the plain sum over micro-batches and ranks; FSDP2
averages gradients over ranks, so every backward is scaled by the world size to turn that average back
into the sum.

Determinism (exact resume): sampling seeds and every random choice of a step derive from (seed, step);
the sampler and the RNGs are checkpointed, and nothing depends on what ran before a step but the
checkpointed state.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist

from oreal.runtime.checkpoint import CheckpointManager, export_hf, latest_checkpoint
from oreal.runtime.build import param_dtype
from oreal.runtime.config import Config
from oreal.runtime.distributed import DistContext, all_reduce_sum
from oreal.runtime.evaluation import BEST_METRIC, evaluate
from oreal.runtime.metrics import MetricsLogger


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


def _rate(tokens: float, seconds: float) -> float:
    return tokens / seconds if seconds > 0 else 0.0


class BaseTrainer:
    """The shared machinery; subclasses define `train_step(step) -> metrics` and their `REQUIRED_METRICS`."""

    REQUIRED_METRICS: tuple[str, ...] = ()

    def __init__(self, cfg: Config, parts, *, checkpoints: CheckpointManager, metrics: MetricsLogger | None = None):
        self.cfg = cfg
        self.parts = parts
        self.ctx: DistContext = parts.ctx
        self.checkpoints = checkpoints
        self.metrics = metrics or MetricsLogger(cfg.output_dir, enabled=False, total_steps=cfg.train.steps)
        self.skipped_steps = 0
        self.best_step: int | None = None
        self.best_score = -math.inf
        self.generated_tokens = 0.0
        self.trained_tokens = 0.0
        self.packing_report = None

    def train_step(self, step: int) -> dict:
        raise NotImplementedError

    # =============================================================================================
    # Rollouts
    # =============================================================================================
    def sample_prompts(self, max_new_tokens: int) -> tuple[list, int]:
        """This rank's prompts of the step, less those over `data.max_prompt_tokens` or too long to leave
        room for a full response (they are counted in `data/overlong_prompts`)."""
        prompts = self.parts.dataset.batch(self.parts.sampler.next_indices())
        self.prompts_per_rank = len(prompts)
        budget = min(self.cfg.data.max_prompt_tokens, self.cfg.rollout.max_total_tokens - max_new_tokens)
        usable = [p for p in prompts if len(p.input_ids) <= budget]
        return usable, len(prompts) - len(usable)

    def collect(self, step: int, timer: PhaseTimer) -> tuple[list, int, list[list], list[bool], torch.Tensor]:
        """The first three stages of every recipe's step: this rank's prompts (the overlong ones dropped and
        counted), K rollouts per prompt from the engine (which holds the current policy), one verdict per
        sample against its prompt's gold answer, and each sample's group id.

        Returns (prompts, overlong, samples, correct, group_ids); rollout and judge time go to `timer`.
        """
        prompts, overlong = self.sample_prompts(self.cfg.rollout.max_new_tokens)
        with timer.phase("rollout"):
            samples = self.parts.generator.generate([p.input_ids for p in prompts], self.cfg.data.samples_per_prompt,
                                                    self.sampling(step))
        with timer.phase("judge"):
            correct = self.judge(prompts, samples)
        return prompts, overlong, samples, correct, self.group_ids(samples)

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

    def gather_samples(self, local: list) -> list:
        """Every rank's training samples, in rank order (the same list on every rank), for global packing."""
        gathered = [None] * self.ctx.world_size
        dist.all_gather_object(gathered, local, group=self.parts.object_group)
        return [sample for part in gathered for sample in part]

    # =============================================================================================
    # Updates
    # =============================================================================================
    def update(self, step: int, what: str, module, optimizer, max_norm: float, loss: float) -> tuple[float, bool]:
        """`apply_update`, with a warning and `faults/skipped_steps` when the loss or the gradient is not finite."""
        norm, stepped = apply_update(module, optimizer, max_norm, math.isfinite(loss))
        if not stepped:
            self.skipped_steps += 1
            message = (f"step {step}: skipped the {what} update, its loss ({loss}) or gradient norm ({norm}) is "
                       f"not finite ({self.skipped_steps} updates skipped so far)")
            warnings.warn(message, RuntimeWarning, stacklevel=2)
            self.metrics.message(f"WARNING: {message}")
        return norm, stepped

    def advance_schedules(self, frozen: bool) -> None:
        """Once per step, whatever was kept: the policy's schedule counts its unfrozen steps, the auxiliary
        models' (token RM, critic) every step."""
        parts = self.parts
        if not frozen:
            parts.policy_sched.step()
        for scheduler in (parts.rm_sched, getattr(parts, "critic_sched", None)):
            if scheduler is not None:
                scheduler.step()

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

    def timing_metrics(self, timer: PhaseTimer, policy_stats: dict | None = None) -> dict:
        s = timer.seconds
        out = {f"time/{phase}": s.get(phase, 0.0) for phase in ("rollout", "judge", "train", "sync", "step")}
        out["throughput/tokens_per_s"] = _rate(self.generated_tokens, s["step"])
        out["throughput/rollout_tokens_per_s"] = _rate(self.generated_tokens, s.get("rollout", 0.0))
        out["throughput/train_tokens_per_s"] = _rate(self.trained_tokens, s.get("train", 0.0))
        report = self.packing_report
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
    # Checkpoints and the loop
    # =============================================================================================
    def trainer_state(self) -> dict:
        return {"skipped_steps": self.skipped_steps, "best_step": self.best_step,
                "best_score": self.best_score if math.isfinite(self.best_score) else None}

    def load_trainer_state(self, state: dict) -> None:
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.best_step = state.get("best_step")
        self.best_score = state["best_score"] if state.get("best_score") is not None else -math.inf

    def checkpoint_parts(self) -> dict:
        """Every trained model with its optimizer and schedule (the policy; the token RM or the critic when built)."""
        parts = self.parts
        models = {"policy": (parts.policy, parts.policy_optim)}
        schedulers = {"policy": parts.policy_sched}
        if parts.token_rm is not None:
            models["token_rm"] = (parts.token_rm, parts.rm_optim)
            schedulers["token_rm"] = parts.rm_sched
        if getattr(parts, "critic", None) is not None:
            models["critic"] = (parts.critic, parts.critic_optim)
            schedulers["critic"] = parts.critic_sched
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
        self.load_trainer_state(state)
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
