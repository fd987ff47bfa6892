"""OREAL-32B: the 7B recipe (configs/oreal_7b.py) unchanged, from OREAL-32B-SFT.

The paper trains both sizes with the same numbers (K=16, 64 prompts per step, lr 5e-7 -> 1e-7 and
2e-6 -> 4e-7 cosine, 10 warm-up and 10 frozen-policy steps, KL 0.01, factors 1.0 / 0.5, top-p 0.9,
16k tokens, 90 steps); only the model differs, and the cluster: the paper's 16 nodes of 8 GPUs. Rollouts
on dedicated GPUs: on every node GPUs 0-3 hold 4 trainer ranks (64 FSDP2 ranks in all) and GPUs 4-7 one
vLLM engine of tensor-parallel size 4 (about 16 GB of bf16 weights a GPU), started and fed by the node's
local rank 0 (16 data-parallel engines in all):

    torchrun --nnodes 16 --nproc_per_node 4 --rdzv-endpoint HOST:PORT -m oreal.train --config configs/oreal_32b.py

`configs/oreal_32b_colocated.py` is the other placement (128 ranks, 32 engines of TP 4 made of trainer ranks).
"""

import dataclasses
from pathlib import Path

from oreal.runtime.config import Config, load_config_file


# 16 nodes x 8 GPUs, torchrun --nproc_per_node 4: one TP-4 engine on GPUs 4-7 of every node.
DEDICATED_ROLLOUT = dict(placement="dedicated", num_engines=16, tensor_parallel_size=4, gpus="4,5,6,7",
                         gpu_memory_utilization=0.85)


def config() -> Config:
    cfg = load_config_file(Path(__file__).with_name("oreal_7b.py"))
    cfg.output_dir = "outputs/oreal_32b"
    cfg.model = dataclasses.replace(cfg.model, path="models/OREAL-32B-SFT")
    cfg.rollout = dataclasses.replace(cfg.rollout, **DEDICATED_ROLLOUT)
    return cfg
