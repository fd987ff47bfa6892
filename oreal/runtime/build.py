"""Builds the parts of a training run that every algorithm shares, failing fast with clear messages.

The algorithm's own models (the policy whose forward ends in its loss, the reference, the token RM,
the critic) are put together with these parts by `oreal.algorithms.assemble.build`.

Order matters for the failures a user can cause: the model path, the prompt files and the LLM
verifier are checked before anything expensive starts, and each problem is one exception that
names the option to fix (a `SetupError`).

What gets built, on every rank unless noted:
- the tokenizer and, for `model.tiny.enabled`, a tiny random Qwen2 written once (by rank 0) to
  `<output_dir>/tiny_model`, so that every rank and the engine load the very same weights;
- the prompt dataset and its sampler (sharded over ranks, resumable);
- the policy (FSDP2, with the algorithm's fused loss in its root forward: OREAL's, or the clipped
  surrogate of `--algorithm grpo|ppo`), the frozen reference policy (FSDP2, forward only; built only
  when the algorithm's KL term needs it), the token RM (FSDP2; OREAL with `loss.use_token_rm`) and
  PPO's critic (FSDP2), with AdamW and warm-up + cosine schedules;
- the rollout engine (rank 0 only) behind a `DistributedGenerator`, with the weight syncer;
- the judge; the eval sets.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from oreal.runtime.config import Config
from oreal.runtime.distributed import DistContext
from oreal.runtime.setup_errors import SetupError
from oreal.runtime.schedule import warmup_cosine

TINY_MODEL_DIR = "tiny_model"


_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def param_dtype(cfg: Config, ctx: DistContext) -> torch.dtype:
    """The compute dtype: the configured one on GPU; fp32 on CPU (bf16 matmuls are slow and inexact there)."""
    return _DTYPES[cfg.model.param_dtype] if ctx.device.type == "cuda" else torch.float32


# -------------------------------------------------------------------------------------------------
# Model sources
# -------------------------------------------------------------------------------------------------

def _check_model_dir(option: str, path: str) -> None:
    if not os.path.isdir(path):
        raise SetupError(f"--{option}: {path!r} is not a directory; models load from local files only "
                         "(download the Hugging Face checkpoint there first, or fix the path)")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise SetupError(f"--{option}: {path!r} has no config.json; point it at a Hugging Face model directory")


def on_rank0(fn: Callable[[], None], group) -> None:
    """Run `fn` on rank 0; every rank returns when it is done, or raises its error (instead of waiting forever)."""
    failure = None
    if dist.get_rank() == 0:
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - re-raised on every rank below
            failure = exc if isinstance(exc, SetupError) else SetupError(f"{type(exc).__name__}: {exc}")
    box = [failure]
    dist.broadcast_object_list(box, src=0, group=group)
    if box[0] is not None:
        raise box[0]


def model_paths(cfg: Config, ctx: DistContext, group) -> tuple[str, str, str]:
    """(policy, reference, token RM) model directories; builds the tiny model first when asked."""
    if cfg.model.tiny.enabled:
        path = str(Path(cfg.output_dir) / TINY_MODEL_DIR)
        from oreal.runtime.tiny_model import write_tiny_model

        on_rank0(lambda: (Path(path) / "config.json").exists() or write_tiny_model(cfg, path), group)
        return path, path, path
    policy = cfg.model.path
    reference = cfg.model.reference_path or policy
    token_rm = cfg.model.token_rm_path or policy
    _check_model_dir("model.path", policy)
    _check_model_dir("model.reference_path" if cfg.model.reference_path else "model.path", reference)
    _check_model_dir("model.token_rm_path" if cfg.model.token_rm_path else "model.path", token_rm)
    return policy, reference, token_rm


def critic_path(cfg: Config, policy_path: str) -> str:
    """`critic.path`, or the policy's own starting point (the tiny model, or `model.path`)."""
    if cfg.critic.path and not cfg.model.tiny.enabled:
        _check_model_dir("critic.path", cfg.critic.path)
        return cfg.critic.path
    return policy_path


def load_tokenizer(path: str):
    """The model directory's tokenizer. One saved as a generic `tokenizers` backend is loaded as such:
    `AutoTokenizer` would otherwise pick the model family's class (Qwen2Tokenizer) and replace its
    pre-tokenizer and decoder with that family's."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    try:
        saved_class = json.loads((Path(path) / "tokenizer_config.json").read_text()).get("tokenizer_class")
    except (OSError, ValueError):
        saved_class = None
    if saved_class in ("TokenizersBackend", "PreTrainedTokenizerFast"):
        tokenizer = PreTrainedTokenizerFast.from_pretrained(path, local_files_only=True)
    else:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# -------------------------------------------------------------------------------------------------
# Data
# -------------------------------------------------------------------------------------------------

def build_dataset(cfg: Config, tokenizer, ctx: DistContext):
    from oreal.data import DifficultyResampling, PromptDataset, PromptRenderer, PromptSampler

    for file in cfg.data.train_files:
        if not os.path.isfile(file):
            raise SetupError(f"--data.train_files: {file!r} does not exist")
    resampling = None
    if cfg.data.difficulty_balance:
        bands = tuple((float(lo), float(hi), int(rep)) for lo, hi, rep in cfg.data.difficulty_balance)
        drop = cfg.data.drop_pass_rate_above if cfg.data.drop_pass_rate_above < 1.0 else None
        resampling = DifficultyResampling(bands=bands, drop_at=drop)
    renderer = PromptRenderer(tokenizer, template=cfg.data.template, system_prompt=cfg.data.system_prompt or None,
                              instruction=cfg.data.instruction)
    try:
        dataset = PromptDataset.from_jsonl(cfg.data.train_files, format=cfg.data.format, renderer=renderer,
                                           resampling=resampling)
    except ValueError as exc:
        raise SetupError(f"--data.train_files: {exc}") from exc
    if len(dataset) == 0:
        raise SetupError(f"--data.train_files: {cfg.data.train_files} hold no prompt; give non-empty JSONL files")
    if cfg.data.prompts_per_step % ctx.world_size:
        raise SetupError(f"--data.prompts_per_step: {cfg.data.prompts_per_step} prompts do not split evenly over "
                         f"{ctx.world_size} ranks; use a multiple of {ctx.world_size}")
    if cfg.data.prompts_per_step > len(dataset):
        raise SetupError(f"--data.prompts_per_step: {cfg.data.prompts_per_step} is more than the {len(dataset)} "
                         f"prompts in {cfg.data.train_files}")
    sampler = PromptSampler(len(dataset), cfg.data.prompts_per_step, rank=ctx.rank, world_size=ctx.world_size,
                            seed=cfg.data.seed)
    return dataset, sampler


def build_eval_sets(cfg: Config, tokenizer, ctx: DistContext) -> list:
    """This rank's share of each eval file's problems (ranks split every file evenly, the rest to the first)."""
    from oreal.data import PromptDataset, PromptRenderer
    from oreal.runtime.evaluation import EvalSet, eval_set_name

    if not cfg.eval.files:
        return []
    renderer = PromptRenderer(tokenizer, template=cfg.data.template, system_prompt=cfg.data.system_prompt or None,
                              instruction=cfg.data.instruction)
    sets = []
    for file in cfg.eval.files:
        if not os.path.isfile(file):
            raise SetupError(f"--eval.files: {file!r} does not exist")
        try:
            dataset = PromptDataset.from_jsonl([file], renderer=renderer)
        except ValueError as exc:
            raise SetupError(f"--eval.files: {exc}") from exc
        count = len(dataset) if not cfg.eval.max_problems else min(len(dataset), cfg.eval.max_problems)
        if count == 0:
            raise SetupError(f"--eval.files: {file!r} holds no problem")
        mine = list(range(ctx.rank, count, ctx.world_size))
        sets.append(EvalSet(eval_set_name(file), dataset.batch(mine)))
    return sets


# -------------------------------------------------------------------------------------------------
# Models and optimizers
# -------------------------------------------------------------------------------------------------

def _load_lm(cfg: Config, path: str, dtype: torch.dtype, ctx: DistContext):
    from oreal.model import load_causal_lm

    try:
        return load_causal_lm(path, dtype=dtype, attn_backend=cfg.model.attn_backend,
                              liger=cfg.model.liger and ctx.device.type == "cuda")
    except ValueError as exc:
        raise SetupError(f"--model.path: {exc}") from exc


def build_optimizer(module: torch.nn.Module, optim_cfg, ctx: DistContext, *, total_updates: int):
    params = [p for p in module.parameters() if p.requires_grad]
    kwargs = dict(lr=optim_cfg.lr, betas=tuple(optim_cfg.betas), eps=optim_cfg.eps,
                  weight_decay=optim_cfg.weight_decay)
    if ctx.device.type == "cuda":
        kwargs["fused"] = True
    else:
        kwargs["foreach"] = True
    optimizer = torch.optim.AdamW(params, **kwargs)
    scheduler = warmup_cosine(optimizer, lr=optim_cfg.lr, min_lr=optim_cfg.min_lr,
                              warmup_steps=optim_cfg.warmup_steps, total_steps=max(1, total_updates))
    return optimizer, scheduler


# -------------------------------------------------------------------------------------------------
# Rollout engine and judge
# -------------------------------------------------------------------------------------------------

def stop_token_ids(cfg: Config, tokenizer) -> tuple[int, ...]:
    ids = []
    for word in cfg.rollout.stop_words:
        token_id = tokenizer.convert_tokens_to_ids(word)
        if token_id is None or token_id == tokenizer.unk_token_id:
            encoded = tokenizer(word, add_special_tokens=False)["input_ids"]
            if len(encoded) != 1:
                raise SetupError(f"--rollout.stop_words: {word!r} is not one token of this tokenizer "
                                 f"(it encodes to {len(encoded)} tokens); stop words must be single tokens")
            token_id = encoded[0]
        ids.append(int(token_id))
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    return tuple(dict.fromkeys(ids))


class EngineLauncher:
    """Starts the rollout engine on rank 0 in a background thread, so that loading it (seconds for the
    transformers engine, minutes for vLLM) overlaps with loading and sharding the trainer's models."""

    def __init__(self, cfg: Config, ctx: DistContext, model_path: str):
        self.engine, self.failure = None, None
        self._thread = None
        if ctx.is_main:
            self._thread = threading.Thread(target=self._start, args=(cfg, ctx, model_path), daemon=True,
                                            name="oreal-engine-start")
            self._thread.start()

    def _start(self, cfg: Config, ctx: DistContext, model_path: str) -> None:
        from oreal.rollout import build_engine

        options: dict[str, Any] = {}
        if cfg.rollout.engine == "hf":
            options.update(device="cpu" if ctx.device.type == "cpu" else str(ctx.device))
            if cfg.rollout.engine_threads:
                options["num_threads"] = cfg.rollout.engine_threads
            dtype = "float32" if ctx.device.type == "cpu" else cfg.model.param_dtype
        else:
            options.update(tensor_parallel_size=cfg.rollout.tensor_parallel_size,
                           gpu_memory_utilization=cfg.rollout.gpu_memory_utilization,
                           max_model_len=cfg.rollout.max_total_tokens)
            dtype = cfg.model.param_dtype
        try:
            self.engine = build_engine(cfg.rollout.engine, model_path, dtype=dtype, seed=cfg.train.seed,
                                       request_timeout_s=cfg.rollout.timeout_s, sync_timeout_s=cfg.rollout.timeout_s,
                                       gpus=cfg.rollout.gpus or None,
                                       log_path=str(Path(cfg.output_dir) / "engine.log"), **options)
        except Exception as exc:  # noqa: BLE001 - reported to every rank by `result`
            self.failure = f"--rollout.engine {cfg.rollout.engine}: the engine did not start: {exc}"

    def result(self, group):
        """The engine (rank 0; None elsewhere) once it is up; every rank raises SetupError if it failed."""
        if self._thread is not None:
            self._thread.join()
        box = [self.failure]
        dist.broadcast_object_list(box, src=0, group=group)
        if box[0] is not None:
            raise SetupError(box[0])
        return self.engine

    def abandon(self) -> None:
        """Setup failed elsewhere: wait for the start to finish and stop the engine."""
        if self._thread is not None:
            self._thread.join()
        if self.engine is not None:
            self.engine.close()
            self.engine = None


def build_generator(cfg: Config, ctx: DistContext, policy_lm: torch.nn.Module, engine, group):
    from oreal.rollout.generator import DistributedGenerator
    from oreal.rollout import WeightSyncer

    syncer = WeightSyncer(policy_lm, engine, bucket_bytes=cfg.rollout.sync_bucket_mb << 20)
    return DistributedGenerator(engine, syncer, rank=ctx.rank, world_size=ctx.world_size, group=group)


class Judge:
    """Rewards from the judger: `judge(texts, golds, questions) -> list[bool]`, with counters for the metrics.

    The rules run in the judger's pool of killable worker processes (hard per-answer timeout); the LLM
    verifier, when configured, is consulted where the rules say "not equal".
    """

    def __init__(self, cfg: Config):
        from oreal import reward

        self._judge_batch = reward.judge_batch
        self.cfg = cfg.judge
        self.verifier = _build_verifier(cfg) if cfg.judge.verifier_hosts else None
        self.timeouts = 0

    def __call__(self, texts: list[str], golds: list[str], questions: list[str] | None = None) -> list[bool]:
        if not texts:
            return []
        judgements = self._judge_batch(texts, golds, questions=questions, stop_word=self.cfg.stop_word or None,
                                       thinking_finish_words=tuple(self.cfg.thinking_finish_words),
                                       timeout=self.cfg.timeout_s, num_workers=self.cfg.num_workers or None,
                                       verifier=self.verifier)
        self.timeouts += sum(1 for j in judgements if j.reason == "timeout")
        return [bool(j.correct) for j in judgements]

    def counters(self) -> dict:
        out = {"judge/timeouts": float(self.timeouts)}
        if self.verifier is not None:
            out["judge/verifier_failures"] = float(self.verifier.metrics.failed)
            out["judge/verifier_overrules"] = float(self.verifier.metrics.equivalent)
        return out


def _build_verifier(cfg: Config):
    """The LLM verifier, after checking that every host answers a trivial grading request."""
    from oreal import reward

    j = cfg.judge
    if not j.verifier_model:
        raise SetupError("--judge.verifier_model: the served model name is required with --judge.verifier_hosts")
    for host in j.verifier_hosts:
        probe = reward.LLMVerifier([host], j.verifier_model, timeout=j.verifier_timeout_s, retries=0)
        if probe.verify("What is 1 + 1?", "2", "2") is None:
            raise SetupError(f"--judge.verifier_hosts: the LLM verifier at {host!r} is unreachable or gave no "
                             f"usable answer ({probe.metrics.as_dict()}); start it, fix the host, or drop it "
                             "(--judge.verifier_hosts '' judges with the rules only)")
    return reward.LLMVerifier(list(j.verifier_hosts), j.verifier_model, timeout=j.verifier_timeout_s)


# -------------------------------------------------------------------------------------------------

def check_files(cfg: Config) -> None:
    """Prompt and eval files exist (a cheap check before anything is loaded or built)."""
    for option, files in (("data.train_files", cfg.data.train_files), ("eval.files", cfg.eval.files)):
        for file in files:
            if not os.path.isfile(file):
                raise SetupError(f"--{option}: {file!r} does not exist")
