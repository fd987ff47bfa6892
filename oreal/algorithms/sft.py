"""Supervised fine-tuning (`oreal-sft`): the initial policy that RL starts from.

    torchrun --nproc_per_node 8 -m oreal.algorithms.sft --config configs/sft_7b.py --data.train_file sft.jsonl
    oreal-sft --config configs/demo_cpu.py [--steps N] [--output-dir DIR] [--resume | --overwrite] [--a.b v]

The config file defines `sft_config()` returning an `SFTConfig`; options are overridden from the
command line by their dotted path, as with `oreal-train`. The data is JSONL in chat format
(`messages` / OREAL's `message_data`: turns ending in the assistant's response) or prompt/response
pairs (`oreal.data.sft_records`); the loss is on the response tokens only (the prompt's tokens are
context, not targets).

The model is either loaded from `model.init_path` (a local Hugging Face directory) or, for the CPU
demo and tests, built from scratch (a byte-level BPE tokenizer trained in-process on the SFT data
and a tiny random Qwen2; nothing is downloaded). Training runs the trainer's own machinery:
sequences packed into varlen `PackedBatch`es balanced over ranks, FSDP2 (`fully_shard`) over a gloo
(CPU) or NCCL group, the fused loss, DCP checkpoints every `checkpoint.interval` steps with exact
`--resume`, metrics.jsonl / TensorBoard / W&B / a console line per step (`log`).

SFT *is* the fused OREAL loss with advantage 1 on every sequence, every sequence positive, no
token RM and no KL: the loss is then `-(1/N) sum_t log p(label_t)` over the N response tokens
of the step (counted across ranks), i.e. token-mean cross-entropy. Using the fused loss rather
than `F.cross_entropy` keeps SFT on the same chunked path as RL: no `[T, V]` logits, the same
kernels and backends, and the same numerics the RL stage starts from.

The result is a Hugging Face directory `<output_dir>/hf` (safetensors, config, tokenizer with its
chat template, generation config) that `--model.path` of the RL trainer and `oreal-eval --model` take as is.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from oreal.runtime.config import (CheckpointConfig, ConfigError, LogConfig, OptimConfig, format_config,
                                  option_paths, set_option)

if TYPE_CHECKING:
    from oreal.data.sft_records import SFTRecord

INIT_DIR = "init_model"
HF_DIR = "hf"


@dataclass(kw_only=True)
class SFTModelConfig:
    """The model to fine-tune: a tiny Qwen2 built from scratch, or an existing Hugging Face directory."""

    init_path: str = ""  # a local HF directory to start from; "" builds the tokenizer and a tiny model
    vocab_size: int = 512  # upper bound for the BPE tokenizer trained on the SFT data
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 256
    tie_word_embeddings: bool = False
    attn_backend: str = "auto"
    param_dtype: str = "bfloat16"  # compute dtype of FSDP2's mixed precision on GPU (fp32 master weights); CPU: fp32
    gradient_checkpointing: bool = False


@dataclass(kw_only=True)
class SFTDataConfig:
    """The examples and how bare prompts are rendered (keep these equal to the RL config's `data`)."""

    train_file: str = ""  # JSONL: chat turns (`messages`) or prompt/response pairs (oreal.data.sft_records)
    template: str = "chat"
    system_prompt: str = ""
    instruction: str = ""
    max_examples: int = 0  # 0: all
    max_sequence_tokens: int = 0  # longer examples (prompt + response) are left out and counted; 0: micro_batch_tokens
    end_token: str = ""  # appended to every response so the model learns to stop; "": the tokenizer's eos


@dataclass(kw_only=True)
class SFTTrainConfig:
    steps: int = 200
    sequences_per_step: int = 64  # global batch (all ranks)
    micro_batch_tokens: int = 8192  # per rank
    loss_backend: str = "auto"
    seed: int = 0
    log_interval: int = 10  # metrics every this many steps (and at the first and last)
    device: str = "auto"  # auto | cpu | cuda


@dataclass(kw_only=True)
class SFTDebugConfig:
    kill_after_step: int = 0  # SIGKILL rank 0 right after this step's checkpoint is written (resume tests)


@dataclass(kw_only=True)
class SFTConfig:
    output_dir: str = "outputs/sft"
    resume: str = ""  # "": start fresh; "latest": the newest checkpoint in output_dir; or a checkpoint directory
    overwrite: bool = False  # delete a used output_dir and start afresh (otherwise a used one is refused)
    model: SFTModelConfig = field(default_factory=SFTModelConfig)
    data: SFTDataConfig = field(default_factory=SFTDataConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=2e-3, min_lr=2e-4, warmup_steps=10,
                                                                   weight_decay=0.0, grad_clip=1.0))
    train: SFTTrainConfig = field(default_factory=SFTTrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=lambda: CheckpointConfig(interval=100, keep_last=2))
    log: LogConfig = field(default_factory=LogConfig)
    debug: SFTDebugConfig = field(default_factory=SFTDebugConfig)

    def validate(self) -> "SFTConfig":
        def need(ok: bool, option: str, message: str) -> None:
            if not ok:
                raise ConfigError(f"--{option}: {message}")

        need(bool(self.data.train_file), "data.train_file", "is required (a JSONL file of problems with solutions)")
        need(Path(self.data.train_file).is_file(), "data.train_file", f"{self.data.train_file!r} does not exist")
        need(not self.model.init_path or (Path(self.model.init_path) / "config.json").is_file(), "model.init_path",
             f"{self.model.init_path!r} is not a Hugging Face model directory (no config.json)")
        need(self.train.steps > 0, "train.steps", "must be > 0")
        need(self.train.sequences_per_step > 0, "train.sequences_per_step", "must be > 0")
        need(self.train.micro_batch_tokens > 0, "train.micro_batch_tokens", "must be > 0")
        need(self.train.loss_backend in ("auto", "torch", "triton", "native"), "train.loss_backend",
             "must be one of auto, torch, triton, native")
        need(self.train.device in ("auto", "cpu", "cuda"), "train.device", "must be one of auto, cpu, cuda")
        need(self.model.param_dtype in ("bfloat16", "float16", "float32"), "model.param_dtype",
             "must be one of bfloat16, float16, float32")
        need(self.train.log_interval > 0, "train.log_interval", "must be > 0")
        need(self.data.max_examples >= 0, "data.max_examples", "must be >= 0 (0: all)")
        need(0 <= self.data.max_sequence_tokens <= self.train.micro_batch_tokens, "data.max_sequence_tokens",
             f"must be in [0, train.micro_batch_tokens={self.train.micro_batch_tokens}] (0: micro_batch_tokens)")
        need(self.checkpoint.interval >= 0, "checkpoint.interval", "must be >= 0 (0: only at the end)")
        need(self.checkpoint.keep_last >= 1, "checkpoint.keep_last", "must be >= 1")
        need(not (self.resume and self.overwrite), "overwrite",
             "contradicts --resume: continue the run, or start afresh")
        need(not self.log.wandb or importlib.util.find_spec("wandb") is not None, "log.wandb",
             "needs the wandb package: pip install 'oreal[wandb]' (or pip install wandb)")
        need(self.optim.lr > 0 and 0 <= self.optim.min_lr <= self.optim.lr, "optim.lr",
             "need lr > 0 and 0 <= min_lr <= lr")
        need(self.model.vocab_size >= 300, "model.vocab_size", "must be >= 300 (256 bytes + special tokens + merges)")
        need(self.model.hidden_size % self.model.num_heads == 0, "model.hidden_size",
             f"must be a multiple of model.num_heads={self.model.num_heads}")
        need(self.model.num_heads % self.model.num_kv_heads == 0, "model.num_heads",
             f"must be a multiple of model.num_kv_heads={self.model.num_kv_heads}")
        return self


# --------------------------------------------------------------------------------------------------
# Config file and command line
# --------------------------------------------------------------------------------------------------

SHORTHANDS = {"--steps": "train.steps", "--output-dir": "output_dir", "--output_dir": "output_dir"}


def load_sft_config(path: str | Path, factory: str = "sft_config") -> SFTConfig:
    """Run config file `path` and return what its `sft_config()` returns."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config: no such file {str(path)!r}")
    spec = importlib.util.spec_from_file_location(f"_oreal_sft_config_{abs(hash(str(path.resolve())))}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        raise ConfigError(f"--config {path}: the file failed to run: {type(exc).__name__}: {exc}") from exc
    make = getattr(module, factory, None)
    if not callable(make):
        raise ConfigError(f"--config {path}: the file must define a function `{factory}()` returning an SFTConfig")
    cfg = make()
    if not isinstance(cfg, SFTConfig):
        raise ConfigError(f"--config {path}: {factory}() returned {type(cfg).__name__}, "
                          "expected oreal.algorithms.sft.SFTConfig")
    return cfg


def parse_args(argv: list[str]) -> tuple[SFTConfig, bool]:
    """`--config FILE [--print-config] [--steps N] [--output-dir DIR] [--resume [PATH]] [--overwrite] [--a.b value ...]`
    -> (config, print_config). `--resume` alone continues from the newest checkpoint in the output folder."""
    argv = list(argv)
    config_path, print_config, pairs = None, False, []
    i = 0
    while i < len(argv):
        arg = argv[i]
        name, has_inline, inline = arg.partition("=")
        has_next = i + 1 < len(argv) and not argv[i + 1].startswith("--")
        if name in ("--print-config", "--overwrite") and not has_inline:
            print_config = print_config or name == "--print-config"
            if name == "--overwrite":
                pairs.append(("overwrite", "true"))
            i += 1
            continue
        if name == "--resume":
            value = inline if has_inline else (argv[i + 1] if has_next else "latest")
            pairs.append(("resume", value or "latest"))
            i += 2 if (has_next and not has_inline) else 1
            continue
        if not name.startswith("--") or name == "--":
            raise ConfigError(f"unexpected argument {arg!r}; options look like --section.option value")
        if has_inline:
            value = inline
        elif i + 1 < len(argv):
            value = argv[i + 1]
            i += 1
        else:
            raise ConfigError(f"{name} needs a value")
        if name == "--config":
            config_path = value
        else:
            pairs.append((SHORTHANDS.get(name, name[2:]), value))
        i += 1
    if not config_path:
        raise ConfigError("--config FILE is required (a Python file defining sft_config() -> SFTConfig)")
    cfg = load_sft_config(config_path)
    for path, value in pairs:
        set_option(cfg, path, value)
    return cfg.validate(), print_config


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------

def load_examples(cfg: SFTConfig) -> list[SFTRecord]:
    from oreal.data.sft_records import read_sft_records

    try:
        records = read_sft_records(cfg.data.train_file)
    except ValueError as exc:
        raise ConfigError(f"--data.train_file: {exc}") from None
    if cfg.data.max_examples:
        records = records[:cfg.data.max_examples]
    if not records:
        raise ConfigError(f"--data.train_file: {cfg.data.train_file!r} holds no example")
    return records


def end_token_id(tokenizer, cfg: SFTConfig) -> int:
    """The token every response ends with: `data.end_token` (one token of this tokenizer), else its eos."""
    if cfg.data.end_token:
        ids = tokenizer(cfg.data.end_token, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise ConfigError(f"--data.end_token: {cfg.data.end_token!r} is {len(ids)} tokens of this tokenizer; "
                              "it must be exactly one (an end-of-turn token such as <|im_end|>)")
        return int(ids[0])
    if tokenizer.eos_token_id is None:
        raise ConfigError("--model.init_path: the tokenizer has no eos token; set --data.end_token to the token "
                          "a response ends with")
    return int(tokenizer.eos_token_id)


def tokenize_examples(records: list, tokenizer, cfg: SFTConfig) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, response ids) per example. A bare question is rendered exactly as the RL trainer renders
    its prompts; chat turns go through the tokenizer's chat template verbatim (with the generation prompt).
    The response is followed by the end token, so the model learns to stop."""
    from oreal.data import PromptExample, PromptRenderer
    from oreal.data.sft_records import parse_sft_row

    records = [parse_sft_row(r) for r in records]
    renderer = PromptRenderer(tokenizer, template=cfg.data.template, system_prompt=cfg.data.system_prompt or None,
                              instruction=cfg.data.instruction)
    if any(r.messages is not None for r in records) and not getattr(tokenizer, "chat_template", None):
        raise ConfigError("--data.train_file: the data holds chat turns (messages), but the tokenizer has no chat "
                          "template to render them; use a chat model's tokenizer or prompt/response pairs")
    end = end_token_id(tokenizer, cfg)
    out = []
    for record in records:
        if record.messages is None:
            prompt = renderer.encode(PromptExample(question=record.question, gold_answer=record.answer))
        else:
            text = tokenizer.apply_chat_template(list(record.messages), tokenize=False, add_generation_prompt=True)
            prompt = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        response = list(tokenizer(record.response, add_special_tokens=False)["input_ids"]) + [end]
        out.append((prompt, response))
    return out


def drop_long_examples(examples: list[tuple[list[int], list[int]]], limit: int) -> tuple[list, int]:
    """The examples of at most `limit` tokens (prompt + response), and how many were left out."""
    kept = [e for e in examples if len(e[0]) + len(e[1]) <= limit]
    return kept, len(examples) - len(kept)


class ExampleOrder:
    """Which examples each step trains on: epochs over a seeded shuffle, drawn from its end; the same on every
    rank (each packs its share of one global batch). Its state (plain ints) travels in checkpoints, and a
    restored order continues exactly where the saved one stopped."""

    def __init__(self, num_examples: int, seed: int):
        self.num_examples, self.seed = num_examples, seed
        self._rng = random.Random(seed)
        self._order: list[int] = []
        self.epoch = 0  # shuffles drawn so far
        self.taken = 0  # examples taken from the current shuffle

    def take(self, count: int) -> list[int]:
        chosen = []
        while len(chosen) < count:
            if not self._order:
                self._order = list(range(self.num_examples))
                self._rng.shuffle(self._order)
                self.epoch += 1
                self.taken = 0
            chosen.append(self._order.pop())
            self.taken += 1
        return chosen

    def state_dict(self) -> dict:
        return {"num_examples": self.num_examples, "seed": self.seed, "epoch": self.epoch, "taken": self.taken}

    def load_state_dict(self, state: dict) -> None:
        for key in ("num_examples", "seed"):
            if state.get(key) != getattr(self, key):
                raise ConfigError(f"--resume: the checkpoint was trained with {key}={state.get(key)!r}, this run has "
                                  f"{getattr(self, key)!r} (same data and train.seed are needed to continue exactly)")
        self.__init__(self.num_examples, self.seed)
        for _ in range(state["epoch"]):
            self._order = list(range(self.num_examples))
            self._rng.shuffle(self._order)
        self.epoch = state["epoch"]
        self._order = self._order[:len(self._order) - state["taken"]]
        self.taken = state["taken"]


# --------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------

def build_initial_model(cfg: SFTConfig, records: list[dict], path: str | Path) -> None:
    """Train the tokenizer on the SFT texts, build a tiny random Qwen2 (seeded), save both to `path`."""
    import torch

    from oreal.model import load_causal_lm
    from oreal.model.tiny import build_tiny_tokenizer, tiny_qwen2_config

    from oreal.data.sft_records import parse_sft_row

    m = cfg.model
    texts = [parse_sft_row(r).text() for r in records]
    tokenizer = build_tiny_tokenizer(texts, vocab_size=m.vocab_size)
    hf_config = tiny_qwen2_config(len(tokenizer), hidden_size=m.hidden_size, num_layers=m.num_layers,
                                  num_heads=m.num_heads, num_kv_heads=m.num_kv_heads,
                                  intermediate_size=m.intermediate_size, tie_word_embeddings=m.tie_word_embeddings,
                                  max_position_embeddings=2048, eos_token_id=tokenizer.eos_token_id,
                                  pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    torch.manual_seed(cfg.train.seed)
    model = load_causal_lm(hf_config, dtype=torch.float32, attn_backend="sdpa", liger=False)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if path.exists():
        import shutil

        shutil.rmtree(path)
    tmp.rename(path)


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------

def _scalar(value) -> float:
    if hasattr(value, "full_tensor"):
        value = value.full_tensor()
    return float(value)


def train(cfg: SFTConfig) -> Path | None:
    """Run SFT on every rank (under torchrun, or alone); returns the exported HF directory on rank 0."""
    import torch
    import torch.distributed as dist

    from oreal.algorithms.policy import LossCoefficients, PolicyWithLoss
    from oreal.model import load_causal_lm
    from oreal.runtime.build import build_optimizer, load_tokenizer
    from oreal.runtime.checkpoint import CheckpointManager, export_hf
    from oreal.runtime.distributed import init_distributed, shard
    from oreal.runtime.metrics import MetricsLogger
    from oreal.runtime.output_folder import check_output_folder, prepare_output_folder

    out = Path(cfg.output_dir)
    # Every rank reads the folder before any rank writes to it (the barrier below), so they all agree.
    check_output_folder(out, resume=bool(cfg.resume), overwrite=cfg.overwrite)
    try:
        ctx = init_distributed(cfg.train.device)
    except RuntimeError as exc:
        raise ConfigError(str(exc)) from None
    try:
        dist.barrier()
        if ctx.is_main:
            prepare_output_folder(out, resume=bool(cfg.resume), overwrite=cfg.overwrite)
            (out / "sft_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
        records = load_examples(cfg)
        model_dir = cfg.model.init_path
        if not model_dir:
            model_dir = str(out / INIT_DIR)
            if ctx.is_main and not (cfg.resume and (Path(model_dir) / "config.json").is_file()):
                build_initial_model(cfg, records, model_dir)
        dist.barrier()
        tokenizer = load_tokenizer(model_dir)
        limit = cfg.data.max_sequence_tokens or cfg.train.micro_batch_tokens
        examples, dropped = drop_long_examples(tokenize_examples(records, tokenizer, cfg), limit)
        if not examples:
            raise ConfigError(f"--data.max_sequence_tokens: every example is longer than {limit} tokens "
                              "(raise data.max_sequence_tokens and train.micro_batch_tokens)")
        if dropped and ctx.is_main:
            print(f"oreal-sft: left out {dropped} of {len(records)} examples longer than {limit} tokens",
                  file=sys.stderr, flush=True)

        torch.manual_seed(cfg.train.seed)
        compute_dtype = getattr(torch, cfg.model.param_dtype) if ctx.device.type == "cuda" else torch.float32
        lm = load_causal_lm(model_dir, dtype=torch.float32, attn_backend=cfg.model.attn_backend, liger=False)
        if cfg.model.gradient_checkpointing:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        hf_config = lm.config
        # Advantage 1 on every (positive) sequence and no KL: the fused loss is token-mean cross-entropy.
        coefficients = LossCoefficients(kl_coef=0.0, pos_coef=1.0, neg_coef=1.0, backend=cfg.train.loss_backend)
        policy = shard(PolicyWithLoss(lm, coefficients), ctx, param_dtype=compute_dtype)
        optimizer, scheduler = build_optimizer(policy, cfg.optim, ctx, total_updates=cfg.train.steps)
        order = ExampleOrder(len(examples), cfg.train.seed)
        checkpoints = CheckpointManager(out, keep_last=cfg.checkpoint.keep_last)
        saved = dict(models={"policy": (policy, optimizer)}, schedulers={"policy": scheduler}, sampler=order)
        start_step = 0
        if cfg.resume:
            def warn(text: str) -> None:
                if ctx.is_main:
                    print(f"oreal-sft: {text}", file=sys.stderr, flush=True)

            path = checkpoints.latest_intact(warn) if cfg.resume == "latest" else Path(cfg.resume)
            if path is None:
                if ctx.is_main:
                    print(f"oreal-sft: --resume: no checkpoint in {checkpoints.root} yet; starting fresh",
                          file=sys.stderr, flush=True)
            else:
                start_step = int(checkpoints.load(path, **saved)["step"])
                if ctx.is_main:
                    print(f"oreal-sft: resumed from {path} (step {start_step})", file=sys.stderr, flush=True)
        logger = MetricsLogger.from_log_config(cfg.log, out, enabled=ctx.is_main, total_steps=cfg.train.steps,
                                               start_step=start_step, run_config=dataclasses.asdict(cfg), name="sft")
        pad_id = tokenizer.pad_token_id or 0
        try:
            for step in range(start_step + 1, cfg.train.steps + 1):
                chosen = [examples[i] for i in order.take(cfg.train.sequences_per_step)]
                metrics = train_step(policy, optimizer, scheduler, chosen, cfg, ctx, pad_id)
                if step % cfg.train.log_interval == 0 or step == cfg.train.steps or step == start_step + 1:
                    logger.log_step(step, metrics)
                if (cfg.checkpoint.interval and step % cfg.checkpoint.interval == 0) or step == cfg.train.steps:
                    checkpoints.save(step, trainer_state={}, **saved)
                if step == cfg.debug.kill_after_step and ctx.is_main:
                    import os
                    import signal

                    sys.stdout.flush()
                    sys.stderr.flush()
                    os.kill(os.getpid(), signal.SIGKILL)  # a hard kill, as a crash or a preemption would be
        finally:
            logger.close()
        exported = None
        if cfg.checkpoint.export_hf:
            lm.config.architectures = [type(lm).__name__]
            # In the compute dtype (bf16 on GPU), as Hugging Face checkpoints ship.
            exported = export_hf(policy.lm, hf_config, tokenizer, out / HF_DIR,
                                 dtype=compute_dtype if compute_dtype != torch.float32 else None)
            if ctx.is_main:
                # The engine stops on the eos of the generation config: keep it with the weights.
                lm.generation_config.save_pretrained(out / HF_DIR)
        dist.barrier()
        return exported
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def train_step(policy, optimizer, scheduler, chosen: list, cfg: SFTConfig, ctx, pad_id: int) -> dict:
    """One update on `chosen` (the step's global batch of (prompt ids, response ids)); returns its metrics."""
    import torch

    from oreal.data import TrainingSample, pack_rollouts
    from oreal.runtime.distributed import all_reduce_sum

    zero = torch.zeros((), dtype=torch.float64, device=ctx.device)
    start = time.perf_counter()
    samples = [TrainingSample(prompt, response, advantage=1.0, is_positive=True) for prompt, response in chosen]
    batches, _ = pack_rollouts(samples, max_tokens=cfg.train.micro_batch_tokens, world_size=ctx.world_size,
                               rank=ctx.rank, pad_token_id=pad_id)
    num_actions = sum(len(s.response_ids) for s in samples)  # global: every rank holds the whole list
    num_tokens = sum(len(s.prompt_ids) + len(s.response_ids) for s in samples)
    pos_tokens = torch.tensor(float(num_actions), dtype=torch.float64, device=ctx.device)
    optimizer.zero_grad(set_to_none=True)
    loss_sum = 0.0
    for batch in batches:
        batch = batch.to(ctx.device)
        result = policy(batch, rm_scores=None, ref_logprobs=None, pos_tokens=pos_tokens, neg_tokens=zero)
        # The loss of each rank is its share of the global mean; FSDP2 averages gradients over
        # ranks, so scaling by the world size turns that average into the sum.
        (result.loss * ctx.world_size).backward()
        loss_sum += float(result.loss.detach())
    grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(),
                                               cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else math.inf)
    lr = scheduler.get_last_lr()[0]
    optimizer.step()
    scheduler.step()
    loss = float(all_reduce_sum([loss_sum], ctx)[0])
    seconds = time.perf_counter() - start
    return {"loss/sft": loss, "optim/grad_norm": _scalar(grad_norm), "optim/lr": lr,
            "data/response_tokens": float(num_actions), "data/tokens": float(num_tokens),
            "throughput/tokens_per_s": num_tokens / seconds if seconds > 0 else math.nan, "time/step": seconds}


def main(argv: list[str] | None = None) -> int:
    """`oreal-sft` / `python -m oreal.algorithms.sft`: parse, then train; a user error is one line and exit code 2."""
    from oreal.runtime.setup_errors import SetupError

    argv = sys.argv[1:] if argv is None else argv
    try:
        cfg, print_config = parse_args(argv)
    except ConfigError as exc:
        print(f"oreal-sft: error: {exc}", file=sys.stderr)
        return 2
    if print_config:
        print(format_config(cfg))
        return 0
    try:
        exported = train(cfg)
    except (ConfigError, SetupError) as exc:
        print(f"oreal-sft: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        from oreal.runtime.checkpoint import CheckpointError

        if not isinstance(exc, CheckpointError):
            raise
        print(f"oreal-sft: error: {exc}", file=sys.stderr)
        return 2
    if exported is not None:
        print(f"oreal-sft: wrote {exported}", flush=True)
    return 0


__all__ = ["ExampleOrder", "SFTConfig", "SFTDataConfig", "SFTDebugConfig", "SFTModelConfig", "SFTTrainConfig",
           "load_sft_config", "main", "option_paths", "parse_args", "train"]

if __name__ == "__main__":
    # Run the importable module's main, so that config files and this code share one `SFTConfig` class
    # (under `python -m`, this file is `__main__`, a second copy of the module).
    from oreal.algorithms.sft import main as _main

    sys.exit(_main())
