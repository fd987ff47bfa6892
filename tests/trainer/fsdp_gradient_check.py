"""Run by test_fsdp_gradient.py under `torchrun --nproc_per_node 2`: the trainer's distributed gradient is the
gradient of the one global OREAL loss; generation requests reach rank 0's engine and come back to their rank.

Each rank keeps different samples; `Trainer.pack` balances all of them over the ranks and all-reduces
the token counts, `Trainer.policy_loss` runs the fused loss on the FSDP2 policy and scales each backward
by the world size. The gathered gradient must equal the gradient of `fused_oreal_loss` over every
sample at once, computed by rank 0 on an unsharded copy of the same model.
"""

import json
import sys
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist

from oreal import fused_oreal_loss
from oreal.runtime.config import Config
from oreal.data import TrainingSample, pack_rollouts
from oreal.runtime.distributed import init_distributed, shard
from oreal.model import forward_hidden, load_causal_lm
from oreal.model.tiny import tiny_qwen2_config
from oreal.algorithms.policy import LossCoefficients, PolicyWithLoss
from oreal.algorithms.oreal import Trainer


class EchoEngine:
    """Stands in for the engine on rank 0: sample j of a prompt is [prompt..., j], or it fails when told to."""

    def __init__(self):
        self.calls, self.fail = 0, False

    def generate(self, prompts, n, sampling):
        self.calls += 1
        if self.fail:
            raise RuntimeError("engine process died (exit code 17)")
        return [SimpleNamespace(token_ids=list(p) + [j]) for p in prompts for j in range(n)]


def check_generation_routing(ctx, group) -> dict:
    from oreal.rollout.generator import DedicatedEngines, DistributedGenerator, GenerationError
    from oreal.rollout.placement import dedicated_layout

    engine = EchoEngine() if ctx.rank == 0 else None
    layout = dedicated_layout(1, ctx.world_size, ctx.world_size)
    placement = DedicatedEngines({0: engine} if engine is not None else {}, layout, rank=ctx.rank,
                                 world_size=ctx.world_size, group=group)
    generator = DistributedGenerator(placement, None)
    prompts = [[100 * ctx.rank + i, 7] for i in range(2 + ctx.rank)]  # ranks ask for different counts
    def ids(out):
        return [[s.token_ids for s in group] for group in out]

    routed = ids(generator.generate(prompts, 3, sampling=None)) == [[p + [j] for j in range(3)] for p in prompts]
    empty = ids(generator.generate([] if ctx.rank == 0 else [[5]], 2, sampling=None))
    routed_empty = empty == ([] if ctx.rank == 0 else [[[5, 0], [5, 1]]])
    if engine is not None:
        engine.fail = True
    try:
        generator.generate(prompts, 2, sampling=None)
        failure = ""
    except GenerationError as exc:
        failure = str(exc)
    return {"routed": routed and routed_empty, "failure": failure,
            "engine_calls": engine.calls if engine is not None else None}


def main(out_path: str) -> None:
    ctx = init_distributed("cpu")
    config = tiny_qwen2_config(40, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64)
    torch.manual_seed(0)
    reference_lm = load_causal_lm(config, dtype=torch.float32, attn_backend="sdpa", liger=False)
    torch.manual_seed(0)
    lm = load_causal_lm(config, dtype=torch.float32, attn_backend="sdpa", liger=False)
    coefficients = LossCoefficients(kl_coef=0.0, pos_coef=1.0, neg_coef=0.5, backend="torch")
    policy = shard(PolicyWithLoss(lm, coefficients), ctx, param_dtype=None)

    # Different samples on each rank, unevenly many (rank 1 keeps more).
    seed = int(sys.argv[2])
    rng = np.random.default_rng([seed, ctx.rank])
    local = [TrainingSample(prompt_ids=rng.integers(1, 40, rng.integers(2, 6)),
                     response_ids=rng.integers(1, 40, rng.integers(4, 12)),
                     advantage=float(rng.normal()), is_positive=bool(rng.integers(2)))
             for _ in range(3 + 4 * ctx.rank)]
    cfg = Config()
    cfg.train.micro_batch_tokens = 20  # >= 60 tokens over 2 ranks: several micro-batches per rank (accumulation)
    cfg.loss.kl_coef, cfg.loss.pos_coef, cfg.loss.neg_coef = 0.0, 1.0, 0.5
    parts = SimpleNamespace(ctx=ctx, policy=policy, reference=None, object_group=dist.new_group(backend="gloo"),
                            tokenizer=SimpleNamespace(pad_token_id=0))
    trainer = Trainer(cfg, parts, checkpoints=None)  # no checkpoints are written here
    batches, (pos, neg, _) = trainer.pack(local)
    for b in batches:
        b.rm_scores = torch.randn(b.num_tokens, generator=torch.Generator().manual_seed(b.num_tokens))
    stats = trainer.policy_loss(batches, pos, neg, train=True)
    routing = check_generation_routing(ctx, parts.object_group)
    routing_all = [None] * ctx.world_size
    dist.all_gather_object(routing_all, routing)
    grads = {name: p.grad.full_tensor() for name, p in policy.lm.named_parameters()}

    everyone = [None] * ctx.world_size
    dist.all_gather_object(everyone, [(b, b.rm_scores) for b in batches])
    if ctx.rank == 0:
        # One packed batch of all samples, same token-RM scores, plain (unsharded) model.
        pieces = [pair for part in everyone for pair in part if not pair[0].is_padding]
        samples, scores = [], []
        for batch, rm in pieces:
            for i, (seq, prompt_len) in enumerate(zip(batch.unpack(batch.input_ids[0]), batch.prompt_lens)):
                samples.append(TrainingSample(prompt_ids=seq[:prompt_len], response_ids=seq[prompt_len:],
                                       advantage=float(batch.advantages[i]), is_positive=bool(batch.is_positive[i])))
                scores.append(batch.unpack_actions(rm)[i])
        for s, sc in zip(samples, scores):
            s.rm_scores = sc.numpy()
        (whole,), _ = pack_rollouts(samples, max_tokens=10_000)
        hidden = forward_hidden(reference_lm, whole)
        out = fused_oreal_loss(hidden, reference_lm.lm_head.weight, whole.labels, whole.cu_seqlens, whole.advantages,
                               whole.is_positive, whole.rm_scores, kl_coef=0.0, pos_coef=1.0, neg_coef=0.5,
                               backend="torch")
        out.loss.backward()
        # Error relative to each tensor's gradient scale (floored at 1e-3 of the largest, for tensors whose
        # gradient is ~0 and whose error is all rounding).
        scale = max(float(p.grad.abs().max()) for p in reference_lm.parameters())
        worst = max(float((grads[n] - p.grad).abs().max()) / max(float(p.grad.abs().max()), 1e-3 * scale)
                    for n, p in reference_lm.named_parameters())
        pos_ref, neg_ref = (float(t) for t in whole.action_token_counts())
        with open(out_path, "w") as handle:
            json.dump({"loss": stats["loss/total"], "reference_loss": float(out.loss), "worst_relative": worst,
                       "pos": float(pos), "neg": float(neg), "pos_ref": pos_ref, "neg_ref": neg_ref,
                       "micro_batches": len(batches), "sequences": len(samples), "routing": routing_all}, handle)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
