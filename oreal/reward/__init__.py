"""Rewards: the rule-based judger, the optional LLM verifier, the token-level reward model and advantages."""

from oreal.reward.advantages import (gae_advantages, group_normalized_advantages, outcome_token_rewards,
                                     rloo_advantages)

__all__ = ["gae_advantages", "group_normalized_advantages", "outcome_token_rewards", "rloo_advantages"]
