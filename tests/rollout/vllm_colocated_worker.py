"""torchrun worker for test_vllm_colocated.py: 2 FSDP2 ranks, each hosting its share of a colocated vLLM engine
(vLLM's external launcher, data_parallel_size 2), weights loaded in process layer by layer.

Each rank writes OUT_DIR/rank<r>.json: after each sync, its prompts' greedy samples and the trainer's own
greedy decoding of the same prompts with the same (synced) weights.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
)
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rollout_testlib import greedy_reference, tiny_config, tiny_model

from oreal.rollout.colocated import LayerwiseLoader
from oreal.rollout.generator import ColocatedEngines, DistributedGenerator
from oreal.rollout.types import SamplingParams
from oreal.rollout.vllm_colocated import VllmColocatedEngine


def main() -> None:
    on_gpu = torch.cuda.is_available()
    dist.init_process_group("nccl" if on_gpu else "gloo")
    rank = dist.get_rank()
    if on_gpu:
        torch.cuda.set_device(rank)
    device = torch.device("cuda", rank) if on_gpu else torch.device("cpu")
    out = Path(os.environ["OUT_DIR"])
    # head_dim 64: a size every vLLM attention backend takes; float32 on CPU (bf16 reaches AMX kernels).
    config = tiny_config(vocab_size=128, hidden_size=128, num_attention_heads=2, num_key_value_heads=1,
                         intermediate_size=256, max_position_embeddings=256)
    path = out / "tiny"
    if rank == 0:
        tiny_model(config, seed=7).save_pretrained(path, safe_serialization=True)  # the engine's start weights
    dist.barrier()
    model = tiny_model(config, seed=1234).to(device).train()  # the policy: other weights
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    engine = VllmColocatedEngine(str(path), dtype="float32", seed=0, rank=rank, world_size=2, tensor_parallel_size=1,
                                 gpu_memory_utilization=0.3 if on_gpu else 0.5, max_model_len=128,
                                 enable_prefix_caching=False)
    generator = DistributedGenerator(ColocatedEngines(engine, rank=rank, world_size=2, sleep_level=2),
                                     LayerwiseLoader(model, engine))

    def check(seed: int) -> dict:
        plain = tiny_model(config, seed=0)
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=False))
        plain.load_state_dict({k: v.cpu() for k, v in state.items()})
        prompts = [[10 + rank, 20 + i, 30 + seed] for i in range(2 + rank)]
        reference, _ = greedy_reference(plain, prompts, max_new_tokens=5)
        out_ = generator.generate(prompts, 2, SamplingParams(temperature=0, max_new_tokens=5))
        return {"samples": [[r.token_ids[:5] for r in g] for g in out_], "reference": reference,
                "versions": sorted({r.weights_version for g in out_ for r in g}), "asleep": engine.asleep}

    report = {"version1": generator.syncer.sync(), "gen1": check(1)}
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(rank)).to(device)
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    report["version2"] = generator.syncer.sync()
    report["gen2"] = check(2)
    (out / f"rank{rank}.json").write_text(json.dumps(report))
    dist.barrier()
    os._exit(0)  # vLLM's threads can hold the interpreter


if __name__ == "__main__":
    main()
