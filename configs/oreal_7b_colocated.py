"""OREAL-7B (configs/oreal_7b.py) with the rollouts colocated on the training GPUs.

The paper's cluster, 4 nodes of 8 GPUs: 32 trainer ranks (FSDP2 over all GPUs); pairs of consecutive ranks
also form 16 vLLM engines of tensor-parallel size 2 (vLLM's external launcher, inside the trainer processes),
each sampling its two ranks' prompts, asleep while the policy trains (level 2: weights discarded, KV cache
freed), the new weights loaded in process layer by layer after every update (no broadcast):

    torchrun --nnodes 4 --nproc_per_node 8 --rdzv-endpoint HOST:PORT -m oreal.train \
        --config configs/oreal_7b_colocated.py --output-dir runs/oreal_7b
"""

import dataclasses
from pathlib import Path

from oreal.runtime.config import Config, load_config_file

# vLLM may take 70% of a GPU while it generates: what the trainer keeps resident meanwhile (the sharded
# weights, gradients and Adam states of the policy and token RM, the reference's shard) is about 8 GB a GPU
# at 32 ranks.
COLOCATED_ROLLOUT = dict(placement="colocated", num_engines=1, tensor_parallel_size=2, gpus="",
                         gpu_memory_utilization=0.7, sleep_level=2)


def config() -> Config:
    cfg = load_config_file(Path(__file__).with_name("oreal_7b.py"))
    cfg.rollout = dataclasses.replace(cfg.rollout, **COLOCATED_ROLLOUT)
    return cfg
