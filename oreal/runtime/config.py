"""The trainer's configuration: one `@dataclass(kw_only=True)` tree, loaded from a Python file.

A config file is plain Python with a function `config()` that returns a `Config`; it may build on
another file through `load_config_file`. The command line overrides any option by its dotted path:

    oreal-train --config configs/oreal_7b.py --policy_optim.lr 1e-6 --data.train_files a.jsonl,b.jsonl

Values are converted from the text by the field's annotated type (int, float, bool, str, lists,
tuples, Optional). An unknown or mistyped option is a `ConfigError` naming it and the nearest valid
one when there is a close one. Shorthands: `--steps N` (= `--train.steps`), `--output-dir DIR`
(= `--output_dir`), `--resume [PATH]` (resume from the latest checkpoint in the output directory,
or from PATH) and `--overwrite` (start afresh in a used output directory, deleting what it holds).
Every number is checked at parse time (finite, in its range), with an error naming the option.

This module imports no torch, so parsing and validating a config is cheap and needs no process group.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib.util
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A configuration the user wrote (file or command line) is invalid; the message says which option."""


# --------------------------------------------------------------------------------------------------
# The tree
# --------------------------------------------------------------------------------------------------

@dataclass(kw_only=True)
class TinyModelConfig:
    """A tiny random Qwen2 and a tokenizer trained in-process, for CPU runs and tests (nothing downloaded)."""

    enabled: bool = False
    # "bpe": byte-level BPE (oreal.model.tiny), any text encodes; "word": one token per word, digit or
    # punctuation mark of the prompts, so a random model's samples are clean words and numbers.
    tokenizer: str = "bpe"
    hidden_size: int = 32
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 64
    vocab_size: int = 256
    seed: int = 0


@dataclass(kw_only=True)
class ModelConfig:
    """Where the initial policy comes from; the reference policy and the token RM start from it too."""

    path: str = ""  # local Hugging Face directory of the initial (SFT) policy
    reference_path: str = ""  # default: `path` (OREAL's KL is against the frozen initial policy)
    token_rm_path: str = ""  # default: `path` (the token RM is a copy of the policy with a scalar head)
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    param_dtype: str = "bfloat16"  # compute dtype of the FSDP2 mixed-precision policy on GPU; CPU runs fp32
    attn_backend: str = "auto"
    gradient_checkpointing: bool = False
    liger: bool = False  # Liger-Kernel's fused RMSNorm/RoPE/SwiGLU patches (CUDA only)


@dataclass(kw_only=True)
class DataConfig:
    """Training prompts (JSONL) and how they are rendered and sampled."""

    train_files: list[str] = field(default_factory=list)
    format: str = "auto"  # oreal | areal | math | gsm8k | auto
    prompts_per_step: int = 64
    samples_per_prompt: int = 16  # K
    template: str = "chat"  # "chat": the tokenizer's chat template; or a format string with {question}
    system_prompt: str = ""
    instruction: str = "\nPlease reason step by step, and put your final answer within \\boxed{}."
    # OREAL's difficulty re-sampling: (low, high, repeat) pass-rate bands; prompts above the cap are dropped.
    difficulty_balance: list[tuple[float, float, int]] = field(default_factory=list)
    drop_pass_rate_above: float = 1.0
    max_prompt_tokens: int = 2048  # longer prompts are skipped (and counted in data/overlong_prompts)
    seed: int = 0


@dataclass(kw_only=True)
class RolloutConfig:
    """The generator of the K samples per prompt."""

    engine: str = "vllm"  # vllm (GPUs) | hf (transformers; CPU)
    # Where the engines run. "dedicated": engine processes on GPUs of their own (`gpus`), `num_engines`
    # data-parallel engines over all nodes, each node's local rank 0 owning its node's share, weights
    # broadcast after every update. "colocated": one engine per `tensor_parallel_size` trainer ranks,
    # inside the trainer processes on the training GPUs, asleep while the policy trains, weights loaded
    # in process layer by layer (no broadcast).
    placement: str = "dedicated"
    num_engines: int = 1  # dedicated: engines over the whole job, a multiple of the node count
    sleep_level: int = 2  # colocated: 1 offloads the engine's weights while training, 2 discards them
    temperature: float = 1.0
    top_p: float = 0.9
    top_k: int = 0  # 0: off
    max_new_tokens: int = 14000
    max_total_tokens: int = 16384  # prompt + response
    stop_words: list[str] = field(default_factory=list)
    # dedicated: the GPUs of each node that hold its engines, e.g. "4,5,6,7", handed out in order,
    # tensor_parallel_size to an engine; "" inherits CUDA_VISIBLE_DEVICES (one engine per node)
    gpus: str = ""
    gpu_memory_utilization: float = 0.85
    tensor_parallel_size: int = 1
    # dedicated hf engine on CPU: torch threads of the engine process; 0: the node's cores over its engines
    # (the trainer ranks sleep while the engines generate; oreal.runtime.budget)
    engine_threads: int = 0
    sync_bucket_mb: int = 1024
    timeout_s: float = 3600.0  # a generation or sync that takes longer is an engine failure
    # 0: synchronous steps (generate, then train). 1: the engines generate step k+1's rollouts while step k
    # trains, with the weights step k started from, so a step trains on data at most one update old
    # (oreal.rollout.overlap); dedicated placement only.
    max_staleness: int = 0


@dataclass(kw_only=True)
class JudgeConfig:
    """The rule-based judger and the optional LLM verifier."""

    stop_word: str = ""
    thinking_finish_words: list[str] = field(default_factory=lambda: ["</think>", "<conclude>", "**Final Answer**"])
    timeout_s: float = 2.0  # per answer, hard (the worker is killed)
    num_workers: int = 0  # judge worker processes per rank (started when sympy is needed); 0: the rank's cores
    verifier_hosts: list[str] = field(default_factory=list)  # OpenAI-compatible servers; empty: rules only
    verifier_model: str = ""
    verifier_timeout_s: float = 30.0
    # The recipe's original judged with an LLM verifier (OREAL): without one, warn once that rewards differ.
    verifier_expected: bool = False
    # How a decimal may stand for a non-terminating exact value: "relative" (within a relative 1e-4, the
    # originals' rule judgers) or "rounding" (lenient: the value rounded to the written places).
    decimal_policy: str = "relative"


@dataclass(kw_only=True)
class LossConfig:
    """OREAL's policy loss (DESIGN.md, "The fused OREAL loss") and the sample filter."""

    kl_coef: float = 0.01  # against the frozen initial policy
    pos_coef: float = 1.0
    neg_coef: float = 0.5
    backend: str = "auto"  # torch | triton | native | auto
    filter_groups: bool = True  # keep one correct and one wrong sample of each prompt with 0 < pass rate < 1
    use_token_rm: bool = True
    # Off-policy steps (rollout.max_staleness 1): each token's loss is weighted by the detached truncated
    # importance ratio min(pi / mu, importance_cap), mu the engine's log-prob (oreal.ops.loss); >= 1.
    importance_cap: float = 2.0
    # Which hidden state the token RM reads for action token a_t: "preceding" (OREAL's `[-n-1:-1]` slice:
    # the state before a_t, where the policy's logit for a_t is) or "following" (the state after a_t,
    # which has seen the token it scores).
    token_rm_reads: str = "preceding"
    # The token RM's fresh scalar head: "uniform" (torch's nn.Linear init, U(-1/sqrt(H), 1/sqrt(H)), as OREAL's
    # `torch.nn.Linear(hidden_size, 1, bias=False)`) or "zero" (every score starts at 0)
    token_rm_head_init: str = "uniform"


@dataclass(kw_only=True)
class PPOConfig:
    """The clipped-surrogate update of `--algorithm grpo` and `--algorithm ppo` (unused by OREAL).

    Each step's samples are split into `minibatches` (one optimizer update each) and trained on for
    `epochs` passes, against behaviour log-probs from a no-grad forward of the policy before the first
    update (`old_logprobs` "recompute") or from the rollout engine ("engine"); when the update is exactly
    on-policy (one epoch, one minibatch, recomputed) they are the detached current log-probs and the
    extra forward is skipped. `oreal.fused_policy_loss` is the loss. `early_stop_ratio` is RLinf's
    early-stop: with `early_stop_scope` "micro_batch" (RLinf) the loss of a micro-batch whose token-mean
    ratio, averaged over the ranks, exceeds it is zeroed (`update/zeroed_micro_batches`) and the
    optimizer still steps on the rest; with "minibatch" a minibatch whose ratio (token mean, or max, over
    every rank) exceeds it is skipped whole (`update/skipped_minibatches`).
    """

    epochs: int = 1
    minibatches: int = 4
    clip_low: float = 0.2  # the ratio is clipped to [1 - clip_low, 1 + clip_high]
    clip_high: float = 0.2
    # token: sum over the minibatch's tokens / their count (DAPO); step_token: / the token count of the whole
    # step, all minibatches (RLinf's use_valid_token_scale); sequence: mean of per-sequence token means
    loss_agg: str = "token"
    kl_coef: float = 0.0  # k3 KL to the frozen initial policy, in the loss
    early_stop_ratio: float = 0.0  # skip a minibatch whose importance ratio exceeds this; 0: never
    early_stop_statistic: str = "mean"  # minibatch scope: token mean over the minibatch (RLinf); max: the largest
    early_stop_scope: str = "minibatch"  # micro_batch: zero that micro-batch's loss (RLinf); minibatch: skip it all
    old_logprobs: str = "recompute"  # behaviour log-probs: recompute (no-grad forward) | engine (the sampler's)
    shuffle: bool = True  # shuffle the step's samples before the minibatch split (RLinf's shuffle_rollout)
    whiten_advantages: bool = False  # GRPO: whiten again over the step's response tokens, all ranks (RLinf)
    # Softmax temperature of the loss's, the reference's and the KL's log-probs; 0: the sampling temperature
    # (RLinf, verl); SimpleRL-Zero (OpenRLHF) reads raw logits: 1.0.
    loss_temperature: float = 0.0
    # verdict: reward_correct / reward_wrong; boxed (SimpleRL-Zero): reward_unboxed when the response has no
    # "boxed" at all, whatever its answer, else reward_correct / reward_wrong
    reward_rule: str = "verdict"
    reward_unboxed: float = -1.0
    reward_correct: float = 1.0  # the judge's verdict as a reward
    reward_wrong: float = -1.0
    group_norm_eps: float = 1e-6  # GRPO: (r - mean) / (std + eps) over the samples of a prompt


@dataclass(kw_only=True)
class CriticConfig:
    """PPO's critic (`--algorithm ppo`): a copy of the policy with a zero-initialised scalar value head."""

    path: str = ""  # default: `model.path` (SimpleRL-Zero's critic starts from the base model too)
    value_clip: float = 0.2  # V is clipped to V_old +- value_clip in the value loss
    gamma: float = 1.0  # GAE discount
    lam: float = 0.95  # GAE lambda
    whiten_advantages: bool = True  # normalise GAE advantages over the step's tokens (all ranks)
    kl_reward_coef: float = 0.0  # per-token reward -coef * (log pi_old - log pi_ref), as OpenRLHF's init_kl_coef
    loss_agg: str = "token"  # value loss: token (mean over the minibatch's tokens) | sequence (mean of means)
    # zero: every value starts at 0; normal: N(0, 1 / (hidden + 1)), OpenRLHF's init of a critic from a base model
    value_head_init: str = "zero"


@dataclass(kw_only=True)
class OptimConfig:
    """AdamW with linear warm-up and cosine decay to a floor (`oreal.runtime.schedule`)."""

    lr: float = 1e-6
    min_lr: float = 1e-7
    warmup_steps: int = 0
    warmup_ratio: float = 0.0  # > 0: warm-up = ceil(ratio x the schedule's length) (OpenRLHF: 0.03)
    warmup_from_zero: bool = False  # transformers' schedules: the first update runs at lr 0 (OpenRLHF)
    schedule_unit: str = "step"  # the schedule advances per training step, or per optimizer "update"
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)  # torch's AdamW default
    eps: float = 1e-8
    grad_clip: float = 1.0


@dataclass(kw_only=True)
class TrainConfig:
    """The loop."""

    steps: int = 90
    freeze_policy_steps: int = 0  # the policy is frozen while the token RM trains, for these first steps
    # OREAL: the policy's warm-up and cosine run through the frozen steps (its first update is at full lr);
    # False: they start at its first update
    schedule_frozen_steps: bool = True
    # token budget of one packed micro-batch (per rank); 0: derived from the model and the free memory
    # (oreal.runtime.budget: a quarter of it for activations)
    micro_batch_tokens: int = 0
    # each distinct prompt of a micro-batch runs through the model once, its sampled answers attending to
    # it (oreal.data.shared_prompts): the same hidden states and gradients as running every copy, fewer
    # tokens; False: every sequence runs whole (the layout of the reference implementations)
    share_prompts: bool = True
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda


@dataclass(kw_only=True)
class CheckpointConfig:
    interval: int = 10  # save every this many steps (and at the last step); 0: only at the end
    keep_last: int = 2
    export_hf: bool = True  # write the final policy as Hugging Face safetensors under <output_dir>/hf


@dataclass(kw_only=True)
class EvalConfig:
    """Periodic held-out evaluation (pass@1 and pass@k) with the judger."""

    files: list[str] = field(default_factory=list)
    interval: int = 0  # every this many steps (and at the last step); 0: never
    at_start: bool = False
    samples: int = 1  # k samples per problem: pass@1 is their mean, pass@k the unbiased estimate
    max_problems: int = 0  # per file; 0: all
    temperature: float = 1.0
    top_p: float = 0.95
    max_new_tokens: int = 14000


@dataclass(kw_only=True)
class LogConfig:
    """Where step metrics go besides metrics.jsonl (oreal.runtime.metrics)."""

    tensorboard: bool = True
    progress_bar: bool = True  # shown only where stderr is a terminal
    console: bool = True  # one line per step on stderr (reward, pass rate, loss, KL, tokens/s, time split, ETA)
    wandb: bool = False  # Weights & Biases (pip install 'oreal[wandb]'); WANDB_MODE=offline is honoured
    wandb_project: str = "oreal"
    wandb_run_name: str = ""  # "": the output directory's name
    wandb_entity: str = ""


@dataclass(kw_only=True)
class DebugConfig:
    """Testing aids."""

    kill_after_step: int = 0  # SIGKILL rank 0 right after this step's checkpoint is written (resume tests)
    kill_mid_save_step: int = 0  # SIGKILL the last rank half-way through this step's checkpoint (fault tests)
    nonfinite_at_step: int = 0  # make this step's policy loss NaN (tests the skip-on-non-finite path)


@dataclass(kw_only=True)
class Config:
    """Everything one training run needs."""

    output_dir: str = "outputs/oreal"
    resume: str = ""  # "": start fresh; "latest": the newest checkpoint in output_dir; or a checkpoint directory
    overwrite: bool = False  # delete a used output_dir and start afresh (without it, or resume, a used one is refused)
    # oreal: the paper's step (oreal.algorithms.oreal); grpo: RLinf's GRPO; ppo: PPO with a critic (oreal.algorithms)
    algorithm: str = "oreal"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    critic: CriticConfig = field(default_factory=CriticConfig)
    policy_optim: OptimConfig = field(default_factory=OptimConfig)
    rm_optim: OptimConfig = field(default_factory=OptimConfig)
    critic_optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)

    def validate(self) -> "Config":
        """Check ranges and cross-field rules; raise `ConfigError` naming the option. Returns self."""
        _validate(self)
        return self


# --------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------

ALGORITHMS = ("oreal", "grpo", "ppo")

CHOICES = {
    "algorithm": ALGORITHMS,
    "ppo.loss_agg": ("token", "step_token", "sequence"),
    "ppo.early_stop_statistic": ("mean", "max"),
    "ppo.early_stop_scope": ("micro_batch", "minibatch"),
    "ppo.old_logprobs": ("recompute", "engine"),
    "ppo.reward_rule": ("verdict", "boxed"),
    "critic.loss_agg": ("token", "sequence"),
    "critic.value_head_init": ("zero", "normal"),
    "loss.token_rm_reads": ("preceding", "following"),
    "loss.token_rm_head_init": ("uniform", "zero"),
    "judge.decimal_policy": ("relative", "rounding"),
    "policy_optim.schedule_unit": ("step", "update"),
    "rm_optim.schedule_unit": ("step", "update"),
    "critic_optim.schedule_unit": ("step", "update"),
    "data.format": ("auto", "oreal", "areal", "math", "gsm8k"),
    "rollout.engine": ("vllm", "hf"),
    "rollout.placement": ("dedicated", "colocated"),
    "loss.backend": ("auto", "torch", "triton", "native"),
    "train.device": ("auto", "cpu", "cuda"),
    "model.param_dtype": ("bfloat16", "float16", "float32"),
    "model.tiny.tokenizer": ("bpe", "word"),
}


def _validate(cfg: Config) -> None:
    def need(condition: bool, option: str, message: str) -> None:
        if not condition:
            raise ConfigError(f"--{option}: {message}")

    for option, allowed in CHOICES.items():
        value = get_option(cfg, option)
        need(value in allowed, option, f"must be one of {', '.join(allowed)}, got {value!r}")
    need(bool(cfg.model.path) or cfg.model.tiny.enabled, "model.path",
         "is required (a local Hugging Face model directory), unless --model.tiny.enabled true")
    need(cfg.data.prompts_per_step > 0, "data.prompts_per_step", "must be > 0")
    if cfg.algorithm == "ppo":  # the critic is the baseline: one sample per prompt is enough
        need(cfg.data.samples_per_prompt >= 1, "data.samples_per_prompt", "must be >= 1")
    else:
        baseline = "RLOO's" if cfg.algorithm == "oreal" else "GRPO's group"
        need(cfg.data.samples_per_prompt >= 2, "data.samples_per_prompt",
             f"must be >= 2 ({baseline} baseline needs the other samples of a prompt)")
    need(bool(cfg.data.train_files), "data.train_files", "lists no file; give JSONL prompt files")
    for band in cfg.data.difficulty_balance:
        need(len(band) == 3 and 0 <= band[0] <= band[1] <= 1 and int(band[2]) >= 0, "data.difficulty_balance",
             f"each band is (low, high, repeat) with 0 <= low <= high <= 1, got {band!r}")
    need(cfg.data.max_prompt_tokens > 0, "data.max_prompt_tokens", "must be > 0")
    need(cfg.rollout.temperature > 0, "rollout.temperature", "must be > 0")
    need(0 < cfg.rollout.top_p <= 1, "rollout.top_p", "must be in (0, 1]")
    need(cfg.rollout.max_new_tokens > 0, "rollout.max_new_tokens", "must be > 0")
    need(cfg.rollout.num_engines >= 1, "rollout.num_engines", "must be >= 1")
    need(cfg.rollout.tensor_parallel_size >= 1, "rollout.tensor_parallel_size", "must be >= 1")
    need(cfg.rollout.sleep_level in (1, 2), "rollout.sleep_level", "must be 1 (offload) or 2 (discard)")
    need(cfg.rollout.placement == "dedicated" or cfg.rollout.num_engines == 1, "rollout.num_engines",
         "is for the dedicated placement; colocated runs one engine per rollout.tensor_parallel_size trainer "
         "ranks (leave num_engines at 1)")
    need(cfg.rollout.max_total_tokens > cfg.rollout.max_new_tokens, "rollout.max_total_tokens",
         f"must exceed rollout.max_new_tokens ({cfg.rollout.max_new_tokens}) to leave room for the prompt")
    need(cfg.train.micro_batch_tokens == 0 or cfg.train.micro_batch_tokens >= cfg.rollout.max_total_tokens,
         "train.micro_batch_tokens", f"must be 0 (derived) or hold one whole sequence of rollout.max_total_tokens "
         f"({cfg.rollout.max_total_tokens})")
    need(cfg.train.steps > 0, "train.steps", "must be > 0")
    need(cfg.train.freeze_policy_steps >= 0, "train.freeze_policy_steps", "must be >= 0")
    for name in ("policy_optim", "rm_optim", "critic_optim"):
        optim: OptimConfig = getattr(cfg, name)
        need(optim.lr > 0, f"{name}.lr", "must be > 0")
        need(0 <= optim.min_lr <= optim.lr, f"{name}.min_lr", f"must be in [0, {name}.lr={optim.lr}]")
        need(optim.warmup_steps >= 0, f"{name}.warmup_steps", "must be >= 0")
        need(0 <= optim.warmup_ratio < 1, f"{name}.warmup_ratio", f"must be in [0, 1), got {optim.warmup_ratio}")
        need(optim.grad_clip >= 0, f"{name}.grad_clip", "must be >= 0 (0: no clipping)")
        need(len(optim.betas) == 2 and all(0 <= b < 1 for b in optim.betas), f"{name}.betas",
             "must be two numbers in [0, 1)")
    need(cfg.loss.kl_coef >= 0, "loss.kl_coef", "must be >= 0")
    _validate_overlap(cfg, need)
    _validate_ppo(cfg, need)
    need(cfg.checkpoint.interval >= 0, "checkpoint.interval", "must be >= 0")
    need(cfg.checkpoint.keep_last >= 1, "checkpoint.keep_last", "must be >= 1")
    need(cfg.eval.interval >= 0, "eval.interval", "must be >= 0")
    need(cfg.eval.samples >= 1, "eval.samples", "must be >= 1")
    need(not (cfg.eval.interval or cfg.eval.at_start) or bool(cfg.eval.files), "eval.files",
         "lists no file, but evaluation is enabled (eval.interval or eval.at_start)")
    need(cfg.debug.kill_after_step >= 0, "debug.kill_after_step", "must be >= 0")
    need(cfg.debug.nonfinite_at_step >= 0, "debug.nonfinite_at_step", "must be >= 0")
    need(cfg.debug.kill_mid_save_step >= 0, "debug.kill_mid_save_step", "must be >= 0")
    need(not (cfg.resume and cfg.overwrite), "overwrite", "contradicts --resume: continue the run, or start afresh")
    _validate_numbers(cfg, need)
    need(not cfg.log.wandb or importlib.util.find_spec("wandb") is not None, "log.wandb",
         "needs the wandb package: pip install 'oreal[wandb]' (or pip install wandb)")


# Options whose number must be > 0 (a time limit of 0 or less cannot work).
POSITIVE = ("rollout.timeout_s", "judge.timeout_s", "judge.verifier_timeout_s",
            "rollout.sync_bucket_mb", "rollout.top_p", "data.max_prompt_tokens", "eval.max_new_tokens",
            "policy_optim.eps", "rm_optim.eps", "critic_optim.eps")
# Options that must be >= 0 (eval.temperature 0 is greedy decoding, as the demo scores; 0 threads or workers:
# decided from the machine).
NON_NEGATIVE = ("rollout.top_k", "rollout.engine_threads", "judge.num_workers", "eval.max_problems",
                "data.drop_pass_rate_above", "eval.temperature",
                "policy_optim.weight_decay", "rm_optim.weight_decay", "critic_optim.weight_decay")
MAX_TIMEOUT_S = 7 * 24 * 3600.0


def _numbers(value: Any, path: str):
    """(path, number) for every int or float in an option's value (lists and tuples included)."""
    if isinstance(value, bool):
        return
    if isinstance(value, (int, float)):
        yield path, value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _numbers(item, path)


def _validate_numbers(cfg: Config, need) -> None:
    """Every number of the tree finite; time limits, worker counts and bucket sizes in range."""
    for path in option_paths(cfg):
        for _, number in _numbers(get_option(cfg, path), path):
            need(number == number and abs(number) != float("inf"), path, f"must be a finite number, got {number!r}")
    for path in POSITIVE:
        value = get_option(cfg, path)
        need(value > 0, path, f"must be > 0, got {value!r}")
    for path in NON_NEGATIVE:
        value = get_option(cfg, path)
        need(value >= 0, path, f"must be >= 0, got {value!r}")
    for path in ("rollout.timeout_s", "judge.timeout_s", "judge.verifier_timeout_s"):
        value = get_option(cfg, path)
        need(value <= MAX_TIMEOUT_S, path, f"must be at most {MAX_TIMEOUT_S:g} seconds (7 days), got {value!r}")
    need(0 < cfg.rollout.gpu_memory_utilization <= 1, "rollout.gpu_memory_utilization",
         f"must be in (0, 1], got {cfg.rollout.gpu_memory_utilization!r}")
    need(0 < cfg.eval.top_p <= 1, "eval.top_p", f"must be in (0, 1], got {cfg.eval.top_p!r}")


def _validate_overlap(cfg: Config, need) -> None:
    """`rollout.max_staleness` and what one step of overlap needs."""
    r = cfg.rollout
    need(r.max_staleness in (0, 1), "rollout.max_staleness",
         f"must be 0 (synchronous) or 1 (generate step k+1 while step k trains), got {r.max_staleness!r}")
    need(cfg.loss.importance_cap >= 1, "loss.importance_cap",
         f"must be >= 1 (on-policy tokens keep weight 1), got {cfg.loss.importance_cap!r}")
    if r.max_staleness == 0:
        return
    need(r.placement == "dedicated", "rollout.max_staleness",
         "1 needs rollout.placement dedicated: colocated engines share the trainer's devices and sleep while the "
         "policy trains, so there is nothing to overlap; use rollout.max_staleness 0 there")
    need(cfg.algorithm != "oreal" or r.temperature == 1, "rollout.max_staleness",
         f"1 with OREAL needs rollout.temperature 1 (got {r.temperature}): the importance weight compares the "
         "engine's log-probs with the loss's, which are read at temperature 1")
    need(cfg.algorithm == "oreal" or cfg.ppo.old_logprobs == "engine", "rollout.max_staleness",
         f"1 with --algorithm {cfg.algorithm} needs --ppo.old_logprobs engine: a recomputation would give the "
         "log-probs of the current weights, not of the older weights that sampled the step's data")


def _validate_ppo(cfg: Config, need) -> None:
    """The `ppo` and `critic` sections (checked whatever the algorithm, so a bad value never waits for a switch)."""
    p, c = cfg.ppo, cfg.critic
    need(p.epochs >= 1, "ppo.epochs", "must be >= 1")
    need(p.minibatches >= 1, "ppo.minibatches", "must be >= 1")
    need(0 <= p.clip_low < 1, "ppo.clip_low", f"must be in [0, 1), got {p.clip_low}")
    need(p.clip_high >= 0, "ppo.clip_high", f"must be >= 0, got {p.clip_high}")
    need(p.kl_coef >= 0, "ppo.kl_coef", "must be >= 0")
    need(p.early_stop_ratio >= 0, "ppo.early_stop_ratio", "must be >= 0 (0: never skip a minibatch)")
    need(p.reward_correct > p.reward_wrong, "ppo.reward_correct",
         f"must exceed ppo.reward_wrong ({p.reward_wrong}), got {p.reward_correct}")
    need(p.group_norm_eps > 0, "ppo.group_norm_eps", "must be > 0")
    need(p.loss_temperature >= 0, "ppo.loss_temperature", "must be >= 0 (0: the sampling temperature)")
    if p.old_logprobs == "engine":  # the engine's log-probs are of the distribution it sampled from
        r = cfg.rollout
        need(r.top_p == 1 and r.top_k == 0 and p.loss_temperature in (0, r.temperature), "ppo.old_logprobs",
             "'engine' needs the loss to read the distribution the engine sampled: rollout.top_p 1, rollout.top_k 0 "
             "and ppo.loss_temperature 0 (the sampling temperature)")
    need(c.value_clip > 0, "critic.value_clip", "must be > 0")
    need(0 < c.gamma <= 1, "critic.gamma", f"must be in (0, 1], got {c.gamma}")
    need(0 <= c.lam <= 1, "critic.lam", f"must be in [0, 1], got {c.lam}")
    need(c.kl_reward_coef >= 0, "critic.kl_reward_coef", "must be >= 0")


VERIFIER_HOSTS_ENV = "OREAL_VERIFIER_HOSTS"


def verifier_hosts_from_env() -> list[str]:
    """The LLM verifier's hosts from `OREAL_VERIFIER_HOSTS` ("host:port,host:port"), for the recipe configs;
    `--judge.verifier_hosts` on the command line overrides them."""
    import os

    return [h.strip() for h in os.environ.get(VERIFIER_HOSTS_ENV, "").split(",") if h.strip()]


def needs_reference(cfg: Config) -> bool:
    """Whether the algorithm's loss or reward reads the frozen initial policy's log-probs."""
    if cfg.algorithm == "oreal":
        return cfg.loss.kl_coef > 0
    if cfg.algorithm == "ppo" and cfg.critic.kl_reward_coef > 0:
        return True
    return cfg.ppo.kl_coef > 0


# --------------------------------------------------------------------------------------------------
# Dotted-path access
# --------------------------------------------------------------------------------------------------

def _is_section(value: Any) -> bool:
    return dataclasses.is_dataclass(value) and not isinstance(value, type)


def option_paths(cfg: Any, prefix: str = "") -> list[str]:
    """Every settable option of `cfg` as a dotted path (sections are not options)."""
    paths = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        path = f"{prefix}{f.name}"
        if _is_section(value):
            paths.extend(option_paths(value, path + "."))
        else:
            paths.append(path)
    return paths


def get_option(cfg: Any, path: str) -> Any:
    value = cfg
    for part in path.split("."):
        value = getattr(value, part)
    return value


def _unknown_option(cfg: Config, path: str) -> ConfigError:
    valid = option_paths(cfg)
    sections = sorted({p.rsplit(".", 1)[0] for p in valid if "." in p})
    if path in sections:
        example = next(p for p in valid if p.startswith(path + "."))
        return ConfigError(f"--{path} is a section, not an option; set one of its options, e.g. --{example}")
    shorthands = ["steps", "output-dir", "resume", "overwrite", "config", "print-config"]
    # The name in another section, or its section left out (--timeout_s: --rollout.timeout_s or
    # --judge.timeout_s); else the nearest whole name; else near names in any section. Never a far one.
    leaf = path.rsplit(".", 1)[-1]
    same_leaf = [p for p in valid if p.rsplit(".", 1)[-1] == leaf][:3]
    close = [] if "." not in path else difflib.get_close_matches(path, valid + shorthands, n=1, cutoff=0.75)
    close = close or same_leaf or difflib.get_close_matches(path, valid + shorthands, n=1, cutoff=0.75)
    if not close:
        near = set(difflib.get_close_matches(leaf, sorted({p.rsplit(".", 1)[-1] for p in valid}), n=2, cutoff=0.8))
        close = [p for p in valid if p.rsplit(".", 1)[-1] in near][:3]
    hint = f"; did you mean {' or '.join('--' + c for c in close)}?" if close else " (--print-config lists every option)"
    return ConfigError(f"unknown option --{path}{hint}")


def set_option(cfg: Config, path: str, text: str) -> None:
    """Set option `path` from its command-line text, converted by the field's annotated type."""
    parts = path.split(".")
    owner: Any = cfg
    for part in parts[:-1]:
        child = getattr(owner, part, None) if _is_section(owner) else None
        if not _is_section(child):
            raise _unknown_option(cfg, path)
        owner = child
    names = {f.name for f in dataclasses.fields(owner)}
    if parts[-1] not in names:
        raise _unknown_option(cfg, path)
    if _is_section(getattr(owner, parts[-1])):
        raise _unknown_option(cfg, path)
    annotation = typing.get_type_hints(type(owner))[parts[-1]]
    try:
        value = convert(text, annotation)
    except (ValueError, SyntaxError, TypeError) as exc:
        raise ConfigError(f"--{path}: expected {_type_name(annotation)}, got {text!r} ({exc})") from None
    setattr(owner, parts[-1], value)


# --------------------------------------------------------------------------------------------------
# Text -> value by annotated type
# --------------------------------------------------------------------------------------------------

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def _type_name(annotation: Any) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def convert(text: str, annotation: Any) -> Any:
    """Convert command-line `text` to a value of type `annotation`.

    Lists and tuples take a Python/JSON literal (`[1, 2]`, `(0.9, 0.95)`) or, for flat ones,
    comma-separated items (`a.jsonl,b.jsonl`); `none` sets an Optional field to None.
    """
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        if len(inner) < len(args) and text.strip().lower() in ("none", "null"):
            return None
        errors = []
        for candidate in inner:
            try:
                return convert(text, candidate)
            except (ValueError, SyntaxError, TypeError) as exc:
                errors.append(str(exc))
        raise ValueError("; ".join(errors))
    if annotation is bool:
        lowered = text.strip().lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
        raise ValueError("use true or false")
    if annotation is int:
        return int(text.strip())
    if annotation is float:
        value = float(text.strip())
        if value != value or abs(value) == float("inf"):
            raise ValueError("not a finite number")
        return value
    if annotation is str:
        return text
    if origin in (list, tuple):
        stripped = text.strip()
        if stripped and stripped[0] in "[(":
            items = ast.literal_eval(stripped)
            if not isinstance(items, (list, tuple)):
                raise ValueError("not a list")
            items = list(items)
        else:
            items = [item.strip() for item in stripped.split(",")] if stripped else []
        if origin is list:
            item_type = args[0] if args else str
            return [_convert_item(item, item_type) for item in items]
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert_item(item, args[0]) for item in items)
        if args and len(items) != len(args):
            raise ValueError(f"needs {len(args)} items, got {len(items)}")
        return tuple(_convert_item(item, t) for item, t in zip(items, args or [str] * len(items)))
    if origin is dict or annotation is dict:
        value = ast.literal_eval(text)
        if not isinstance(value, dict):
            raise ValueError("not a dict")
        return value
    raise TypeError(f"options of type {_type_name(annotation)} cannot be set from the command line")


def _convert_item(item: Any, item_type: Any) -> Any:
    if isinstance(item, str):
        return convert(item, item_type)
    origin = typing.get_origin(item_type)
    if origin in (list, tuple):
        return convert(repr(item), item_type)
    if item_type is float and isinstance(item, (int, float)) and not isinstance(item, bool):
        return float(item)
    if item_type is int and isinstance(item, int) and not isinstance(item, bool):
        return item
    if item_type is bool and isinstance(item, bool):
        return item
    return convert(str(item), item_type)


# --------------------------------------------------------------------------------------------------
# Files and the command line
# --------------------------------------------------------------------------------------------------

def load_config_file(path: str | Path) -> Config:
    """Run config file `path` and return what its `config()` function returns (a `Config`)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config: no such file {str(path)!r}")
    module_name = f"_oreal_config_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # lets dataclasses defined in the file resolve their annotations
    try:
        spec.loader.exec_module(module)
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(f"--config {path}: the file failed to run: {type(exc).__name__}: {exc}") from exc
    factory = getattr(module, "config", None)
    if not callable(factory):
        raise ConfigError(f"--config {path}: the file must define a function `config()` returning a Config")
    cfg = factory()
    if not isinstance(cfg, Config):
        raise ConfigError(f"--config {path}: config() returned {type(cfg).__name__}, expected oreal.runtime.config.Config")
    return cfg


SHORTHANDS = {"--steps": "train.steps", "--output-dir": "output_dir", "--output_dir": "output_dir"}


@dataclass(kw_only=True)
class CommandLine:
    config: Config
    config_path: str
    print_config: bool = False


def parse_args(argv: list[str]) -> CommandLine:
    """Parse `--config FILE [--print-config] [--steps N] [--output-dir DIR] [--resume [PATH]] [--a.b value ...]`."""
    argv = list(argv)
    config_path = None
    rest: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--config" or arg.startswith("--config="):
            if "=" in arg:
                config_path = arg.split("=", 1)[1]
            elif i + 1 < len(argv):
                config_path = argv[i + 1]
                i += 1
            else:
                raise ConfigError("--config needs a file path")
        else:
            rest.append(arg)
        i += 1
    if not config_path:
        raise ConfigError("--config FILE is required (a Python file defining config() -> Config)")
    cfg = load_config_file(config_path)
    print_config = False
    i = 0
    while i < len(rest):
        arg = rest[i]
        if not arg.startswith("--") or arg == "--":
            raise ConfigError(f"unexpected argument {arg!r}; options look like --section.option value")
        name, has_value, inline_value = arg.partition("=")
        has_next = i + 1 < len(rest) and not rest[i + 1].startswith("--")  # a value starting "--" needs "="
        if name == "--print-config":
            print_config = True
            i += 1
            continue
        if name == "--overwrite" and not has_value and not has_next:
            cfg.overwrite = True
            i += 1
            continue
        if name == "--resume":
            if has_value:
                cfg.resume = inline_value or "latest"
            elif has_next:
                cfg.resume = rest[i + 1]
                i += 1
            else:
                cfg.resume = "latest"
            i += 1
            continue
        path = SHORTHANDS.get(name, name[2:])
        if has_value:
            value = inline_value
        elif has_next:
            value = rest[i + 1]
            i += 1
        else:
            # Validate the name first, so that a typo is reported as such rather than as a missing value.
            if path not in option_paths(cfg):
                raise _unknown_option(cfg, path)
            raise ConfigError(f"{name} needs a value")
        set_option(cfg, path, value)
        i += 1
    cfg.validate()
    return CommandLine(config=cfg, config_path=config_path, print_config=print_config)


def format_config(cfg: Config) -> str:
    """The resolved config, one `option = value` line per option, in tree order."""
    return "\n".join(f"{path} = {get_option(cfg, path)!r}" for path in option_paths(cfg))


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)
