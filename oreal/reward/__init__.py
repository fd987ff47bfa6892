"""Rewards: the rule-based judger, the optional LLM verifier, the token-level reward model and advantages.

Names are imported on first use (PEP 562), so `import oreal.reward` costs nothing until a name is
touched, and the judger never pulls in torch through the advantage functions.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "gae_advantages": "oreal.reward.advantages",
    "group_normalized_advantages": "oreal.reward.advantages",
    "outcome_token_rewards": "oreal.reward.advantages",
    "rloo_advantages": "oreal.reward.advantages",
    "extract_answer": "oreal.reward.extract",
    "reference_answer": "oreal.reward.extract",
    "is_equivalent": "oreal.reward.equivalence",
    "Judgement": "oreal.reward.judge",
    "judge": "oreal.reward.judge",
    "judge_batch": "oreal.reward.judge",
    "summarize": "oreal.reward.judge",
    "JudgePool": "oreal.reward.worker_pool",
    "LLMVerifier": "oreal.reward.verifier",
    "VerifierMetrics": "oreal.reward.verifier",
}

__all__ = list(_EXPORTS)


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'oreal.reward' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
