"""Supervised fine-tuning: the initial policy that OREAL's RL starts from.

    torchrun --nproc_per_node 2 -m oreal.algorithms.sft --config configs/demo_cpu.py [--steps N] [--output-dir DIR] [--a.b v]

The config file defines `sft_config()` returning an `SFTConfig`; options are overridden from the
command line by their dotted path, as with `oreal-train`. The data is a JSONL file of worked
problems (`problem` + `solution`, as the demo's `oreal.demo.task.write_jsonl` writes them; read by `oreal.data.sft_records`).

The model is either built from scratch (a byte-level BPE tokenizer trained in-process on the SFT
data and a tiny random Qwen2; nothing is downloaded) or loaded from `model.init_path`. Training
runs the trainer's own machinery: sequences packed into `PackedBatch`es balanced over ranks,
FSDP2 (`fully_shard`) over a gloo (CPU) or NCCL group, and the fused OREAL loss.

SFT *is* the fused OREAL loss with advantage 1 on every sequence, every sequence positive, no
token RM and no KL: the loss is then `-(1/N) sum_t log p(label_t)` over the N response tokens
of the step (counted across ranks), i.e. token-mean cross-entropy. Using the fused loss rather
than `F.cross_entropy` keeps SFT on the same chunked path as RL: no `[T, V]` logits, the same
kernels and backends, and the same numerics the RL stage starts from.

The result is a Hugging Face directory `<output_dir>/hf` (safetensors, config, tokenizer with its
chat template) that `--model.path` of the RL trainer takes as is.
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

from oreal.runtime.config import ConfigError, OptimConfig, format_config, option_paths, set_option

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


@dataclass(kw_only=True)
class SFTDataConfig:
    """The worked problems and how prompts are rendered (keep these equal to the RL config's `data`)."""

    train_file: str = ""
    template: str = "chat"
    system_prompt: str = ""
    instruction: str = ""
    max_examples: int = 0  # 0: all


@dataclass(kw_only=True)
class SFTTrainConfig:
    steps: int = 200
    sequences_per_step: int = 64  # global batch (all ranks)
    micro_batch_tokens: int = 8192  # per rank
    loss_backend: str = "auto"
    seed: int = 0
    log_interval: int = 10


@dataclass(kw_only=True)
class SFTConfig:
    output_dir: str = "outputs/sft"
    model: SFTModelConfig = field(default_factory=SFTModelConfig)
    data: SFTDataConfig = field(default_factory=SFTDataConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=2e-3, min_lr=2e-4, warmup_steps=10,
                                                                   weight_decay=0.0, grad_clip=1.0))
    train: SFTTrainConfig = field(default_factory=SFTTrainConfig)

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
        raise ConfigError(f"--config {path}: {factory}() returned {type(cfg).__name__}, expected oreal.algorithms.sft.SFTConfig")
    return cfg


def parse_args(argv: list[str]) -> tuple[SFTConfig, bool]:
    """`--config FILE [--print-config] [--steps N] [--output-dir DIR] [--a.b value ...]` -> (config, print_config)."""
    argv = list(argv)
    config_path, print_config, pairs = None, False, []
    i = 0
    while i < len(argv):
        arg = argv[i]
        name, has_inline, inline = arg.partition("=")
        if name == "--print-config":
            print_config = True
            i += 1
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

def load_examples(cfg: SFTConfig) -> list[dict]:
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


def tokenize_examples(records: list[dict], tokenizer, cfg: SFTConfig) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, response ids) per example: the prompt rendered exactly as the RL trainer renders it,
    the response the worked solution followed by the end-of-turn token (so the model learns to stop)."""
    from oreal.data import PromptExample, PromptRenderer

    renderer = PromptRenderer(tokenizer, template=cfg.data.template, system_prompt=cfg.data.system_prompt or None,
                              instruction=cfg.data.instruction)
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ConfigError("--model.init_path: the tokenizer has no eos token; SFT teaches the model to end with it")
    out = []
    for record in records:
        prompt = renderer.encode(PromptExample(question=record["problem"], gold_answer=str(record.get("answer", ""))))
        response = list(tokenizer(record["solution"], add_special_tokens=False)["input_ids"]) + [eos]
        out.append((prompt, response))
    return out


# --------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------

def build_initial_model(cfg: SFTConfig, records: list[dict], path: str | Path) -> None:
    """Train the tokenizer on the SFT texts, build a tiny random Qwen2 (seeded), save both to `path`."""
    import torch

    from oreal.model import load_causal_lm
    from oreal.model.tiny import build_tiny_tokenizer, tiny_qwen2_config

    m = cfg.model
    texts = [f"{r['problem']}\n{r['solution']}" for r in records]
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

    from oreal.runtime.checkpoint import export_hf
    from oreal.runtime.build import build_optimizer, load_tokenizer
    from oreal.data import TrainingSample, pack_rollouts
    from oreal.runtime.distributed import all_reduce_sum, init_distributed, shard
    from oreal.runtime.metrics import MetricsLogger
    from oreal.model import load_causal_lm
    from oreal.algorithms.policy import LossCoefficients, PolicyWithLoss

    ctx = init_distributed("cpu" if not torch.cuda.is_available() else "auto")
    out = Path(cfg.output_dir)
    try:
        if ctx.is_main:
            out.mkdir(parents=True, exist_ok=True)
            (out / "sft_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
        records = load_examples(cfg)
        model_dir = cfg.model.init_path
        if not model_dir:
            model_dir = str(out / INIT_DIR)
            if ctx.is_main:
                build_initial_model(cfg, records, model_dir)
        dist.barrier()
        tokenizer = load_tokenizer(model_dir)
        examples = tokenize_examples(records, tokenizer, cfg)
        longest = max(len(p) + len(r) for p, r in examples)
        if longest > cfg.train.micro_batch_tokens:
            raise ConfigError(f"--train.micro_batch_tokens: {cfg.train.micro_batch_tokens} is less than the longest "
                              f"example ({longest} tokens)")

        torch.manual_seed(cfg.train.seed)
        lm = load_causal_lm(model_dir, dtype=torch.float32, attn_backend=cfg.model.attn_backend,
                            device=ctx.device, liger=False)
        hf_config = lm.config
        # Advantage 1 on every (positive) sequence and no KL: the fused loss is token-mean cross-entropy.
        coefficients = LossCoefficients(kl_coef=0.0, pos_coef=1.0, neg_coef=1.0, backend=cfg.train.loss_backend)
        policy = shard(PolicyWithLoss(lm, coefficients), ctx, param_dtype=torch.float32)
        optimizer, scheduler = build_optimizer(policy, cfg.optim, ctx, total_updates=cfg.train.steps)
        logger = MetricsLogger(out, enabled=ctx.is_main, total_steps=cfg.train.steps, tensorboard=False,
                               progress_bar=False)
        rng = random.Random(cfg.train.seed)  # the same draw on every rank: each packs its share of one batch
        order: list[int] = []
        zero = torch.zeros((), dtype=torch.float64, device=ctx.device)
        pad_id = tokenizer.pad_token_id or 0
        start = time.perf_counter()
        for step in range(1, cfg.train.steps + 1):
            chosen = []
            while len(chosen) < cfg.train.sequences_per_step:
                if not order:  # epochs over a shuffled order
                    order = list(range(len(examples)))
                    rng.shuffle(order)
                chosen.append(order.pop())
            rollouts = [TrainingSample(examples[i][0], examples[i][1], advantage=1.0, is_positive=True) for i in chosen]
            batches, _ = pack_rollouts(rollouts, max_tokens=cfg.train.micro_batch_tokens, world_size=ctx.world_size,
                                       rank=ctx.rank, pad_token_id=pad_id)
            num_actions = sum(len(r.response_ids) for r in rollouts)  # global: every rank holds the whole list
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
            optimizer.step()
            scheduler.step()
            if step % cfg.train.log_interval == 0 or step == cfg.train.steps or step == 1:
                loss = float(all_reduce_sum([loss_sum], ctx)[0])
                elapsed = time.perf_counter() - start
                logger.log_step(step, {"loss/sft": loss, "optim/grad_norm": _scalar(grad_norm),
                                       "optim/lr": scheduler.get_last_lr()[0], "time/elapsed_s": elapsed})
                if ctx.is_main:
                    print(f"sft step {step}/{cfg.train.steps} loss {loss:.4f} ({elapsed:.0f}s)", flush=True)
        logger.close()
        lm.config.architectures = [type(lm).__name__]
        exported = export_hf(policy.lm, hf_config, tokenizer, out / HF_DIR)
        if ctx.is_main:
            # The engine stops on the eos of the generation config: keep it with the weights.
            lm.generation_config.save_pretrained(out / HF_DIR)
        dist.barrier()
        return exported
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        cfg, print_config = parse_args(argv)
    except ConfigError as exc:
        print(f"oreal.algorithms.sft: error: {exc}", file=sys.stderr)
        return 2
    if print_config:
        print(format_config(cfg))
        return 0
    try:
        exported = train(cfg)
    except ConfigError as exc:
        print(f"oreal.algorithms.sft: error: {exc}", file=sys.stderr)
        return 2
    if exported is not None:
        print(f"sft: wrote {exported}", flush=True)
    return 0


__all__ = ["SFTConfig", "SFTDataConfig", "SFTModelConfig", "SFTTrainConfig", "load_sft_config", "main",
           "option_paths", "parse_args", "train"]

if __name__ == "__main__":
    # Run the importable module's main, so that config files and this code share one `SFTConfig` class
    # (under `python -m`, this file is `__main__`, a second copy of the module).
    from oreal.algorithms.sft import main as _main

    sys.exit(_main())
