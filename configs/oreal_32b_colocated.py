"""OREAL-32B (configs/oreal_32b.py) with the rollouts colocated on the training GPUs.

The paper's cluster, 16 nodes of 8 GPUs: 128 trainer ranks (FSDP2 over all GPUs); blocks of 4 consecutive
ranks also form 32 vLLM engines of tensor-parallel size 4 (vLLM's external launcher, inside the trainer
processes; about 16 GB of bf16 weights a GPU), asleep while the policy trains, the new weights loaded in
process layer by layer after every update:

    torchrun --nnodes 16 --nproc_per_node 8 --rdzv-endpoint HOST:PORT -m oreal.train \
        --config configs/oreal_32b_colocated.py --output-dir runs/oreal_32b
"""

import dataclasses
from pathlib import Path

from oreal.runtime.config import Config, load_config_file

# While vLLM generates the trainer keeps about 9 GB a GPU resident (the 32B policy's and token RM's sharded
# weights, gradients and Adam states at 128 ranks, and the reference's shard): vLLM gets 70% of the GPU.
COLOCATED_ROLLOUT = dict(placement="colocated", num_engines=1, tensor_parallel_size=4, gpus="",
                         gpu_memory_utilization=0.7, sleep_level=2)


def config() -> Config:
    cfg = load_config_file(Path(__file__).with_name("oreal_32b.py"))
    cfg.rollout = dataclasses.replace(cfg.rollout, **COLOCATED_ROLLOUT)
    return cfg
