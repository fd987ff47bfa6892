"""OREAL: outcome-reward reinforcement learning for mathematical reasoning, with fused kernels."""

from oreal.ops import (LossOutput, OrealLoss, PolicyLossOutput, fused_oreal_loss, fused_policy_loss,
                       token_rm_weights)
from oreal.reward.advantages import rloo_advantages

__version__ = "0.1.0"
__all__ = ["LossOutput", "OrealLoss", "PolicyLossOutput", "fused_oreal_loss", "fused_policy_loss", "rloo_advantages",
           "token_rm_weights"]
