"""The trainer's configuration: one `@dataclass(kw_only=True)` tree, loaded from a Python file.

A config file is plain Python with a function `config()` that returns a `Config`; it may build on
another file through `load_config_file`. The command line overrides any option by its dotted path:

    oreal-train --config configs/oreal_7b.py --policy_optim.lr 1e-6 --data.train_files a.jsonl,b.jsonl

Values are converted from the text by the field's annotated type (int, float, bool, str, lists,
tuples, Optional). An unknown or mistyped option is a `ConfigError` naming it and the nearest valid
one. Three shorthands: `--steps N` (= `--train.steps`), `--output-dir DIR` (= `--output_dir`) and
`--resume [PATH]` (resume from the latest checkpoint in the output directory, or from PATH).

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

    engine: str = "vllm"  # vllm (dedicated GPUs) | hf (transformers, own process; CPU)
    temperature: float = 1.0
    top_p: float = 0.9
    top_k: int = 0  # 0: off
    max_new_tokens: int = 14000
    max_total_tokens: int = 16384  # prompt + response
    stop_words: list[str] = field(default_factory=list)
    gpus: str = ""  # CUDA_VISIBLE_DEVICES of the engine process (vllm), e.g. "4,5,6,7"; "" inherits
    gpu_memory_utilization: float = 0.85
    tensor_parallel_size: int = 1
    engine_threads: int = 0  # hf engine: torch threads in the engine process; 0: torch's default
    sync_bucket_mb: int = 1024
    timeout_s: float = 3600.0  # a generation or sync that takes longer is an engine failure


@dataclass(kw_only=True)
class JudgeConfig:
    """The rule-based judger and the optional LLM verifier."""

    stop_word: str = ""
    thinking_finish_words: list[str] = field(default_factory=lambda: ["</think>", "<conclude>", "**Final Answer**"])
    timeout_s: float = 2.0  # per answer, hard (the worker is killed)
    num_workers: int = 4
    verifier_hosts: list[str] = field(default_factory=list)  # OpenAI-compatible servers; empty: rules only
    verifier_model: str = ""
    verifier_timeout_s: float = 30.0


@dataclass(kw_only=True)
class LossConfig:
    """OREAL's policy loss (DESIGN.md, "The fused OREAL loss") and the sample filter."""

    kl_coef: float = 0.01  # against the frozen initial policy
    pos_coef: float = 1.0
    neg_coef: float = 0.5
    backend: str = "auto"  # torch | triton | native | auto
    filter_groups: bool = True  # keep one correct and one wrong sample of each prompt with 0 < pass rate < 1
    use_token_rm: bool = True


@dataclass(kw_only=True)
class PPOConfig:
    """The clipped-surrogate update of `--algorithm grpo` and `--algorithm ppo` (unused by OREAL).

    Each step's samples are split into `minibatches` (one optimizer update each) and trained on for
    `epochs` passes, against the log-probs a no-grad forward of the policy gave before the first
    update; `oreal.fused_policy_loss` is the loss. `early_stop_ratio` is RLinf's minibatch early-stop:
    a minibatch whose importance ratio (its token mean, or max, over every rank) exceeds it is skipped
    (no update) and counted in `update/skipped_minibatches`.
    """

    epochs: int = 1
    minibatches: int = 4
    clip_low: float = 0.2  # the ratio is clipped to [1 - clip_low, 1 + clip_high]
    clip_high: float = 0.2
    loss_agg: str = "token"  # token: sum over the minibatch's tokens / their count (DAPO); sequence: mean of means
    kl_coef: float = 0.0  # k3 KL to the frozen initial policy, in the loss
    early_stop_ratio: float = 0.0  # skip a minibatch whose importance ratio exceeds this; 0: never
    early_stop_statistic: str = "mean"  # mean: token mean over the minibatch (RLinf); max: the largest ratio
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


@dataclass(kw_only=True)
class OptimConfig:
    """AdamW with linear warm-up and cosine decay to a floor."""

    lr: float = 1e-6
    min_lr: float = 1e-7
    warmup_steps: int = 0
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)  # torch's AdamW default
    eps: float = 1e-8
    grad_clip: float = 1.0


@dataclass(kw_only=True)
class TrainConfig:
    """The loop."""

    steps: int = 90
    freeze_policy_steps: int = 0  # the policy is frozen while the token RM trains, for these first steps
    micro_batch_tokens: int = 32768  # token budget of one packed micro-batch (per rank)
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
    tensorboard: bool = True
    progress_bar: bool = True


@dataclass(kw_only=True)
class DebugConfig:
    """Testing aids."""

    kill_after_step: int = 0  # SIGKILL rank 0 right after this step's checkpoint is written (resume tests)
    nonfinite_at_step: int = 0  # make this step's policy loss NaN (tests the skip-on-non-finite path)


@dataclass(kw_only=True)
class Config:
    """Everything one training run needs."""

    output_dir: str = "outputs/oreal"
    resume: str = ""  # "": start fresh; "latest": the newest checkpoint in output_dir; or a checkpoint directory
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
    "ppo.loss_agg": ("token", "sequence"),
    "ppo.early_stop_statistic": ("mean", "max"),
    "data.format": ("auto", "oreal", "areal", "math", "gsm8k"),
    "rollout.engine": ("vllm", "hf"),
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
    need(cfg.rollout.max_total_tokens > cfg.rollout.max_new_tokens, "rollout.max_total_tokens",
         f"must exceed rollout.max_new_tokens ({cfg.rollout.max_new_tokens}) to leave room for the prompt")
    need(cfg.train.micro_batch_tokens >= cfg.rollout.max_total_tokens, "train.micro_batch_tokens",
         f"must hold one whole sequence of rollout.max_total_tokens ({cfg.rollout.max_total_tokens})")
    need(cfg.train.steps > 0, "train.steps", "must be > 0")
    need(cfg.train.freeze_policy_steps >= 0, "train.freeze_policy_steps", "must be >= 0")
    for name in ("policy_optim", "rm_optim", "critic_optim"):
        optim: OptimConfig = getattr(cfg, name)
        need(optim.lr > 0, f"{name}.lr", "must be > 0")
        need(0 <= optim.min_lr <= optim.lr, f"{name}.min_lr", f"must be in [0, {name}.lr={optim.lr}]")
        need(optim.warmup_steps >= 0, f"{name}.warmup_steps", "must be >= 0")
        need(optim.grad_clip >= 0, f"{name}.grad_clip", "must be >= 0 (0: no clipping)")
        need(len(optim.betas) == 2 and all(0 <= b < 1 for b in optim.betas), f"{name}.betas",
             "must be two numbers in [0, 1)")
    need(cfg.loss.kl_coef >= 0, "loss.kl_coef", "must be >= 0")
    _validate_ppo(cfg, need)
    need(cfg.checkpoint.interval >= 0, "checkpoint.interval", "must be >= 0")
    need(cfg.checkpoint.keep_last >= 1, "checkpoint.keep_last", "must be >= 1")
    need(cfg.eval.interval >= 0, "eval.interval", "must be >= 0")
    need(cfg.eval.samples >= 1, "eval.samples", "must be >= 1")
    need(not (cfg.eval.interval or cfg.eval.at_start) or bool(cfg.eval.files), "eval.files",
         "lists no file, but evaluation is enabled (eval.interval or eval.at_start)")
    need(cfg.debug.kill_after_step >= 0, "debug.kill_after_step", "must be >= 0")
    need(cfg.debug.nonfinite_at_step >= 0, "debug.nonfinite_at_step", "must be >= 0")


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
    need(c.value_clip > 0, "critic.value_clip", "must be > 0")
    need(0 < c.gamma <= 1, "critic.gamma", f"must be in (0, 1], got {c.gamma}")
    need(0 <= c.lam <= 1, "critic.lam", f"must be in [0, 1], got {c.lam}")
    need(c.kl_reward_coef >= 0, "critic.kl_reward_coef", "must be >= 0")


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
    shorthands = ["steps", "output-dir", "resume", "config", "print-config"]
    close = difflib.get_close_matches(path, valid + shorthands, n=1, cutoff=0.0)
    hint = f"; did you mean --{close[0]}?" if close else ""
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
