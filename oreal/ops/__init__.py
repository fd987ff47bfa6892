"""Public loss API and backend dispatch."""

from oreal.ops.loss import LossOutput, OrealLoss, fused_oreal_loss, token_rm_weights
from oreal.ops.policy_loss import PolicyLossOutput, fused_policy_loss

__all__ = ["LossOutput", "OrealLoss", "PolicyLossOutput", "fused_oreal_loss", "fused_policy_loss",
           "token_rm_weights"]
