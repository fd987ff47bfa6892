"""`backend="triton"` of `fused_policy_loss` (the clipped-surrogate mode, interpreted on CPU) against the
independent float64 reference in tests/policy_reference.py, on the cases of tests/policy_cases.py."""

import pytest
import torch

import oreal
from loss_cases import relative_error
from oreal.ops.policy_loss import token_scales
from oreal_kernels import linear_policy_loss
from oreal_kernels.linear_logprob import ClippedSurrogate, surrogate_gradient_scale
from policy_cases import CASES as COMMON_CASES
from policy_cases import (LOW_PRECISION_CASES, assert_internal_op_chunks_and_no_grad,
                          assert_low_precision_within_twice_plain, assert_matches_reference,
                          assert_no_action_token_gives_zeros, fresh_seed, make_policy_case, plain_torch_policy_loss,
                          run_fused, run_reference)

CASES = {**COMMON_CASES,
         "odd_vocab_two_token_blocks": dict(seq_lens=[40, 9, 30], hidden_size=33, vocab_size=1531, per_token=True,
                                            clip_high=0.28)}


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_float64_reference(name):
    assert_matches_reference(make_policy_case(seed=fresh_seed(), **CASES[name]), "triton")


@pytest.mark.parametrize("per_token", [False, True], ids=["per_sequence_adv", "per_token_adv"])
def test_single_token(per_token):
    """T = 1 (one sequence of one action token): one branch only, by construction."""
    case = make_policy_case([1], 8, 17, seed=fresh_seed(), per_token=per_token)
    assert_matches_reference(case, "triton", both_branches=False)


def test_no_action_token_at_all():
    assert_no_action_token_gives_zeros("triton")


def test_many_chunks_and_no_grad():
    assert_internal_op_chunks_and_no_grad(linear_policy_loss)


def test_surrogate_gradient_scale_is_a_power_of_two_bounding_the_logit_gradient():
    scale = torch.tensor([1e-3, 2e-3, 0.0])
    empty = torch.zeros(3)
    surrogate = ClippedSurrogate(torch.tensor([0.5, -4.0, 9.0]), empty, empty, empty, 0.2, 0.28)
    kl = torch.tensor([1e-4, 3e-4, 0.0])
    sigma = surrogate_gradient_scale(scale, surrogate, kl, True, 0.5)
    bound = (8e-3 * 1.28 + 3e-4) / 0.5
    assert 0.5 < bound * sigma.item() <= 1.0
    assert torch.log2(sigma).item() == round(torch.log2(sigma).item())
    without_kl = surrogate_gradient_scale(scale, surrogate, kl, False, 0.5)
    assert 0.5 < 8e-3 * 1.28 / 0.5 * without_kl.item() <= 1.0


def test_bad_per_token_inputs_are_refused():
    case = make_policy_case([4, 4], 8, 31, seed=1)
    scale = token_scales(case.labels, case.cu_seqlens, "token")
    with pytest.raises(ValueError, match=r"^advantages: expected a float32 tensor of shape \(8,\)"):
        linear_policy_loss(case.hidden, case.weight, case.labels, case.advantages, case.old_logprobs, scale, None,
                           scale, 0.2, 0.2)


# ---- bf16 / fp16: no worse than what a user writes in plain torch in that dtype ----

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", sorted(LOW_PRECISION_CASES))
def test_low_precision_no_worse_than_plain_torch(dtype, name):
    assert_low_precision_within_twice_plain(name, "triton", dtype, fresh_seed())


def test_fp16_gradients_survive_tiny_token_scales_under_loss_scaling():
    """A global token count of 4M makes every token scale 2.5e-7; fp16 training multiplies the loss by a
    scaler's 2^16 before backward. The gradients formed in the forward pass are stored under the
    power-of-two scale, so they must not have flushed to zero."""
    case = make_policy_case([30, 20], 32, 257, seed=fresh_seed(), round_to=torch.float16, num_tokens=4_000_000)
    loss_scale = 2.0 ** 16
    hidden, weight, *rest = case.args(torch.float16)
    hidden, weight = hidden.requires_grad_(), weight.requires_grad_()
    out = oreal.fused_policy_loss(hidden, weight, *rest, backend="triton", **case.options)
    (out.loss * loss_scale).backward()
    _, (ref_gh, ref_gw) = run_reference(case, torch.float16)
    assert ref_gh.abs().max() < 1e-5  # the regime under test: true gradients below fp16's normal range
    errors = (relative_error(hidden.grad.double() / loss_scale, ref_gh),
              relative_error(weight.grad.double() / loss_scale, ref_gw))
    assert max(errors) < 1e-2, errors


def test_fp16_large_ratio_on_a_negative_advantage():
    """The gradient scale assumes ratios near the clip range; a negative-advantage token takes the
    unclipped branch at any ratio above it, so its logit gradient exceeds the bound by the ratio.
    At r ~ e^9 (thousands) the fp16 gradients must still be finite and no worse than plain torch."""
    case = make_policy_case([20, 12], 32, 257, seed=fresh_seed(), round_to=torch.float16, per_token=True)
    token = (case.labels != -100).nonzero()[2, 0]
    case.advantages[token] = -1.5
    case.old_logprobs[token] -= 9.0
    out, (grad_hidden, grad_weight) = run_fused(case, "triton", torch.float16)
    (_, _, _, _, _, ratio_max, _), (ref_gh, ref_gw) = run_reference(case, torch.float16)
    _, plain_gh, plain_gw = plain_torch_policy_loss(case, torch.float16)
    assert ratio_max > 1000 and abs(float(out.ratio_max) - ratio_max) < 1e-5 * ratio_max
    assert torch.isfinite(grad_hidden).all() and torch.isfinite(grad_weight).all()
    assert relative_error(grad_hidden, ref_gh) <= 2 * relative_error(plain_gh, ref_gh) + 1e-6
    assert relative_error(grad_weight, ref_gw) <= 2 * relative_error(plain_gw, ref_gw) + 1e-6
