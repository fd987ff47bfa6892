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
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from oreal.runtime.checkpoint import CheckpointManager, export_hf
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


ENGINE_LOGPROBS = "engine_logprobs"  # the training samples' extra holding the engine's per-token log-probs


@dataclass
class SubmittedBatch:
    """Prompts sent to the engines ahead of their step (`rollout.max_staleness` 1); `indices` are the sampler's."""

    step: int
    indices: list[int]
    prompts: list
    overlong: int
    prompts_per_rank: int


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
        self._budget: tuple[int, bool] | None = None
        self.data_staleness = 0  # updates between the weights that sampled this step's data and the trainer's
        self.trained_version = 0
        self.submitted: SubmittedBatch | None = None  # next step's prompts, with the engines (max_staleness 1)
        self.resumed_policy_version = 0

    def machine_budget(self) -> tuple[int, bool]:
        """(tokens per packed micro-batch, keep the policy gathered through an update's micro-batches), decided
        once from the model and the machine and agreed by every rank (`oreal.runtime.budget`)."""
        if getattr(self, "_budget", None) is None:  # (getattr: tests build trainers without __init__)
            from oreal.runtime.budget import decide_for_run

            self._budget = decide_for_run(self.cfg, self.parts, self.ctx, param_dtype(self.cfg, self.ctx))
        return self._budget

    def train_step(self, step: int) -> dict:
        raise NotImplementedError

    # =============================================================================================
    # Rollouts
    # =============================================================================================
    def sample_prompts(self, max_new_tokens: int, indices: list[int] | None = None) -> tuple[list, int]:
        """This rank's prompts of the step (the sampler's next, or `indices`), less those over
        `data.max_prompt_tokens` or too long to leave room for a full response (counted in `data/overlong_prompts`)."""
        indices = self.parts.sampler.next_indices() if indices is None else indices
        self.prompt_indices = [int(i) for i in indices]
        prompts = self.parts.dataset.batch(indices)
        self.prompts_per_rank = len(prompts)
        budget = min(self.cfg.data.max_prompt_tokens, self.cfg.rollout.max_total_tokens - max_new_tokens)
        usable = [p for p in prompts if len(p.input_ids) <= budget]
        return usable, len(prompts) - len(usable)

    def collect(self, step: int, timer: PhaseTimer) -> tuple[list, int, list[list], list[bool], torch.Tensor]:
        """The first three stages of every recipe's step: this rank's prompts (the overlong ones dropped and
        counted), K rollouts per prompt from the engine (which holds the current policy), one verdict per
        sample against its prompt's gold answer, and each sample's group id.

        Returns (prompts, overlong, samples, correct, group_ids); rollout and judge time go to `timer`.

        With `rollout.max_staleness` 1 the step's rollouts were submitted by the previous step (generated
        while it trained, with the weights it started from): they are collected here, and the next step's
        prompts are submitted before this one is judged and trained (`oreal.rollout.overlap`).
        `self.data_staleness` is then how many updates the step's data are behind the trainer's weights.
        """
        generator, ahead = self.parts.generator, self.submitted
        if ahead is not None and ahead.step == step:
            self.submitted = None
            prompts, overlong, self.prompts_per_rank = ahead.prompts, ahead.overlong, ahead.prompts_per_rank
            with timer.phase("rollout"):
                samples = generator.collect()
        else:
            prompts, overlong = self.sample_prompts(self.cfg.rollout.max_new_tokens)
            with timer.phase("rollout"):
                samples = generator.generate([p.input_ids for p in prompts], self.cfg.data.samples_per_prompt,
                                             self.sampling(step))
        self.submit_next(step)
        with timer.phase("judge"):
            correct = self.judge(prompts, samples)
        self.trained_version = getattr(generator, "policy_version", 0)  # of the weights this step starts from
        self.data_staleness = max(self.trained_version - getattr(generator, "last_version", 0), 0)
        if self.data_staleness == 0:
            self.open_logprob_gap()
        else:  # the trainer's weights are newer than the sampler's: their log-probs are not meant to agree
            self._logprob_gap, self._logprob_gap_open = None, False
        return prompts, overlong, samples, correct, self.group_ids(samples)

    def submit_next(self, step: int) -> None:
        """With one step of overlap: sample step + 1's prompts and start generating them (every rank)."""
        generator = self.parts.generator
        if getattr(generator, "max_staleness", 0) < 1 or step >= self.cfg.train.steps:
            return
        this_step = self.prompts_per_rank  # the group ids of this step still count this step's prompts
        prompts, overlong = self.sample_prompts(self.cfg.rollout.max_new_tokens)
        self.submitted = SubmittedBatch(step + 1, self.prompt_indices, prompts, overlong, self.prompts_per_rank)
        self.prompts_per_rank = this_step
        generator.submit([p.input_ids for p in prompts], self.cfg.data.samples_per_prompt, self.sampling(step + 1))

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
        return [sample for part in self.gather_per_rank(local) for sample in part]

    def gather_per_rank(self, local: list) -> list[list]:
        """Every rank's list of training samples, one list per rank in rank order (the same on every rank)."""
        gathered = [None] * self.ctx.world_size
        dist.all_gather_object(gathered, local, group=self.parts.object_group)
        return [list(part) for part in gathered]

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
        """Once per step, whatever was kept, for the schedules that tick per step (`schedule_unit` "step"; the
        per-update ones tick in `tick_per_update`): the policy's counts its frozen steps too when
        `train.schedule_frozen_steps` (OREAL: its warm-up runs while it is frozen), else only the unfrozen
        ones; the auxiliary models' (token RM, critic) every step."""
        parts, cfg = self.parts, self.cfg
        if cfg.policy_optim.schedule_unit == "step" and (not frozen or cfg.train.schedule_frozen_steps):
            with warnings.catch_warnings():  # a frozen step advances the schedule without an optimizer step
                warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step", category=UserWarning)
                parts.policy_sched.step()
        for scheduler, optim_cfg in ((parts.rm_sched, cfg.rm_optim), (getattr(parts, "critic_sched", None),
                                                                     cfg.critic_optim)):
            if scheduler is not None and optim_cfg.schedule_unit == "step":
                scheduler.step()

    def tick_per_update(self, scheduler, optim_cfg) -> None:
        """After each optimizer update attempt (applied, skipped or early-stopped), for a per-update schedule
        (OpenRLHF steps its scheduler with every optimizer step)."""
        if scheduler is not None and optim_cfg.schedule_unit == "update":
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
                "response/truncated_fraction": n_trunc / n if n else nan, "data/overlong_prompts": n_overlong,
                **self.staleness_metrics()}

    def staleness_metrics(self) -> dict:
        """`rollout/staleness`: policy updates between the weights that sampled the step's data and the weights
        the step trains from (0 synchronous; 0 or 1 with `rollout.max_staleness` 1); `rollout/policy_version`:
        the version of the weights the step trains from (policy updates so far)."""
        return {"rollout/staleness": float(self.data_staleness), "rollout/policy_version": float(self.trained_version)}

    # The engine's log-prob of each sampled token against the trainer's own, under the same weights: training
    # samples carry the engine's in `extras["engine_logprobs"]`; every forward of the policy before the step's
    # first update reports its log-probs to `note_logprob_gap`. A large gap means the engine's weights, sampler
    # or numerics differ from the trainer's (a failed sync, a temperature or top-p/top-k the loss does not use).
    def open_logprob_gap(self) -> None:
        """A new step: the policy holds the weights the engine sampled with until `close_logprob_gap`."""
        self._logprob_gap = torch.zeros(2, dtype=torch.float64, device=self.ctx.device)  # sum |diff|, tokens
        self._logprob_gap_open = True

    def close_logprob_gap(self) -> None:
        """The policy's weights are about to change: later forwards no longer match the engine's."""
        self._logprob_gap_open = False

    def note_logprob_gap(self, batch, logprobs: torch.Tensor) -> None:
        """Add |engine - trainer| over `batch`'s action tokens (`logprobs [T]`, the trainer's)."""
        engine = batch.extras.get(ENGINE_LOGPROBS)
        if not getattr(self, "_logprob_gap_open", False) or engine is None or batch.is_padding:
            return
        action = batch.action_mask
        diff = torch.where(action, (engine.double() - logprobs.detach().double()).abs(), 0.0)
        self._logprob_gap += torch.stack([diff.sum(), action.sum().double()])

    def logprob_gap_metrics(self) -> dict:
        """`rollout/logprob_abs_diff`: mean |engine - trainer| over the step's noted action tokens, all ranks."""
        gap = getattr(self, "_logprob_gap", None)
        local = gap if gap is not None else torch.zeros(2, dtype=torch.float64, device=self.ctx.device)
        total, tokens = all_reduce_sum(local, self.ctx).tolist()
        self._logprob_gap, self._logprob_gap_open = None, False
        return {"rollout/logprob_abs_diff": total / tokens if tokens else math.nan}

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
                "best_score": self.best_score if math.isfinite(self.best_score) else None,
                "policy_version": int(getattr(self.parts.generator, "policy_version", 0))}

    def load_trainer_state(self, state: dict) -> None:
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.best_step = state.get("best_step")
        self.best_score = state["best_score"] if state.get("best_score") is not None else -math.inf
        self.resumed_policy_version = int(state.get("policy_version", 0))

    # With one step of overlap a checkpoint is taken while the next step's prompts are with the engines. It
    # records them (the sampler's indices) with their finished samples and the policy version that made them,
    # per rank; resume hands the samples back to the step that was waiting for them. Regenerating instead
    # would need the weights of the previous version, which the checkpoint no longer holds (the trainer has
    # stepped past them): the samples are a few KB per prompt, a second policy copy would be gigabytes. The
    # sync at the end of the step has already waited for the generation, so this costs no extra wait then.
    def pending_record(self) -> dict | None:
        """This rank's submitted-but-untrained batch with its samples (waits for them), or None."""
        ahead = self.submitted
        if ahead is None:
            return None
        samples, version = self.parts.generator.finished_pending()
        return {"step": ahead.step, "indices": ahead.indices, "version": version,
                "samples": [[asdict(r) for r in group] for group in samples]}

    def restore_pending(self, record: dict | None) -> None:
        """Resume: the checkpointed batch becomes the pending one again, samples and all."""
        if not record:
            return
        from oreal.rollout.types import Rollout

        prompts, overlong = self.sample_prompts(self.cfg.rollout.max_new_tokens, indices=record["indices"])
        self.submitted = SubmittedBatch(int(record["step"]), self.prompt_indices, prompts, overlong,
                                        self.prompts_per_rank)
        samples = [[Rollout(**r) for r in group] for group in record["samples"]]
        self.parts.generator.restore_pending(samples, int(record["version"]))

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
        if cfg.resume == "latest":  # the newest intact one: damaged ones are passed over with a warning
            path = self.checkpoints.latest_intact(warn=self.notice)
            if path is None:
                self.notice(f"--resume: no checkpoint in {self.checkpoints.root} yet; starting fresh")
                return 0
        else:
            path = Path(cfg.resume)
        state = self.checkpoints.load(path, **self.checkpoint_parts())
        self.load_trainer_state(state)
        self.restore_pending(state.get("rank_extra"))
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
        # the engine now holds exactly the trainer's (initial or resumed) weights, of the resumed policy version
        version = self.resumed_policy_version
        if hasattr(self.parts.generator, "policy_version"):
            self.parts.generator.sync(policy_version=version)
        else:
            self.parts.generator.sync()
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
                self.checkpoints.save(step, trainer_state=self.trainer_state(), rank_extra=self.pending_record(),
                                      **self.checkpoint_parts())
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
