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
- the rollout engines behind a `DistributedGenerator`, with their weight syncer: dedicated engine processes
  (each node's local rank 0 starts its node's share) or a colocated engine in every rank;
- the judge; the eval sets.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from oreal.runtime.budget import judge_workers
from oreal.runtime.config import VERIFIER_HOSTS_ENV, Config
from oreal.runtime.distributed import DistContext
from oreal.runtime.setup_errors import SetupError
from oreal.runtime.schedule import warmup_cosine, warmup_length

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
        # loaded on the CPU and moved by FSDP2: the attention backend is chosen for where and in which
        # dtype the forwards will run, not for the CPU it is loaded on
        return load_causal_lm(path, dtype=dtype, attn_backend=cfg.model.attn_backend,
                              liger=cfg.model.liger and ctx.device.type == "cuda",
                              compute_device=ctx.device, compute_dtype=param_dtype(cfg, ctx))
    except ValueError as exc:
        raise SetupError(f"--model.path: {exc}") from exc


def build_optimizer(module: torch.nn.Module, optim_cfg, ctx: DistContext, *, total_updates: int):
    """AdamW over the trainable parameters, and its warm-up + cosine schedule over `total_updates` ticks."""
    params = [p for p in module.parameters() if p.requires_grad]
    kwargs = dict(lr=optim_cfg.lr, betas=tuple(optim_cfg.betas), eps=optim_cfg.eps,
                  weight_decay=optim_cfg.weight_decay)
    if ctx.device.type == "cuda":
        kwargs["fused"] = True
    else:
        kwargs["foreach"] = True
    optimizer = torch.optim.AdamW(params, **kwargs)
    total = max(1, total_updates)
    scheduler = warmup_cosine(optimizer, lr=optim_cfg.lr, min_lr=optim_cfg.min_lr,
                              warmup_steps=warmup_length(optim_cfg.warmup_steps, optim_cfg.warmup_ratio, total),
                              total_steps=total, from_zero=optim_cfg.warmup_from_zero)
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


def _engine_options(cfg: Config, ctx: DistContext) -> tuple[dict[str, Any], str]:
    """(build_engine options, dtype) of one rollout engine of `cfg.rollout.engine`."""
    options: dict[str, Any] = {}
    if cfg.rollout.engine == "hf":
        options.update(device="cpu" if ctx.device.type == "cpu" else str(ctx.device))
        if cfg.rollout.placement == "dedicated" and ctx.device.type == "cpu":
            # its own process: the node's cores, shared by the node's engines (the ranks sleep while they generate)
            from oreal.runtime.budget import engine_threads, local_world_size

            nodes = max(1, ctx.world_size // local_world_size())
            sharing = -(-cfg.rollout.num_engines // nodes)
            if cfg.rollout.max_staleness > 0:  # the ranks train while the engines generate: an even share each
                sharing += local_world_size()
            options["num_threads"] = engine_threads(cfg.rollout.engine_threads, sharing)
        return options, ("float32" if ctx.device.type == "cpu" else cfg.model.param_dtype)
    options.update(tensor_parallel_size=cfg.rollout.tensor_parallel_size,
                   gpu_memory_utilization=cfg.rollout.gpu_memory_utilization,
                   max_model_len=cfg.rollout.max_total_tokens)
    return options, cfg.model.param_dtype


def ranks_per_node(ctx: DistContext) -> int:
    """Trainer ranks per node: torchrun's LOCAL_WORLD_SIZE (the whole job when launched without it)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", ctx.world_size))


class EngineLauncher:
    """Starts the dedicated rollout engines in a background thread, so that loading them (seconds for the
    transformers engine, minutes for vLLM) overlaps with loading and sharding the trainer's models.

    Each node's local rank 0 starts its own node's engines (`oreal.rollout.placement.dedicated_layout`),
    all at once; no engine is started from another node. The colocated placement starts nothing here: its
    engines live in the trainer processes and are built by `build_generator`.
    """

    def __init__(self, cfg: Config, ctx: DistContext, model_path: str):
        self.engines: dict[int, Any] = {}
        self.failure: str | None = None
        self.layout = None
        self._thread = None
        if cfg.rollout.placement != "dedicated":
            return
        from oreal.rollout.placement import PlacementError, dedicated_layout

        try:
            self.layout = dedicated_layout(cfg.rollout.num_engines, ctx.world_size, ranks_per_node(ctx),
                                           cfg.rollout.tensor_parallel_size, cfg.rollout.gpus)
        except PlacementError as exc:
            self.failure = str(exc)
            return
        mine = self.layout.engines_of(ctx.rank)
        if mine:
            self._thread = threading.Thread(target=self._start_all, args=(cfg, ctx, model_path, mine), daemon=True,
                                            name="oreal-engine-start")
            self._thread.start()

    def _start_all(self, cfg: Config, ctx: DistContext, model_path: str, mine: list[int]) -> None:
        threads = [threading.Thread(target=self._start, args=(cfg, ctx, model_path, e), daemon=True) for e in mine]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    def _start(self, cfg: Config, ctx: DistContext, model_path: str, index: int) -> None:
        from oreal.rollout import build_engine

        options, dtype = _engine_options(cfg, ctx)
        gpus = self.layout.gpus[index]
        log = "engine.log" if self.layout.num_engines == 1 else f"engine-{index}.log"
        try:
            self.engines[index] = build_engine(
                cfg.rollout.engine, model_path, dtype=dtype, seed=cfg.train.seed + index,
                request_timeout_s=cfg.rollout.timeout_s, sync_timeout_s=cfg.rollout.timeout_s,
                gpus=gpus if gpus is not None else (cfg.rollout.gpus or None),
                log_path=str(Path(cfg.output_dir) / log), **options)
        except Exception as exc:  # noqa: BLE001 - reported to every rank by `result`
            self.failure = f"--rollout.engine {cfg.rollout.engine}: engine {index} did not start: {exc}"

    def result(self, group) -> dict[int, Any]:
        """{engine index: engine} this rank owns (empty on most ranks) once all are up; every rank raises
        SetupError if any engine anywhere failed to start."""
        if self._thread is not None:
            self._thread.join()
        everyone: list = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, self.failure, group=group)
        failures = list(dict.fromkeys(f for f in everyone if f))
        if failures:
            self.abandon()
            raise SetupError("; ".join(failures))
        return dict(self.engines)

    def abandon(self) -> None:
        """Setup failed elsewhere: wait for the starts to finish and stop the engines."""
        if self._thread is not None:
            self._thread.join()
        for engine in self.engines.values():
            engine.close()
        self.engines = {}


def generator_group(cfg: Config):
    """A gloo group for the generator's object collectives whose timeout outlasts an engine's: a rank waiting
    there for an owner whose engine hangs hears the owner's EngineTimeoutError instead of timing out first."""
    import datetime

    return dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=cfg.rollout.timeout_s + 300))


def build_generator(cfg: Config, ctx: DistContext, policy_lm: torch.nn.Module, engines: dict[int, Any],
                    launcher: EngineLauncher, model_path: str):
    """The run's `DistributedGenerator`, over the dedicated engines the launcher started or the colocated
    engine of every rank, with its weight syncer. Collective."""
    from oreal.rollout.generator import ColocatedEngines, DedicatedEngines, DistributedGenerator

    group = generator_group(cfg)
    if cfg.rollout.placement == "colocated":
        from oreal.rollout.colocated import LayerwiseLoader
        from oreal.rollout.placement import PlacementError, colocated_groups

        try:
            colocated_groups(ctx.world_size, cfg.rollout.tensor_parallel_size)
        except PlacementError as exc:
            raise SetupError(str(exc)) from exc
        engine, failure = None, None
        try:
            engine = _colocated_engine(cfg, ctx, model_path)
        except SetupError as exc:
            failure = str(exc)
        everyone: list = [None] * ctx.world_size
        dist.all_gather_object(everyone, failure, group=group)  # one rank's failure stops every rank
        failures = list(dict.fromkeys(f for f in everyone if f))
        if failures:
            if engine is not None:
                engine.close()
            raise SetupError("; ".join(failures))
        placement = ColocatedEngines(engine, rank=ctx.rank, world_size=ctx.world_size,
                                     tensor_parallel_size=cfg.rollout.tensor_parallel_size,
                                     sleep_level=cfg.rollout.sleep_level, group=group)
        return DistributedGenerator(placement, LayerwiseLoader(policy_lm, engine, group=group))
    from oreal.rollout import WeightSyncer
    from oreal.rollout.fanout import EngineFanOut

    layout = launcher.layout
    mine = [engines[e] for e in sorted(engines)]
    placement = DedicatedEngines(engines, layout, rank=ctx.rank, world_size=ctx.world_size, group=group)
    if len(layout.owner_ranks) == 1:  # one node: rank 0 feeds every engine itself
        sync_target = None if not mine else (mine[0] if len(mine) == 1 else EngineFanOut(mine))
        return DistributedGenerator(placement, WeightSyncer(policy_lm, sync_target,
                                                            bucket_bytes=cfg.rollout.sync_bucket_mb << 20))
    # Several nodes: rank 0 gathers each bucket once and relays it through every other node's owner.
    from oreal.rollout.relay import RelayedSyncer, RelayServer, RemoteNode, pair_groups

    device = ctx.device  # NCCL between GPUs, gloo between CPU processes
    pairs = pair_groups(list(layout.owner_ranks), device, timeout_s=cfg.rollout.timeout_s + 300)
    remotes, server = [], None
    if ctx.rank == 0:
        remotes = [RemoteNode(owner, group_, device, cfg.rollout.timeout_s) for owner, group_ in pairs.items()]
        sync_target = EngineFanOut(mine + remotes)
    else:
        sync_target = None
        if ctx.rank in pairs:
            server = RelayServer(mine, pairs[ctx.rank], device)
    syncer = WeightSyncer(policy_lm, sync_target, bucket_bytes=cfg.rollout.sync_bucket_mb << 20)
    return DistributedGenerator(placement, RelayedSyncer(syncer, remotes=remotes, server=server,
                                                         timeout_s=cfg.rollout.timeout_s + 300))


def _colocated_engine(cfg: Config, ctx: DistContext, model_path: str):
    """This rank's engine of the colocated placement: transformers in process (CPU), or vLLM's external
    launcher (GPU), whose tensor-parallel groups are consecutive trainer ranks."""
    options, dtype = _engine_options(cfg, ctx)
    try:
        if cfg.rollout.engine == "hf":
            from oreal.rollout.colocated import InProcessEngine

            return InProcessEngine(model_path, dtype=dtype, seed=cfg.train.seed, device=options["device"],
                                   request_timeout_s=cfg.rollout.timeout_s)
        from oreal.rollout.vllm_colocated import VllmColocatedEngine

        return VllmColocatedEngine(model_path, dtype=dtype, seed=cfg.train.seed, rank=ctx.rank,
                                   world_size=ctx.world_size, request_timeout_s=cfg.rollout.timeout_s, **options)
    except Exception as exc:  # noqa: BLE001 - one clear message naming the option
        raise SetupError(f"--rollout.placement colocated: the {cfg.rollout.engine} engine did not start in trainer "
                         f"rank {ctx.rank}: {type(exc).__name__}: {exc}") from exc


class Judge:
    """Rewards from the judger: `judge(texts, golds, questions) -> list[bool]`, with counters for the metrics.

    The rules run in the judger's pool of killable worker processes (hard per-answer timeout); the LLM
    verifier, when configured, is consulted on every finished response the rules reject (OREAL's policy).
    A recipe whose original judged with a verifier (`judge.verifier_expected`) warns once, loudly, when
    none is configured: its rewards will differ from the paper's.
    """

    def __init__(self, cfg: Config):
        from oreal import reward

        self._judge_batch = reward.judge_batch
        self.cfg = cfg.judge
        self.verifier = _build_verifier(cfg) if cfg.judge.verifier_hosts else None
        self.timeouts = 0
        if self.verifier is None and cfg.judge.verifier_expected:
            warn_missing_verifier()

    def __call__(self, texts: list[str], golds: list[str], questions: list[str] | None = None) -> list[bool]:
        if not texts:
            return []
        judgements = self._judge_batch(texts, golds, questions=questions, stop_word=self.cfg.stop_word or None,
                                       thinking_finish_words=tuple(self.cfg.thinking_finish_words),
                                       timeout=self.cfg.timeout_s, num_workers=judge_workers(self.cfg.num_workers),
                                       verifier=self.verifier, decimal_policy=self.cfg.decimal_policy)
        self.timeouts += sum(1 for j in judgements if j.reason == "timeout")
        return [bool(j.correct) for j in judgements]

    def counters(self) -> dict:
        out = {"judge/timeouts": float(self.timeouts)}
        if self.verifier is not None:
            out["judge/verifier_failures"] = float(self.verifier.metrics.failed)
            out["judge/verifier_overrules"] = float(self.verifier.metrics.equivalent)
        return out


_warned_missing_verifier = False


def warn_missing_verifier() -> None:
    """Once per process: this recipe's original consults an LLM verifier, and no verifier is configured."""
    global _warned_missing_verifier
    if _warned_missing_verifier or os.environ.get("RANK", "0") != "0":  # once, from the first rank
        return
    _warned_missing_verifier = True
    message = ("\n" + "!" * 100 + "\n"
               "WARNING: this recipe's original judges with an LLM verifier (every finished response the rules "
               "reject is sent to it),\nbut no verifier is configured: rewards, and so the training curve, will "
               "differ from the paper's.\nServe the verifier model (OpenAI-compatible) and pass --judge.verifier_hosts "
               f"HOST:PORT,... and --judge.verifier_model NAME\n(or set {VERIFIER_HOSTS_ENV}).\n" + "!" * 100)
    warnings.warn(message, RuntimeWarning, stacklevel=3)
    print(message, file=sys.stderr, flush=True)


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
