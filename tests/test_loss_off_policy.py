"""Off-policy OREAL (`behavior_logprobs`, the truncated importance weight) against the float64 reference.

The correction is derived in `oreal.ops.loss`'s DESIGN note: every token's terms are multiplied by the
constant rho_t = min(exp(lp_t - mu_t), C). Checked here: the fp32 loss and gradients against the
independent float64 reference on fresh random inputs whose ratios fall below 1, between 1 and C, and
above C; bit-exactness with the on-policy loss when mu == lp; the cap's effect derived by hand; routing of
the other backends; one clear error per bad argument.
"""

import pytest
import torch

from loss_cases import FP32_CASES, assert_matches_reference_fp32, current_logprobs, make_case, run_fused
from oreal import fused_oreal_loss
from oreal.ops import backends

OFF_POLICY_CASES = {name: FP32_CASES[name] for name in (
    "mixed", "single_token", "odd_shapes", "length_one_sequences", "no_action_sequence", "all_negative",
    "no_rm_no_ref", "temperature", "global_counts", "coefficients")}


def add_behavior(case, seed, spread=0.8, cap=2.0):
    """Behaviour log-probs a random distance from the current ones: ratios from ~0.1 to ~10 (many above cap)."""
    g = torch.Generator().manual_seed(seed + 1)
    current = current_logprobs(case.hidden, case.weight, case.labels, case.options.get("temperature", 1.0))
    behavior = current + spread * torch.randn(current.shape, generator=g)
    case.options.update(behavior_logprobs=torch.minimum(behavior, torch.zeros(())), importance_cap=cap)
    return case


@pytest.mark.parametrize("name", sorted(OFF_POLICY_CASES))
def test_off_policy_matches_float64_reference(name):
    seed = torch.randint(0, 2**31 - 1, ()).item()  # fresh inputs every run; printed on failure
    case = add_behavior(make_case(seed=seed, **OFF_POLICY_CASES[name]), seed)
    assert_matches_reference_fp32(case, "torch")


@pytest.mark.parametrize("cap", [1.0, 1.5, 5.0])
def test_cap_values_match_reference(cap):
    seed = torch.randint(0, 2**31 - 1, ()).item()
    case = add_behavior(make_case([9, 1, 14], 16, 89, seed=seed, kl_coef=0.2), seed, spread=1.2, cap=cap)
    assert_matches_reference_fp32(case, "torch")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_behavior_equal_to_current_is_bit_exact(dtype, backend):
    """mu == lp: rho is exactly 1.0, so the loss and both gradients equal today's on-policy loss bit for bit.

    ("auto" may take its token-RM weights from the native backend, whose rounding differs from torch's by
    an ulp: that path is compared without a token RM, so only the routed log-prob loss is compared.)"""
    seed = torch.randint(0, 2**31 - 1, ()).item()
    case = make_case([11, 1, 23, 5], 24, 131, seed=seed, kl_coef=0.15, with_rm=backend == "torch")
    on_policy, gh, gw = run_fused(case, "torch", dtype)
    case.options.update(behavior_logprobs=on_policy.logprobs.clone(), importance_cap=2.0)
    off_policy, gh_off, gw_off = run_fused(case, backend, dtype)
    assert torch.equal(off_policy.loss, on_policy.loss)
    assert torch.equal(off_policy.logprobs, on_policy.logprobs)
    assert torch.equal(gh_off, gh) and torch.equal(gw_off, gw)


def test_every_token_above_the_cap_scales_by_the_cap():
    """mu far below lp on every token: rho = C everywhere, so loss and gradients are C times the on-policy
    ones (C = 2: an exact doubling in floating point)."""
    seed = torch.randint(0, 2**31 - 1, ()).item()
    case = make_case([8, 3, 12], 16, 61, seed=seed, kl_coef=0.1)
    on_policy, gh, gw = run_fused(case, "torch")
    case.options.update(behavior_logprobs=on_policy.logprobs - 5.0, importance_cap=2.0)
    capped, gh_c, gw_c = run_fused(case, "torch")
    assert torch.allclose(capped.loss, 2 * on_policy.loss, rtol=1e-6, atol=0)
    assert torch.allclose(gh_c, 2 * gh, rtol=1e-5, atol=1e-9) and torch.allclose(gw_c, 2 * gw, rtol=1e-5, atol=1e-9)


def test_behavior_above_current_down_weights_by_the_ratio():
    """mu = lp + 1 on every token: rho = e^-1 (below the cap, no truncation); the loss is e^-1 times today's."""
    case = make_case([8, 5], 12, 41, seed=7, kl_coef=0.1)
    on_policy, _, _ = run_fused(case, "torch")
    case.options.update(behavior_logprobs=on_policy.logprobs + 1.0)
    weighted, _, _ = run_fused(case, "torch")
    assert torch.allclose(weighted.loss, on_policy.loss * torch.exp(torch.tensor(-1.0)), rtol=1e-5)


@pytest.mark.parametrize("backend", ["native", "triton"])
def test_other_backends_route_to_torch(backend):
    """The kernels have no importance weight: asked for one, every backend runs the torch log-prob loss."""
    if backend not in backends.available_backends(torch.device("cpu")):
        pytest.skip(f"backend {backend} is not available here")
    seed = torch.randint(0, 2**31 - 1, ()).item()
    case = add_behavior(make_case([7, 9], 16, 53, seed=seed, with_rm=False), seed)  # RM weights: see above
    torch_out, gh, gw = run_fused(case, "torch")
    other, gh_o, gw_o = run_fused(case, backend)
    assert torch.equal(other.loss, torch_out.loss) and torch.equal(gh_o, gh) and torch.equal(gw_o, gw)


@pytest.mark.parametrize("bad, message", [
    (dict(importance_cap=0.5), "importance_cap: must be >= 1"),
    (dict(importance_cap=float("inf")), "importance_cap"),
    (dict(behavior_logprobs=torch.zeros(3)), "behavior_logprobs"),
])
def test_bad_arguments_name_themselves(bad, message):
    case = make_case([6, 4], 8, 23, seed=3)
    options = dict(behavior_logprobs=torch.full((10,), -1.0), importance_cap=2.0)
    options.update(bad)
    with pytest.raises(ValueError, match=message):
        fused_oreal_loss(*case.args(torch.float32), backend="torch", **options)


def test_logged_terms_add_up_to_the_off_policy_loss():
    """`loss_term_sums` (the logged positive / negative / KL parts) carries the same weight as the loss."""
    from types import SimpleNamespace

    from oreal.algorithms.loss_terms import TERMS, loss_term_sums

    seed = torch.randint(0, 2**31 - 1, ()).item()
    case = add_behavior(make_case([9, 4, 13], 16, 71, seed=seed, kl_coef=0.2), seed)
    out, _, _ = run_fused(case, "torch")
    lens = (case.cu_seqlens[1:] - case.cu_seqlens[:-1]).tolist()
    batch = SimpleNamespace(labels=case.labels, rm_scores=case.rm_scores, cu_seqlens=case.cu_seqlens,
                            advantages=case.advantages, is_positive=case.is_positive, ref_logprobs=case.ref_logprobs,
                            num_sequences=len(lens), seq_lens=lens, num_tokens=case.labels.numel(), is_padding=False)
    options = case.options
    sums = dict(zip(TERMS, loss_term_sums(batch, out, kl_coef=options["kl_coef"], pos_coef=1.0, neg_coef=0.5,
                                          pos_tokens=None, neg_tokens=None,
                                          behavior_logprobs=options["behavior_logprobs"],
                                          importance_cap=options["importance_cap"]).tolist()))
    assert sums["positive"] + sums["negative"] + sums["kl"] == pytest.approx(sums["total"], rel=1e-5, abs=1e-7)
