"""SFT of a 7B base model into the initial policy of `configs/oreal_7b.py` (`oreal-sft`, FSDP2, 8 GPUs).

    torchrun --nproc_per_node 8 -m oreal.algorithms.sft --config configs/sft_7b.py \
        --model.init_path /models/Qwen2.5-7B --data.train_file /data/sft.jsonl --output-dir runs/sft_7b

The data: chat JSONL (`messages`, or OREAL's `message_data`, ending in the assistant's worked solution)
or prompt/response pairs, e.g. best-of-N correct samples of a stronger model, as OREAL's SFT stage
uses; the loss is on the responses only. Bare prompts are rendered exactly as `configs/oreal_7b.py`
renders its RL prompts (chat template, OREAL's system prompt), so SFT and RL see one format; chat
records are rendered verbatim. Responses end with `<|im_end|>`, the token RL stops on.

The paper does not publish its SFT hyper-parameters; these are common values for 7B math SFT
(lr 2e-5 with 3% warm-up then cosine to 2e-6, 128 sequences per step, packed to 32k tokens per GPU,
sequences up to 16k tokens, bf16 compute on fp32 master weights, activation checkpointing). Set
`--steps` to about epochs x examples / 128 for your data.
"""

import importlib.util
from pathlib import Path

from oreal.algorithms.sft import SFTConfig, SFTDataConfig, SFTModelConfig, SFTTrainConfig
from oreal.runtime.config import CheckpointConfig, LogConfig, OptimConfig

_spec = importlib.util.spec_from_file_location("_oreal_7b_for_sft", Path(__file__).with_name("oreal_7b.py"))
_rl = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_rl)


def sft_config() -> SFTConfig:
    return SFTConfig(
        output_dir="outputs/sft_7b",
        model=SFTModelConfig(init_path="models/Qwen2.5-7B", param_dtype="bfloat16", gradient_checkpointing=True,
                             attn_backend="auto"),
        data=SFTDataConfig(train_file="data/sft.jsonl", template="chat", system_prompt=_rl.OREAL_SYSTEM_PROMPT,
                           instruction="", max_sequence_tokens=16384, end_token=_rl.STOP_WORD),
        optim=OptimConfig(lr=2e-5, min_lr=2e-6, warmup_steps=0, warmup_ratio=0.03, weight_decay=0.0, grad_clip=1.0),
        train=SFTTrainConfig(steps=1000, sequences_per_step=128, micro_batch_tokens=32768, loss_backend="auto",
                             seed=0, log_interval=1),
        checkpoint=CheckpointConfig(interval=200, keep_last=2, export_hf=True),
        log=LogConfig(tensorboard=True, progress_bar=True),
    )
