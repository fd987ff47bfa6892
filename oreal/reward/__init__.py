"""Judging answers: the rule-based judger (extraction, normalisation, equivalence, killable sympy workers),
the optional LLM verifier, and the `oreal-judge` CLI. Nothing here knows about training; advantages live in
`oreal.algorithms.advantages`, the token-level reward model in `oreal.algorithms.token_rm`.

Names are imported on first use (PEP 562), so `import oreal.reward` costs nothing until a name is
touched, and the judger's worker processes never pull in torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "extract_answer": "oreal.reward.extract",
    "reference_answer": "oreal.reward.extract",
    "is_equivalent": "oreal.reward.equivalence",
    "Judgement": "oreal.reward.judging",
    "judge": "oreal.reward.judging",
    "judge_batch": "oreal.reward.judging",
    "summarize": "oreal.reward.judging",
    "JudgePool": "oreal.reward.worker_pool",
    "LLMVerifier": "oreal.reward.verifier",
    "VerifierMetrics": "oreal.reward.verifier",
}

__all__ = list(_EXPORTS)

# moved to oreal.algorithms.advantages in 0.2; the old names warn for one release
_MOVED = {name: "oreal.algorithms.advantages" for name in (
    "gae_advantages", "group_normalized_advantages", "outcome_token_rewards", "rloo_advantages")}


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None and name in _MOVED:
        from oreal._compat import warn_moved

        module = _MOVED[name]
        warn_moved(f"oreal.reward.{name}", f"{module}.{name}")
        return getattr(importlib.import_module(module), name)
    if module is None:
        raise AttributeError(f"module 'oreal.reward' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
