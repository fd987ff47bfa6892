"""The clipped-surrogate loss (`fused_policy_loss`) against its independent float64 reference."""

import pytest
import torch

import oreal
from loss_cases import relative_error
from policy_cases import (LOW_PRECISION_CASES, assert_low_precision_within_twice_plain, fresh_seed, make_policy_case,
                          run_reference)


def _run(case, advantages, old, ref, backend="torch", **options):
    hidden = case.hidden.clone().requires_grad_()
    weight = case.weight.clone().requires_grad_()
    out = oreal.fused_policy_loss(hidden, weight, case.labels, case.cu_seqlens, advantages, old, ref,
                                  backend=backend, **options)
    return out, torch.autograd.grad(out.loss, (hidden, weight))


OPTIONS = {
    "token_kl": dict(kl_coef=0.05),
    "token_asymmetric_clip": dict(clip_low=0.2, clip_high=0.28),
    "sequence": dict(loss_agg="sequence", kl_coef=0.02),
    "global_count": dict(num_tokens=100, temperature=0.8),
}


@pytest.mark.parametrize("name", sorted(OPTIONS))
@pytest.mark.parametrize("per_token", [False, True])
def test_matches_float64_reference(name, per_token):
    case = make_policy_case([9, 1, 0, 17, 6], 16, 211, seed=fresh_seed(), per_token=per_token, **OPTIONS[name])
    out, (gh, gw) = _run(case, case.advantages, case.old_logprobs, case.ref_logprobs, **case.options)
    (loss, lp, ent, clip_frac, ratio_mean, ratio_max, magnitude), (rgh, rgw) = run_reference(case)
    # relative to the loss's L1 magnitude (see tests/loss_cases.py): mixed-sign advantages can cancel the sum
    assert abs(out.loss.item() - loss.item()) <= 1e-5 * max(abs(loss.item()), magnitude)
    assert relative_error(gh, rgh) < 1e-4 and relative_error(gw, rgw) < 1e-4
    assert torch.allclose(out.logprobs.double(), lp, atol=1e-5)
    assert torch.allclose(out.entropy.double(), ent, atol=1e-4)
    assert abs(float(out.clip_fraction) - clip_frac) < 1e-6
    assert abs(float(out.ratio_mean) - ratio_mean) < 1e-5
    assert abs(float(out.ratio_max) - ratio_max) < 1e-5 * max(1.0, ratio_max)
    assert 0 < clip_frac < 1  # the case exercises both branches


def test_on_policy_gradient_equals_plain_policy_gradient():
    """With old == current log-probs every ratio is 1, nothing is clipped, and the gradient is
    the plain policy gradient of -mean(A lp)."""
    case = make_policy_case([12, 7], 10, 53, seed=3, with_ref=False)
    adv = case.advantages
    with torch.no_grad():
        current = torch.log_softmax(case.hidden @ case.weight.T, -1).gather(1, case.labels.clamp(min=0)[:, None])[:, 0]
    out, (gh, _) = _run(case, adv, current, None)
    assert float(out.clip_fraction) == 0 and abs(float(out.ratio_mean) - 1) < 1e-5
    hidden = case.hidden.clone().requires_grad_()
    lp = torch.log_softmax(hidden @ case.weight.T, -1).gather(1, case.labels.clamp(min=0)[:, None])[:, 0]
    seq = torch.repeat_interleave(torch.arange(2), torch.tensor([12, 7]))
    action = case.labels != -100
    expected = torch.autograd.grad(-(adv[seq] * lp)[action].sum() / action.sum(), hidden)[0]
    assert torch.allclose(gh, expected, rtol=1e-4, atol=1e-6)


def test_bad_inputs():
    case = make_policy_case([5, 4], 8, 31, seed=1)
    adv, old, ref = case.advantages, case.old_logprobs, case.ref_logprobs
    with pytest.raises(ValueError, match="^advantages: expected"):
        _run(case, torch.randn(3), old, ref)
    with pytest.raises(ValueError, match="^loss_agg:"):
        _run(case, adv, old, ref, loss_agg="tokens")
    with pytest.raises(ValueError, match="^clip_low:"):
        _run(case, adv, old, ref, clip_low=1.5)
    with pytest.raises(ValueError, match="^old_logprobs:"):
        _run(case, adv, old[:-1], ref)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", sorted(LOW_PRECISION_CASES))
def test_low_precision_no_worse_than_plain_torch(dtype, name):
    assert_low_precision_within_twice_plain(name, "torch", dtype, fresh_seed())
