"""The public fused losses and their backend dispatch: the only door from the trainer to the kernels.

- `loss`: `fused_oreal_loss` / `OrealLoss` (OREAL's reshaped, token-RM-weighted, KL-regularised loss) and
  `token_rm_weights`; `policy_loss`: `fused_policy_loss` (the PPO/GRPO clipped surrogate);
- `backends`: picks `torch` (`torch_backend`, the readable chunked reference), `triton` (`oreal_kernels`,
  the `kernels/` folder) or `native` (`native`: `oreal._C`, built from `csrc/`); `validation`: argument checks.

The contract (shapes, dtypes, formulas) is DESIGN.md's "The fused OREAL loss"; kernels never import
transformers, and nothing here knows about training.
"""

from oreal.ops.loss import LossOutput, OrealLoss, fused_oreal_loss, token_rm_weights
from oreal.ops.policy_loss import PolicyLossOutput, fused_policy_loss

__all__ = ["LossOutput", "OrealLoss", "PolicyLossOutput", "fused_oreal_loss", "fused_policy_loss",
           "token_rm_weights"]
