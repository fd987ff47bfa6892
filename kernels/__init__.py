"""Hand-written Triton kernels of the fused OREAL loss, installed as `oreal_kernels`.

The `backend="triton"` of `oreal.fused_oreal_loss` and `oreal.fused_policy_loss`: the internal ops
of the contract in `oreal.ops.torch_backend`, with the same signatures and semantics:

    linear_logprob_loss(hidden, weight, labels, pg_coef, ref_logprobs, kl_weight, temperature)
        fused lm_head matmul + online log-sum-exp + target gather + entropy + token loss, and the
        gradients of hidden and weight, chunk by chunk (linear_logprob.py, matmul.py)
    linear_policy_loss(hidden, weight, labels, advantages, old_logprobs, token_scale, ref_logprobs,
                       kl_scale, clip_low, clip_high, temperature)
        the PPO/GRPO clipped surrogate: the same launches in a second loss mode, plus clip fraction
        and ratio statistics computed on the device (policy_loss.py)
    token_rm_weights(rm_scores, labels, cu_seqlens, is_positive)
        OREAL's token-RM weights as a segmented scan over packed sequences (token_weights.py)

They run on CUDA tensors, and on CPU tensors when TRITON_INTERPRET=1 is set before this package
is imported. Block sizes come from the table in `configs.py`; `aot.py` hands the exact launches
to `triton.compile` for an ahead-of-time report on GPUs that are not present. See README.md.
"""

from .linear_logprob import linear_logprob_loss
from .policy_loss import linear_policy_loss
from .token_weights import token_rm_weights

__all__ = ["linear_logprob_loss", "linear_policy_loss", "token_rm_weights"]
