"""The tiny CPU run of configs/tiny_cpu.py with SimpleRL-Zero's PPO instead of OREAL (`--algorithm ppo`).

Same model, prompts, engine and budget; a critic (the tiny model with a zero-initialised value head)
learns alone during the first step (the policy is frozen), then both train: GAE (gamma 1, lambda 0.95)
on the final-answer reward +1 / -1 less a per-token KL penalty of 0.01 against the initial policy,
whitened advantages, clipped value loss (0.2), 2 epochs over 2 minibatches.

    torchrun --nproc_per_node 2 -m oreal.train --config configs/tiny_cpu_ppo.py --output-dir /tmp/ppo_tiny
"""

from pathlib import Path

from oreal.runtime.config import CriticConfig, OptimConfig, PPOConfig, load_config_file


def config():
    cfg = load_config_file(Path(__file__).resolve().parent / "tiny_cpu.py")
    cfg.algorithm = "ppo"
    cfg.output_dir = "outputs/tiny_cpu_ppo"
    cfg.ppo = PPOConfig(epochs=2, minibatches=2, clip_low=0.2, clip_high=0.2, loss_agg="token", kl_coef=0.0,
                        early_stop_ratio=0.0, reward_correct=1.0, reward_wrong=-1.0)
    cfg.critic = CriticConfig(value_clip=0.2, gamma=1.0, lam=0.95, whiten_advantages=True, kl_reward_coef=0.01)
    cfg.critic_optim = OptimConfig(lr=1e-2, min_lr=1e-3, warmup_steps=0, weight_decay=0.0, grad_clip=1.0)
    cfg.train.freeze_policy_steps = 1  # the critic warms up alone for one step
    cfg.eval.interval = 3
    return cfg
