"""Rewards: the rule-based judger, the optional LLM verifier, the token-level reward model and advantages."""

from oreal.reward.advantages import rloo_advantages

__all__ = ["rloo_advantages"]
