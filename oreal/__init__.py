"""OREAL: outcome-reward reinforcement learning for mathematical reasoning, with fused kernels.

Names are imported on first use (PEP 562), so `oreal-judge` and the judger's worker processes
start without paying for torch.
"""

from __future__ import annotations

import importlib

from oreal import _compat

_compat.install()  # old module paths of 0.1 keep working, with a warning

__version__ = "0.1.0"

_EXPORTS = {
    "LossOutput": "oreal.ops.loss",
    "OrealLoss": "oreal.ops.loss",
    "fused_oreal_loss": "oreal.ops.loss",
    "token_rm_weights": "oreal.ops.loss",
    "PolicyLossOutput": "oreal.ops.policy_loss",
    "fused_policy_loss": "oreal.ops.policy_loss",
    "rloo_advantages": "oreal.algorithms.advantages",
}

__all__ = list(_EXPORTS)


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'oreal' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
