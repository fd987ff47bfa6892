"""The CPU demo (`oreal-demo`): SFT then OREAL RL on synthetic arithmetic word problems, on 2 cores.

One file holds every setting of the demo:

- `task()`: the synthetic data (`oreal.demo.task`): sizes and difficulty of the SFT problems,
  the RL prompts and the held-out set;
- `sft_config()`: the tokenizer, the tiny Qwen2 and its supervised fine-tuning (`python -m oreal.algorithms.sft`);
- `config()`: the OREAL RL run (`python -m oreal.train`), whose `data`, `eval` and `judge` sections
  also decide how the demo scores held-out pass@1;
- `grpo_options()`: the command-line options that turn `config()` into the GRPO recipe at the same
  budget (None skips GRPO).

`oreal-demo` fills in the paths (data files, the SFT model, output directories) and the seed. To
rerun one stage by hand after a demo has run in outputs/demo:

    torchrun --nproc_per_node 2 -m oreal.algorithms.sft --config configs/demo_cpu.py
    torchrun --nproc_per_node 2 -m oreal.train --config configs/demo_cpu.py

Why these numbers: sequences are short (prompts ~40 tokens, solutions ~10-30), so a 0.7M-parameter
model trains and samples in milliseconds per step. Half the SFT solutions are bare answers
(`sft_direct_rate=0.5`, as in datasets that mix worked solutions with answer-only ones), so the SFT
model answers about half the problems without working them out, and those answers are mostly wrong
(20-25% against ~80% for its worked solutions, greedy). The outcome reward alone has to teach it
that writing the chain pays: RL lifts held-out pass@1 by that switch (response length grows from
~11 to ~18 tokens, bare answers fall from 54-63% to 0%); accuracy inside worked solutions stays
about where SFT left it (benchmarks/results/demo_cpu/README.md). At a
0.7 share the SFT model's worked solutions are too weak for the switch to pay; at 0.5 it does on
every seed we ran. Prompts have 1-3 operations, which gives every RL step plenty of prompts with
both right and wrong samples, the only ones OREAL learns from.

Held-out pass@1 is greedy (one deterministic answer per problem, no sampling noise in the
comparison); the demo also reports it sampled at the rollout temperature (1.0, 4 samples).
"""

from oreal.runtime.config import (CheckpointConfig, Config, DataConfig, EvalConfig, JudgeConfig, LogConfig, LossConfig,
                          ModelConfig, OptimConfig, RolloutConfig, TrainConfig)
from oreal.demo.task import Difficulty, SyntheticTask
from oreal.algorithms.sft import SFTConfig, SFTDataConfig, SFTModelConfig, SFTTrainConfig

OUTPUT = "outputs/demo"
STOP_WORD = "<|im_end|>"  # the ChatML end of turn: the tokenizer's eos, where generation stops
TEMPLATE = "chat"  # ChatML, the template the in-process tokenizer ships with
INSTRUCTION = ""  # the SFT data teaches the format; no instruction keeps prompts short
MAX_NEW_TOKENS = 48  # the longest worked solution is about 30 tokens


def task() -> SyntheticTask:
    difficulty = Difficulty(min_steps=1, max_steps=3, max_start=15, max_operand=6, max_factor=3, max_value=30)
    return SyntheticTask(train_size=4000, rl_size=2000, heldout_size=200, sft=difficulty, rl=difficulty,
                         sft_direct_rate=0.5)


def sft_config() -> SFTConfig:
    return SFTConfig(
        output_dir=f"{OUTPUT}/sft",
        model=SFTModelConfig(vocab_size=512, hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2,
                             intermediate_size=256, attn_backend="sdpa"),
        data=SFTDataConfig(train_file=f"{OUTPUT}/data/train.jsonl", template=TEMPLATE, instruction=INSTRUCTION),
        optim=OptimConfig(lr=3e-3, min_lr=3e-4, warmup_steps=10, weight_decay=0.0, grad_clip=1.0),
        train=SFTTrainConfig(steps=800, sequences_per_step=64, micro_batch_tokens=512, loss_backend="auto", seed=0,
                             log_interval=20),
        checkpoint=CheckpointConfig(interval=0, keep_last=1, export_hf=True),  # one checkpoint, at the end
        log=LogConfig(tensorboard=False, progress_bar=False),
    )


def config() -> Config:
    return Config(
        output_dir=f"{OUTPUT}/oreal",
        model=ModelConfig(path=f"{OUTPUT}/sft/hf", param_dtype="float32", attn_backend="sdpa"),
        data=DataConfig(train_files=[f"{OUTPUT}/data/rl.jsonl"], format="math", prompts_per_step=16,
                        samples_per_prompt=8, template=TEMPLATE, system_prompt="", instruction=INSTRUCTION,
                        max_prompt_tokens=96),
        rollout=RolloutConfig(engine="hf", temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=MAX_NEW_TOKENS,
                              max_total_tokens=160, stop_words=[STOP_WORD], timeout_s=600.0,
                              sync_bucket_mb=16),
        judge=JudgeConfig(stop_word=STOP_WORD, timeout_s=2.0),
        loss=LossConfig(kl_coef=0.01, pos_coef=1.0, neg_coef=0.5, filter_groups=True, use_token_rm=True),
        policy_optim=OptimConfig(lr=1e-4, min_lr=1e-5, warmup_steps=5, weight_decay=0.0, grad_clip=1.0),
        rm_optim=OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=2, weight_decay=0.0, grad_clip=1.0),
        train=TrainConfig(steps=100, freeze_policy_steps=3, seed=0, device="cpu"),
        checkpoint=CheckpointConfig(interval=0, keep_last=1, export_hf=True),
        # greedy held-out pass@1 (the demo also reports it sampled at the rollout temperature)
        eval=EvalConfig(files=[f"{OUTPUT}/data/heldout.jsonl"], interval=20, at_start=False, samples=1,
                        max_problems=0, temperature=0.0, top_p=1.0, max_new_tokens=MAX_NEW_TOKENS),
        log=LogConfig(tensorboard=False, progress_bar=False),
    )


def grpo_options() -> list[str] | None:
    """Command-line options that turn `config()` into RLinf's GRPO recipe at the same budget.

    Same SFT model, prompts, samples per prompt, steps, learning rate, engine and evaluation; the
    update is GRPO's: rewards +5 / -5, advantages normalised over the 8 samples of each prompt,
    every sample trained on, DAPO's token-level clipped surrogate (clip 0.2) over 2 minibatches,
    RLinf's minibatch early-stop at an importance ratio of 5, no KL. There is no token RM to warm
    up, so the policy trains from the first step. (None would skip GRPO in the demo.)
    """
    return ["--algorithm", "grpo", "--train.freeze_policy_steps", "0",
            "--ppo.epochs", "1", "--ppo.minibatches", "2", "--ppo.clip_low", "0.2", "--ppo.clip_high", "0.2",
            "--ppo.loss_agg", "token", "--ppo.kl_coef", "0.0", "--ppo.early_stop_ratio", "5.0",
            "--ppo.early_stop_statistic", "mean", "--ppo.reward_correct", "5.0", "--ppo.reward_wrong", "-5.0"]
