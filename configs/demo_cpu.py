"""The CPU demo (`oreal-demo`): SFT then OREAL RL on synthetic arithmetic word problems, on 2 cores.

One file holds every setting of the demo:

- `task()`: the synthetic data (`oreal.data.synthetic`): sizes and difficulty of the SFT problems,
  the RL prompts and the held-out set;
- `sft_config()`: the tokenizer, the tiny Qwen2 and its supervised fine-tuning (`python -m oreal.sft`);
- `config()`: the OREAL RL run (`python -m oreal.train`), whose `data`, `eval` and `judge` sections
  also decide how the demo scores held-out pass@1;
- `grpo_options()`: the command-line options that turn `config()` into the GRPO recipe at the same
  budget, or None while the trainer has no GRPO.

`oreal-demo` fills in the paths (data files, the SFT model, output directories) and the seed. To
rerun one stage by hand after a demo has run in outputs/demo:

    torchrun --nproc_per_node 2 -m oreal.sft --config configs/demo_cpu.py
    torchrun --nproc_per_node 2 -m oreal.train --config configs/demo_cpu.py

Why these numbers: sequences are short (prompts ~40 tokens, solutions ~10-30), so a 0.7M-parameter
model trains and samples in milliseconds per step; SFT is stopped early on purpose (the model has
the format and most of the arithmetic but slips, at temperature 1, on a good share of problems), so
RL has room to improve; prompts have 1-3 operations, which gives every RL step plenty of prompts
with both right and wrong samples, the only ones OREAL learns from.
"""

from oreal.config import (CheckpointConfig, Config, DataConfig, EvalConfig, JudgeConfig, LogConfig, LossConfig,
                          ModelConfig, OptimConfig, RolloutConfig, TrainConfig)
from oreal.data.synthetic import Difficulty, SyntheticTask
from oreal.sft import SFTConfig, SFTDataConfig, SFTModelConfig, SFTTrainConfig

OUTPUT = "outputs/demo"
STOP_WORD = "<|im_end|>"  # the ChatML end of turn: the tokenizer's eos, where generation stops
TEMPLATE = "chat"  # ChatML, the template the in-process tokenizer ships with
INSTRUCTION = ""  # the SFT data teaches the format; no instruction keeps prompts short
MAX_NEW_TOKENS = 48  # the longest worked solution is about 30 tokens


def task() -> SyntheticTask:
    difficulty = Difficulty(min_steps=1, max_steps=3, max_start=20, max_operand=9, max_factor=3, max_value=50)
    return SyntheticTask(train_size=4000, rl_size=2000, heldout_size=200, sft=difficulty, rl=difficulty)


def sft_config() -> SFTConfig:
    return SFTConfig(
        output_dir=f"{OUTPUT}/sft",
        model=SFTModelConfig(vocab_size=512, hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2,
                             intermediate_size=256, attn_backend="sdpa"),
        data=SFTDataConfig(train_file=f"{OUTPUT}/data/train.jsonl", template=TEMPLATE, instruction=INSTRUCTION),
        optim=OptimConfig(lr=3e-3, min_lr=3e-4, warmup_steps=10, weight_decay=0.0, grad_clip=1.0),
        train=SFTTrainConfig(steps=450, sequences_per_step=64, micro_batch_tokens=512, loss_backend="auto", seed=0,
                             log_interval=20),
    )


def config() -> Config:
    return Config(
        output_dir=f"{OUTPUT}/oreal",
        model=ModelConfig(path=f"{OUTPUT}/sft/hf", param_dtype="float32", attn_backend="sdpa"),
        data=DataConfig(train_files=[f"{OUTPUT}/data/rl.jsonl"], format="math", prompts_per_step=16,
                        samples_per_prompt=8, template=TEMPLATE, system_prompt="", instruction=INSTRUCTION,
                        max_prompt_tokens=96),
        rollout=RolloutConfig(engine="hf", temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=MAX_NEW_TOKENS,
                              max_total_tokens=160, stop_words=[STOP_WORD], engine_threads=1, timeout_s=600.0,
                              sync_bucket_mb=16),
        judge=JudgeConfig(stop_word=STOP_WORD, timeout_s=2.0, num_workers=1),
        loss=LossConfig(kl_coef=0.01, pos_coef=1.0, neg_coef=0.5, filter_groups=True, use_token_rm=True),
        policy_optim=OptimConfig(lr=3e-4, min_lr=3e-5, warmup_steps=2, weight_decay=0.0, grad_clip=1.0),
        rm_optim=OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=2, weight_decay=0.0, grad_clip=1.0),
        train=TrainConfig(steps=40, freeze_policy_steps=2, micro_batch_tokens=512, seed=0, device="cpu"),
        checkpoint=CheckpointConfig(interval=0, keep_last=1, export_hf=True),
        eval=EvalConfig(files=[f"{OUTPUT}/data/heldout.jsonl"], interval=10, at_start=False, samples=4,
                        max_problems=0, temperature=1.0, top_p=1.0, max_new_tokens=MAX_NEW_TOKENS),
        log=LogConfig(tensorboard=False, progress_bar=False),
    )


def grpo_options():
    """Options that make `config()` the GRPO recipe at the same budget; None: the trainer has no GRPO yet."""
    return None
