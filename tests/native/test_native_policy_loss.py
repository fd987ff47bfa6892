"""`backend="native"` of `fused_policy_loss` (oreal._C's clipped-surrogate mode, the C++ CPU kernels)
against the independent float64 reference in tests/policy_reference.py, on the cases of tests/policy_cases.py."""

import pytest
import torch

import oreal
from loss_cases import relative_error
from oreal.ops import native
from oreal.ops.policy_loss import token_scales
from policy_cases import PolicyCase, fresh_seed, make_policy_case, run_reference

_REASON = native.unavailable_reason(torch.device("cpu"))
if _REASON is not None:
    pytest.skip(f"native backend not built: {_REASON}", allow_module_level=True)

LOSS_RTOL = 1e-5  # relative to the loss's L1 magnitude: mixed-sign advantages can cancel the loss to ~0
GRAD_RTOL = 1e-4


def run_native(case: PolicyCase):
    hidden, weight, *rest = case.args()
    hidden, weight = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    out = oreal.fused_policy_loss(hidden, weight, *rest, backend="native", **case.options)
    grads = torch.autograd.grad(out.loss, (hidden, weight), allow_unused=True)
    return out, tuple(torch.zeros_like(x) if g is None else g for x, g in zip((hidden, weight), grads))


def assert_loss_close(loss, ref_loss, magnitude):
    bound = LOSS_RTOL * max(abs(float(ref_loss)), magnitude)
    loss, ref_loss = float(loss.detach()), float(ref_loss)
    assert abs(loss - ref_loss) <= bound, (loss, ref_loss, magnitude)


def assert_stats_match(stats, clip_fraction, ratio_mean, ratio_max):
    for stat in stats:
        assert stat.shape == () and stat.dtype == torch.float32 and not stat.requires_grad
    assert abs(float(stats[0]) - clip_fraction) < 1e-6, (float(stats[0]), clip_fraction)
    assert abs(float(stats[1]) - ratio_mean) < 1e-5 * max(1.0, ratio_mean)
    assert abs(float(stats[2]) - ratio_max) < 1e-5 * max(1.0, ratio_max)


def assert_matches_reference(case: PolicyCase, *, both_branches=True):
    out, (grad_hidden, grad_weight) = run_native(case)
    (loss, lp, ent, clip_fraction, ratio_mean, ratio_max, magnitude), (ref_gh, ref_gw) = run_reference(case)
    assert out.loss.dtype == torch.float32
    assert_loss_close(out.loss, loss, magnitude)
    for grad, ref in ((grad_hidden, ref_gh), (grad_weight, ref_gw)):
        if ref.norm() > 0:
            assert relative_error(grad, ref) < GRAD_RTOL
        else:
            assert grad.abs().max() == 0
    action = case.labels != -100
    assert torch.allclose(out.logprobs.double(), lp, rtol=1e-5, atol=1e-5)
    assert torch.allclose(out.entropy.double(), ent, rtol=1e-5, atol=1e-4)
    assert (out.logprobs[~action] == 0).all() and (out.entropy[~action] == 0).all()
    assert_stats_match((out.clip_fraction, out.ratio_mean, out.ratio_max), clip_fraction, ratio_mean, ratio_max)
    if both_branches:
        assert 0 < clip_fraction < 1, clip_fraction  # the clip is active on some tokens and not on others


MIXED = [7, 1, 13, 0, 9]  # a length-1 sequence (one action token) and an empty one
CASES = {
    "token_kl_per_sequence_adv": dict(seq_lens=MIXED, hidden_size=24, vocab_size=101),
    "token_no_kl_per_token_adv_asymmetric": dict(seq_lens=MIXED, hidden_size=24, vocab_size=101, per_token=True,
                                                 with_ref=False, clip_low=0.2, clip_high=0.28),
    "sequence_kl_per_token_adv_no_action_seq": dict(seq_lens=[6, 8, 4, 1], hidden_size=12, vocab_size=57,
                                                    per_token=True, empty_seq=1, loss_agg="sequence"),
    "sequence_no_kl_temperature_asymmetric": dict(seq_lens=MIXED, hidden_size=16, vocab_size=77, with_ref=False,
                                                  loss_agg="sequence", temperature=0.7, clip_low=0.1,
                                                  clip_high=0.3),
    "global_num_tokens_temperature": dict(seq_lens=[10, 3, 12], hidden_size=12, vocab_size=57, num_tokens=100,
                                          temperature=1.3, kl_coef=0.1),
    "odd_vocab_sequence_per_sequence_adv": dict(seq_lens=[40, 1, 30], hidden_size=33, vocab_size=1531,
                                                loss_agg="sequence", clip_high=0.28, temperature=1.4),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_float64_reference(name):
    seed = fresh_seed()
    try:
        assert_matches_reference(make_policy_case(seed=seed, **CASES[name]))
    except AssertionError as exc:
        raise AssertionError(f"seed {seed}: {exc}") from exc


@pytest.mark.parametrize("per_token", [False, True], ids=["per_sequence_adv", "per_token_adv"])
def test_single_token(per_token):
    """T = 1 (one sequence of one action token): one branch only, by construction."""
    case = make_policy_case([1], 8, 17, seed=fresh_seed(), per_token=per_token)
    assert_matches_reference(case, both_branches=False)


def test_no_action_token_at_all():
    """Every label ignored: loss, gradients and statistics are exactly 0."""
    case = make_policy_case([3, 5], 8, 31, seed=fresh_seed(), loss_agg="sequence")
    case.labels[:] = -100
    out, (grad_hidden, grad_weight) = run_native(case)
    assert float(out.loss.detach()) == 0 and grad_hidden.abs().max() == 0 and grad_weight.abs().max() == 0
    assert float(out.clip_fraction) == float(out.ratio_mean) == float(out.ratio_max) == 0


def test_many_chunks_and_no_grad():
    """The internal op directly: 9 chunks of 7 tokens, and the same call under torch.no_grad()."""
    case = make_policy_case([30, 1, 20, 12], 16, 203, seed=fresh_seed(), per_token=True, temperature=1.3)
    (loss, lp, _, clip_fraction, ratio_mean, ratio_max, magnitude), (ref_gh, ref_gw) = run_reference(case)
    scale = token_scales(case.labels, case.cu_seqlens, "token")
    args = (case.labels, case.advantages, case.old_logprobs, scale, case.ref_logprobs, 0.05 * scale, 0.2, 0.2)
    hidden = case.hidden.clone().requires_grad_()
    weight = case.weight.clone().requires_grad_()
    out_loss, _, _, stats = native.linear_policy_loss(hidden, weight, *args, temperature=1.3, chunk_size=7)
    out_loss.backward()
    assert_loss_close(out_loss, loss, magnitude)
    assert relative_error(hidden.grad, ref_gh) < GRAD_RTOL and relative_error(weight.grad, ref_gw) < GRAD_RTOL
    assert_stats_match((stats["clip_fraction"], stats["ratio_mean"], stats["ratio_max"]), clip_fraction,
                       ratio_mean, ratio_max)
    assert 0 < clip_fraction < 1
    with torch.no_grad():
        nograd_loss, nograd_lp, _, nograd_stats = native.linear_policy_loss(hidden, weight, *args, temperature=1.3)
    assert not nograd_loss.requires_grad
    assert torch.allclose(nograd_lp.double(), lp, rtol=1e-5, atol=1e-5)
    assert abs(float(nograd_stats["clip_fraction"]) - clip_fraction) < 1e-6


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
