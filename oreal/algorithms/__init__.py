"""The algorithms: one module per recipe, each with the same shape (a trainer class whose `train_step` is
the whole algorithm, top to bottom), on one shared loop.

- `oreal`: OREAL (the default, `--algorithm oreal`): RLOO advantages, the one-pair filter, the token RM,
  the fused OREAL loss; `sft`: supervised fine-tuning, OREAL's first stage;
- `grpo`: RLinf's math GRPO (`--algorithm grpo`): group-normalised advantages, the DAPO token-level clipped
  surrogate, minibatch epochs with early stop;
- `ppo`: SimpleRL-Zero's PPO (`--algorithm ppo`): a critic, GAE, whitened advantages, clipped value loss;
- `loop`: what they share: rollouts -> verdicts (`BaseTrainer.collect`), updates, metrics, evaluation,
  checkpoints and the run loop; `clipped`: the minibatch update GRPO and PPO share;
- pieces only algorithms use: `advantages` (RLOO, group-normalised, GAE), `filtering` (OREAL's one-pair
  filter), `token_rm` (OREAL's token-level reward model), `loss_terms` (logging the loss's parts),
  `policy` and `clipped_models` (the FSDP2 root modules whose forward ends in the fused loss),
  `ppo_family` (value loss, explained variance, whitening, the early-stop decision).
"""

from __future__ import annotations

# the recipes users compare OREAL against; OREAL itself is `oreal.algorithms.oreal.Trainer`
RECIPES = ("grpo", "ppo")


def recipe_trainer(algorithm: str):
    """The trainer class of `algorithm` (one of `RECIPES`)."""
    if algorithm == "grpo":
        from oreal.algorithms.grpo import GRPOTrainer

        return GRPOTrainer
    if algorithm == "ppo":
        from oreal.algorithms.ppo import PPOTrainer

        return PPOTrainer
    raise ValueError(f"algorithm: {algorithm!r} is not a recipe of oreal.algorithms ({', '.join(RECIPES)})")
