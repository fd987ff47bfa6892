"""The tiny CPU run of configs/tiny_cpu.py with RLinf's GRPO recipe instead of OREAL (`--algorithm grpo`).

Same model, prompts, engine and budget; the update is GRPO's: rewards +5 / -5, group-normalised
advantages over the 4 samples of each prompt, DAPO's token-level clipped surrogate, 2 epochs over
2 minibatches (4 updates per step), RLinf's minibatch early-stop at an importance ratio of 5. A
small KL to the initial policy (RLinf's recipe has none) exercises the reference model on CPU.

    torchrun --nproc_per_node 2 -m oreal.train --config configs/tiny_cpu_grpo.py --output-dir /tmp/grpo_tiny
"""

from pathlib import Path

from oreal.runtime.config import PPOConfig, load_config_file


def config():
    cfg = load_config_file(Path(__file__).resolve().parent / "tiny_cpu.py")
    cfg.algorithm = "grpo"
    cfg.output_dir = "outputs/tiny_cpu_grpo"
    cfg.ppo = PPOConfig(epochs=2, minibatches=2, clip_low=0.2, clip_high=0.2, loss_agg="token", kl_coef=0.001,
                        early_stop_ratio=5.0, early_stop_statistic="mean", reward_correct=5.0, reward_wrong=-5.0)
    cfg.train.freeze_policy_steps = 0  # GRPO has no auxiliary model to warm up
    cfg.eval.interval = 3
    return cfg
