"""OREAL-32B: the 7B recipe (configs/oreal_7b.py) unchanged, from OREAL-32B-SFT.

The paper trains both sizes with the same numbers (K=16, 64 prompts per step, lr 5e-7 -> 1e-7 and
2e-6 -> 4e-7 cosine, 10 warm-up and 10 frozen-policy steps, KL 0.01, factors 1.0 / 0.5, top-p 0.9,
16k tokens, 90 steps); only the model differs. Trainer rank 0 starts the vLLM engine (tensor
parallel over 4 GPUs, about 16 GB of bf16 weights on each) on GPUs 4-7 of its node, so run 4
trainer ranks per node, on as many nodes as the 32B policy, its reference and its token RM need:

    torchrun --nnodes 4 --nproc_per_node 4 --rdzv-endpoint HOST:PORT -m oreal.train --config configs/oreal_32b.py
"""

import dataclasses
from pathlib import Path

from oreal.runtime.config import Config, load_config_file


def config() -> Config:
    cfg = load_config_file(Path(__file__).with_name("oreal_7b.py"))
    cfg.output_dir = "outputs/oreal_32b"
    cfg.model = dataclasses.replace(cfg.model, path="models/OREAL-32B-SFT")
    return cfg
