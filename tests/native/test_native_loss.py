"""`backend="native"` (oreal._C, the C++ CPU kernels) against the independent float64 reference."""

import pytest
import torch

from loss_cases import (FP32_CASES, FP32_GRAD_RTOL, LOW_PRECISION_CASES,
                        assert_fp16_survives_large_token_counts, assert_low_precision_within_twice_plain, assert_matches_reference_fp32,
                        assert_upstream_gradient_applied_in_fp32, make_case, relative_error, run_fused,
                        run_reference)
from oreal.ops import native

_REASON = native.unavailable_reason(torch.device("cpu"))
if _REASON is not None:
    pytest.skip(f"native backend not built: {_REASON}", allow_module_level=True)

CASES = FP32_CASES  # loss_cases.py: shared by every backend and by benchmarks/gpu_acceptance.py


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_float64_reference(name):
    seed = torch.randint(0, 2**31 - 1, ()).item()  # fresh inputs every run
    case = make_case(seed=seed, **CASES[name])
    try:
        assert_matches_reference_fp32(case, "native")
    except AssertionError as exc:
        raise AssertionError(f"seed {seed}: {exc}") from exc


@pytest.mark.parametrize("chunk_size", [1, 3, 16])
def test_chunking_does_not_change_the_result(chunk_size):
    """Many chunks (including a ragged last one) give what one chunk gives."""
    case = make_case([17, 4, 25, 1], 20, 97, seed=torch.randint(0, 2**31 - 1, ()).item(), kl_coef=0.3)
    from oreal.ops.loss import oreal_token_coefficients
    from oreal.ops.token_weights import token_rm_weights

    weights = token_rm_weights(case.rm_scores, case.labels, case.cu_seqlens, case.is_positive)
    pg_coef, kl_weight = oreal_token_coefficients(case.labels, case.cu_seqlens, case.advantages, case.is_positive,
                                                  weights, kl_coef=0.3, pos_coef=1.0, neg_coef=0.5)
    results = []
    for size in (None, chunk_size):
        hidden = case.hidden.clone().requires_grad_()
        weight = case.weight.clone().requires_grad_()
        loss, logprobs, entropy = native.linear_logprob_loss(hidden, weight, case.labels, pg_coef,
                                                             case.ref_logprobs, kl_weight, 1.0, size)
        loss.backward()
        results.append((loss.detach(), logprobs, entropy, hidden.grad, weight.grad))
    for whole, chunked in zip(*results):
        assert torch.allclose(chunked, whole, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", sorted(LOW_PRECISION_CASES))
def test_low_precision_within_twice_plain_torch(dtype, name):
    assert_low_precision_within_twice_plain(name, "native", dtype, torch.randint(0, 2**31 - 5, ()).item())


def test_fp16_gradients_survive_large_token_counts_under_loss_scaling():
    """The C++ kernel stores the fp16 logit gradient through the same header code as the CUDA kernel
    (csrc/grad_store.h): this CPU test proves the CUDA store logic."""
    assert_fp16_survives_large_token_counts("native", torch.randint(0, 2**31 - 5, ()).item())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_upstream_gradient_is_applied_in_fp32(dtype):
    assert_upstream_gradient_applied_in_fp32("native", dtype, torch.randint(0, 2**31 - 5, ()).item())


def test_low_precision_outputs_keep_input_dtypes():
    case = make_case([6, 5], 16, 77, seed=1)
    out, grad_hidden, grad_weight = run_fused(case, "native", torch.bfloat16)
    assert out.loss.dtype == out.logprobs.dtype == out.entropy.dtype == torch.float32
    assert grad_hidden.dtype == grad_weight.dtype == torch.bfloat16


def test_gradient_scales_with_upstream_gradient():
    """Backward scales the gradients computed in forward (in place) by the incoming gradient."""
    case = make_case([8, 5], 10, 33, seed=2)
    _, grad_hidden, grad_weight = run_fused(case, "native")
    hidden, weight, *rest = case.args()
    hidden.requires_grad_()
    weight.requires_grad_()
    from oreal import fused_oreal_loss

    out = fused_oreal_loss(hidden, weight, *rest, backend="native")
    (-2.5 * out.loss).backward()
    assert torch.allclose(hidden.grad, -2.5 * grad_hidden, rtol=1e-6, atol=1e-9)
    assert torch.allclose(weight.grad, -2.5 * grad_weight, rtol=1e-6, atol=1e-9)


def test_second_backward_through_the_same_graph_is_refused():
    case = make_case([8, 5], 10, 33, seed=3)
    hidden, weight, *rest = case.args()
    hidden.requires_grad_()
    from oreal import fused_oreal_loss

    out = fused_oreal_loss(hidden, weight, *rest, backend="native")
    out.loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.loss.backward()


def test_only_the_requested_gradients_are_computed():
    case = make_case([9, 4], 12, 41, seed=4)
    _, grad_hidden, grad_weight = run_fused(case, "native")
    hidden, weight, *rest = case.args()
    from oreal import fused_oreal_loss

    weight.requires_grad_()
    fused_oreal_loss(hidden, weight, *rest, backend="native").loss.backward()
    assert hidden.grad is None and torch.allclose(weight.grad, grad_weight, rtol=1e-6, atol=1e-9)
    weight.requires_grad_(False)
    hidden.requires_grad_()
    fused_oreal_loss(hidden, weight, *rest, backend="native").loss.backward()
    assert torch.allclose(hidden.grad, grad_hidden, rtol=1e-6, atol=1e-9)


def test_no_grad_gives_the_same_logprobs_and_loss():
    case = make_case([9, 4, 11], 12, 41, seed=5)
    out, _, _ = run_fused(case, "native")
    from oreal import fused_oreal_loss

    with torch.no_grad():
        plain = fused_oreal_loss(*case.args(), backend="native", **case.options)
    assert not plain.loss.requires_grad
    assert torch.allclose(plain.loss, out.loss.detach(), rtol=1e-6)
    assert torch.equal(plain.logprobs, out.logprobs) and torch.equal(plain.entropy, out.entropy)


def test_float64_inputs_keep_float64_accuracy():
    """fp64 goes through the fp64 torch path (gradcheck-grade), not the fp32 kernels."""
    case = make_case([4, 1, 5], 6, 11, seed=11, kl_coef=0.3, temperature=0.8)
    out, grad_hidden, grad_weight = run_fused(case, "native", torch.float64)
    _, ref_lp, ref_ent, _, _, _ = run_reference(case)
    assert out.loss.dtype == torch.float64
    # log-probs and entropies do not go through the fp32 loss coefficients: fp64-exact
    assert (out.logprobs - ref_lp).abs().max() < 1e-12 and (out.entropy - ref_ent).abs().max() < 1e-12
    # the loss and gradients differ from the torch backend's only through the fp32 token-RM weights
    torch_out, torch_gh, torch_gw = run_fused(case, "torch", torch.float64)
    assert torch.allclose(out.loss, torch_out.loss, rtol=1e-6)
    assert relative_error(grad_hidden, torch_gh) < 1e-6 and relative_error(grad_weight, torch_gw) < 1e-6


def test_as_accurate_as_the_torch_backend():
    """On one larger batch, native's errors vs float64 are within 2x of the torch backend's."""
    case = make_case([300, 41, 180], 96, 4099, seed=torch.randint(0, 2**31 - 1, ()).item(), kl_coef=0.1)
    _, _, _, ref_gh, ref_gw, _ = run_reference(case)
    errors = {}
    for backend in ("torch", "native"):
        _, grad_hidden, grad_weight = run_fused(case, backend)
        errors[backend] = (relative_error(grad_hidden, ref_gh), relative_error(grad_weight, ref_gw))
    for ours, theirs in zip(errors["native"], errors["torch"]):
        assert ours < FP32_GRAD_RTOL and ours <= 2 * theirs + 1e-7, errors
