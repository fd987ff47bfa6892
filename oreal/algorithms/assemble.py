"""Assembles a run: the runtime's parts (`oreal.runtime.build`) plus the algorithm's FSDP2 models.

The composition root of a training run. The runtime builds what every algorithm needs (tokenizer,
dataset, optimizers, the rollout engine, the judge); the models whose forward ends in an algorithm's
loss (OREAL's policy with the fused loss, the reference, the token RM; the clipped-surrogate policy and
PPO's critic) are algorithm pieces, so they are put together here and the runtime never imports an
algorithm. Order matters for the failures a user can cause (see `build`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from oreal.runtime.build import (EngineLauncher, Judge, _load_lm, build_dataset, build_eval_sets, build_generator,
                                 build_optimizer, check_files, critic_path, load_tokenizer, model_paths, param_dtype,
                                 stop_token_ids)
from oreal.runtime.config import Config, needs_reference
from oreal.runtime.distributed import DistContext, shard


def policy_temperature(cfg: Config) -> float:
    """The softmax temperature of the trained log-probs: OREAL's loss uses the plain model (1.0); the clipped
    recipes use `ppo.loss_temperature`, by default (0) the sampling temperature, as RLinf and verl do, so that
    the ratio's old log-probs describe the distribution the samples were drawn from; SimpleRL-Zero's OpenRLHF
    reads raw logits (1.0) while sampling at 0.6."""
    if cfg.algorithm == "oreal":
        return 1.0
    return cfg.ppo.loss_temperature or cfg.rollout.temperature


def schedule_ticks(cfg: Config, optim_cfg, *, frozen_steps: int = 0) -> int:
    """How often a schedule advances over the run: once per training step (less `frozen_steps`), or once per
    optimizer update (`schedule_unit` "update": epochs x minibatches per step of the clipped recipes)."""
    steps = cfg.train.steps - frozen_steps
    if optim_cfg.schedule_unit == "update" and cfg.algorithm != "oreal":
        steps *= cfg.ppo.epochs * cfg.ppo.minibatches
    return max(1, steps)


def policy_schedule_ticks(cfg: Config) -> int:
    """OREAL runs the policy's schedule through its frozen steps (`train.schedule_frozen_steps`); otherwise,
    and for a per-update schedule, it starts at the first policy update."""
    counts_frozen = cfg.train.schedule_frozen_steps and cfg.policy_optim.schedule_unit == "step"
    return schedule_ticks(cfg, cfg.policy_optim, frozen_steps=0 if counts_frozen else cfg.train.freeze_policy_steps)


def _policy_root(cfg: Config, lm: torch.nn.Module) -> torch.nn.Module:
    if cfg.algorithm == "oreal":
        from oreal.algorithms.policy import LossCoefficients, PolicyWithLoss

        return PolicyWithLoss(lm, LossCoefficients(kl_coef=cfg.loss.kl_coef, pos_coef=cfg.loss.pos_coef,
                                                   neg_coef=cfg.loss.neg_coef, backend=cfg.loss.backend,
                                                   importance_cap=cfg.loss.importance_cap))
    from oreal.algorithms.clipped_models import ClippedSurrogatePolicy, ClipSettings

    p = cfg.ppo
    return ClippedSurrogatePolicy(lm, ClipSettings(clip_low=p.clip_low, clip_high=p.clip_high, kl_coef=p.kl_coef,
                                                   loss_agg=p.loss_agg, temperature=policy_temperature(cfg),
                                                   backend=cfg.loss.backend))


def build_models(cfg: Config, ctx: DistContext, paths: tuple[str, str, str]):
    """(policy, reference or None, token RM or None), each FSDP2-sharded over the ranks."""
    from oreal.algorithms.policy import ReferencePolicy
    from oreal.algorithms.token_rm import TokenRewardModel

    dtype = param_dtype(cfg, ctx)
    policy_path, reference_path, rm_path = paths
    lm = _load_lm(cfg, policy_path, torch.float32, ctx)  # fp32 master weights; compute in `dtype`
    if cfg.model.gradient_checkpointing:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    policy = shard(_policy_root(cfg, lm), ctx, param_dtype=dtype)
    reference = None
    if needs_reference(cfg):
        ref_lm = _load_lm(cfg, reference_path, dtype, ctx)  # frozen: held in the compute dtype
        reference = shard(ReferencePolicy(ref_lm, backend=cfg.loss.backend, temperature=policy_temperature(cfg)),
                          ctx, param_dtype=None)
    token_rm = None
    if cfg.algorithm == "oreal" and cfg.loss.use_token_rm:
        rm_lm = _load_lm(cfg, rm_path, torch.float32, ctx)
        if cfg.model.gradient_checkpointing:
            rm_lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        token_rm = shard(TokenRewardModel(rm_lm, reads=cfg.loss.token_rm_reads, head_init=cfg.loss.token_rm_head_init,
                                          seed=cfg.train.seed), ctx, param_dtype=dtype)
    return policy, reference, token_rm


def build_critic(cfg: Config, ctx: DistContext, path: str) -> torch.nn.Module:
    """PPO's critic (FSDP2): the model at `path` with its lm_head replaced by a zero-initialised value head."""
    from oreal.algorithms.clipped_models import ValueModel

    lm = _load_lm(cfg, path, torch.float32, ctx)
    if cfg.model.gradient_checkpointing:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    critic = ValueModel(lm, head_init=cfg.critic.value_head_init, seed=cfg.train.seed)
    return shard(critic, ctx, param_dtype=param_dtype(cfg, ctx))


@dataclass
class Components:
    ctx: DistContext
    tokenizer: Any
    hf_config: Any
    dataset: Any
    sampler: Any
    policy: torch.nn.Module
    reference: torch.nn.Module | None
    token_rm: torch.nn.Module | None
    policy_optim: torch.optim.Optimizer
    policy_sched: Any
    rm_optim: torch.optim.Optimizer | None
    rm_sched: Any
    generator: Any
    judge: Callable[[list[str], list[str]], list[bool]]
    eval_sets: list
    stop_token_ids: tuple[int, ...]
    object_group: Any
    critic: torch.nn.Module | None = None  # PPO only
    critic_optim: torch.optim.Optimizer | None = None
    critic_sched: Any = None

    def close(self) -> None:
        if self.generator is not None:
            self.generator.close()


def build(cfg: Config, ctx: DistContext) -> Components:
    object_group = dist.new_group(backend="gloo")  # Python objects travel over gloo whatever the device
    check_files(cfg)
    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    paths = model_paths(cfg, ctx, object_group)  # fails fast on a missing model path
    critic_dir = critic_path(cfg, paths[0]) if cfg.algorithm == "ppo" else None  # and on a missing critic path
    tokenizer = load_tokenizer(paths[0])
    dataset, sampler = build_dataset(cfg, tokenizer, ctx)  # fails fast on missing / empty prompt files
    judge = Judge(cfg)  # fails fast on an unreachable verifier
    eval_sets = build_eval_sets(cfg, tokenizer, ctx)
    stops = stop_token_ids(cfg, tokenizer)
    launcher = EngineLauncher(cfg, ctx, paths[0])  # the engine loads while the trainer's models load
    try:
        policy, reference, token_rm = build_models(cfg, ctx, paths)
        policy_optim, policy_sched = build_optimizer(policy, cfg.policy_optim, ctx,
                                                     total_updates=policy_schedule_ticks(cfg))
        rm_optim = rm_sched = None
        if token_rm is not None:
            rm_optim, rm_sched = build_optimizer(token_rm, cfg.rm_optim, ctx,
                                                 total_updates=schedule_ticks(cfg, cfg.rm_optim))
        critic = critic_optim = critic_sched = None
        if cfg.algorithm == "ppo":
            critic = build_critic(cfg, ctx, critic_dir)
            critic_optim, critic_sched = build_optimizer(critic, cfg.critic_optim, ctx,
                                                         total_updates=schedule_ticks(cfg, cfg.critic_optim))
        generator = build_generator(cfg, ctx, policy.lm, launcher.result(object_group), launcher, paths[0])
        # submit/collect for rollout.max_staleness 1, and the policy version stamped on every rollout
        from oreal.rollout.overlap import OverlappedGenerator

        generator = OverlappedGenerator(generator, max_staleness=cfg.rollout.max_staleness)
    except BaseException:
        launcher.abandon()
        raise
    from transformers import AutoConfig

    hf_config = AutoConfig.from_pretrained(paths[0], local_files_only=True)
    if ctx.is_main:
        (Path(cfg.output_dir) / "config.json").write_text(json.dumps(_plain(cfg), indent=2, default=str))
    return Components(ctx=ctx, tokenizer=tokenizer, hf_config=hf_config, dataset=dataset, sampler=sampler,
                      policy=policy, reference=reference, token_rm=token_rm, policy_optim=policy_optim,
                      policy_sched=policy_sched, rm_optim=rm_optim, rm_sched=rm_sched, generator=generator,
                      judge=judge, eval_sets=eval_sets, stop_token_ids=stops, object_group=object_group,
                      critic=critic, critic_optim=critic_optim, critic_sched=critic_sched)


def _plain(cfg: Config) -> dict:
    import dataclasses

    return dataclasses.asdict(cfg)
