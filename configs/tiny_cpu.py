"""A tiny OREAL run for a machine without a GPU (and for the trainer's end-to-end tests).

Everything is built offline: a random Qwen2 of ~50k parameters and a byte-level BPE tokenizer
trained in-process on the prompts (written once to `<output_dir>/tiny_model`), the transformers
rollout engine in its own process, gloo between the trainer ranks. The prompts are one-digit
arithmetic (configs/data/): a random model answers them right now and then by chance (the
judge reads the last number of a response), so each step has prompts with both right and wrong
samples, and the whole OREAL step runs: rollout, judge, RLOO, filter, token RM, fused loss,
optimizer, weight sync, checkpoint, evaluation.

    torchrun --nproc_per_node 2 -m oreal.train --config configs/tiny_cpu.py --output-dir /tmp/oreal_tiny
"""

from pathlib import Path

from oreal.runtime.config import (CheckpointConfig, Config, DataConfig, EvalConfig, JudgeConfig, LogConfig, LossConfig,
                          ModelConfig, OptimConfig, RolloutConfig, TinyModelConfig, TrainConfig)

DATA = Path(__file__).resolve().parent / "data"


def config() -> Config:
    return Config(
        output_dir="outputs/tiny_cpu",
        # head_dim 32 (64 / 2 heads, one KV head): the smallest head size vLLM's CPU attention runs (--rollout.engine vllm)
        model=ModelConfig(tiny=TinyModelConfig(enabled=True, tokenizer="word", hidden_size=64, num_layers=2, num_heads=2,
                                               num_kv_heads=1, intermediate_size=64, vocab_size=512, seed=0),
                          attn_backend="sdpa", param_dtype="float32"),
        data=DataConfig(train_files=[str(DATA / "tiny_arith_train.jsonl")], format="math", prompts_per_step=8,
                        samples_per_prompt=4, template="chat", system_prompt="", instruction="",
                        max_prompt_tokens=64),
        rollout=RolloutConfig(engine="hf", temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=16,
                              max_total_tokens=96, engine_threads=1, timeout_s=300.0, sync_bucket_mb=1),
        judge=JudgeConfig(timeout_s=2.0, num_workers=1),
        loss=LossConfig(kl_coef=0.01, pos_coef=1.0, neg_coef=0.5, backend="torch"),
        policy_optim=OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=1, weight_decay=0.01, grad_clip=1.0),
        rm_optim=OptimConfig(lr=1e-2, min_lr=1e-3, warmup_steps=1, weight_decay=0.01, grad_clip=1.0),
        train=TrainConfig(steps=3, freeze_policy_steps=1, micro_batch_tokens=96, seed=0, device="cpu"),
        checkpoint=CheckpointConfig(interval=2, keep_last=2, export_hf=True),
        eval=EvalConfig(files=[str(DATA / "tiny_arith_eval.jsonl")], interval=2, samples=2, temperature=1.0,
                        top_p=1.0, max_new_tokens=16),
        log=LogConfig(tensorboard=True, progress_bar=True),
    )
