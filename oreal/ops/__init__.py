"""Public loss API and backend dispatch."""

from oreal.ops.loss import LossOutput, OrealLoss, fused_oreal_loss, token_rm_weights

__all__ = ["LossOutput", "OrealLoss", "fused_oreal_loss", "token_rm_weights"]
