"""`backend="native"` of `fused_policy_loss` (oreal._C's clipped-surrogate mode, the C++ CPU kernels)
against the independent float64 reference in tests/policy_reference.py, on the cases of tests/policy_cases.py."""

import pytest
import torch

from loss_cases import relative_error
from oreal.ops import native
from oreal.ops.policy_loss import token_scales
from policy_cases import CASES as COMMON_CASES
from policy_cases import (LOW_PRECISION_CASES, assert_internal_op_chunks_and_no_grad,
                          assert_low_precision_within_twice_plain, assert_matches_reference,
                          assert_no_action_token_gives_zeros, fresh_seed, make_policy_case)

_REASON = native.unavailable_reason(torch.device("cpu"))
if _REASON is not None:
    pytest.skip(f"native backend not built: {_REASON}", allow_module_level=True)

CASES = {**COMMON_CASES,
         "odd_vocab_sequence_per_sequence_adv": dict(seq_lens=[40, 1, 30], hidden_size=33, vocab_size=1531,
                                                     loss_agg="sequence", clip_high=0.28, temperature=1.4)}


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_float64_reference(name):
    seed = fresh_seed()
    try:
        assert_matches_reference(make_policy_case(seed=seed, **CASES[name]), "native")
    except AssertionError as exc:
        raise AssertionError(f"seed {seed}: {exc}") from exc


@pytest.mark.parametrize("per_token", [False, True], ids=["per_sequence_adv", "per_token_adv"])
def test_single_token(per_token):
    """T = 1 (one sequence of one action token): one branch only, by construction."""
    case = make_policy_case([1], 8, 17, seed=fresh_seed(), per_token=per_token)
    assert_matches_reference(case, "native", both_branches=False)


def test_no_action_token_at_all():
    assert_no_action_token_gives_zeros("native")


def test_many_chunks_and_no_grad():
    assert_internal_op_chunks_and_no_grad(native.linear_policy_loss)


def test_matches_torch_backend():
    """Same per-token inputs to both backends' internal op: same loss, log-probs, gradients and stats."""
    from oreal.ops import torch_backend

    # ratios placed for this temperature, so no token sits near a clip bound where the backends could differ
    case = make_policy_case([12, 5, 9], 16, 131, seed=fresh_seed(), per_token=True, temperature=0.8)
    scale = token_scales(case.labels, case.cu_seqlens, "token")
    args = (case.labels, case.advantages, case.old_logprobs, scale, case.ref_logprobs, 0.1 * scale, 0.15, 0.25)
    results = []
    for impl in (native.linear_policy_loss, torch_backend.linear_policy_loss):
        hidden = case.hidden.clone().requires_grad_()
        weight = case.weight.clone().requires_grad_()
        loss, logprobs, _, stats = impl(hidden, weight, *args, temperature=0.8)
        loss.backward()
        results.append(((loss.detach(), logprobs, *(stats[k] for k in sorted(stats))), (hidden.grad, weight.grad)))
    (mine, my_grads), (theirs, their_grads) = results
    for a, b in zip(mine, theirs):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), (a, b)
    for a, b in zip(my_grads, their_grads):  # norm-relative: one entry can be a cancelling sum
        assert relative_error(a, b) < 1e-4


def test_bad_per_token_input_is_refused():
    case = make_policy_case([4, 4], 8, 31, seed=1, per_token=True)
    scale = token_scales(case.labels, case.cu_seqlens, "token")
    with pytest.raises(RuntimeError, match="old_logprobs must have 8 entries"):
        native.linear_policy_loss(case.hidden, case.weight, case.labels, case.advantages, case.old_logprobs[:5],
                                  scale, None, scale, 0.2, 0.2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", sorted(LOW_PRECISION_CASES))
def test_low_precision_no_worse_than_plain_torch(dtype, name):
    assert_low_precision_within_twice_plain(name, "native", dtype, fresh_seed())
