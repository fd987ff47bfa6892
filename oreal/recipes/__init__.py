"""The recipes users compare OREAL against, trained by the same machinery (`oreal.recipes.base`: rollouts,
judge, packing, weight sync, checkpoints, metrics, evaluation) and the same fused kernels:

- `--algorithm grpo` (`grpo.GRPOTrainer`): RLinf's math GRPO: group-normalised advantages, +5 / -5
  rewards, a DAPO token-level clipped-surrogate loss, several epochs over minibatches, and the
  minibatch early-stop on a large importance ratio.
- `--algorithm ppo` (`ppo.PPOTrainer`): SimpleRL-Zero's PPO from a base model: a critic (value head on a
  copy of the policy) with a clipped value loss, GAE on a rule-based final-answer reward.

Both share the clipped update (`clipped.ClippedUpdateTrainer`): old log-probs from a no-grad forward of
the policy before the first update, minibatch updates, early-stop, and their metrics.
"""

from __future__ import annotations

RECIPES = ("grpo", "ppo")


def recipe_trainer(algorithm: str):
    """The trainer class of `algorithm` (one of `RECIPES`)."""
    if algorithm == "grpo":
        from oreal.recipes.grpo import GRPOTrainer

        return GRPOTrainer
    if algorithm == "ppo":
        from oreal.recipes.ppo import PPOTrainer

        return PPOTrainer
    raise ValueError(f"algorithm: {algorithm!r} is not a recipe of oreal.recipes ({', '.join(RECIPES)})")
