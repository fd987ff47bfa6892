"""The torch backend of `fused_oreal_loss` against the independent float64 reference."""

import pytest
import torch

from loss_cases import (FP32_CASES, LOW_PRECISION_CASES, assert_fp16_survives_large_token_counts,
                        assert_low_precision_within_twice_plain, assert_matches_reference_fp32,
                        assert_upstream_gradient_applied_in_fp32, make_case, run_fused)
from oreal.ops import torch_backend

CASES = FP32_CASES  # loss_cases.py: shared by every backend and by benchmarks/gpu_acceptance.py


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_float64_reference(name):
    seed = torch.randint(0, 2**31 - 1, ()).item()  # fresh inputs every run; printed on failure
    case = make_case(seed=seed, **CASES[name])
    assert_matches_reference_fp32(case, "torch")


def test_many_chunks_match_one_chunk(monkeypatch):
    case = make_case([17, 4, 25, 1], 20, 97, seed=3, kl_coef=0.3)
    whole, gh_whole, gw_whole = run_fused(case, "torch")
    monkeypatch.setattr(torch_backend, "CHUNK_ELEMENTS", 97 * 5)  # 5 tokens a chunk -> 10 chunks
    chunked, gh, gw = run_fused(case, "torch")
    assert torch.allclose(chunked.loss, whole.loss, rtol=1e-6)
    assert torch.allclose(gh, gh_whole, rtol=1e-5, atol=1e-7)
    assert torch.allclose(gw, gw_whole, rtol=1e-5, atol=1e-7)
    assert_matches_reference_fp32(case, "torch")


def test_tensor_counts_equal_int_counts():
    case = make_case([10, 3, 4], 12, 57, seed=5, pos_tokens=40, neg_tokens=31)
    as_int, _, _ = run_fused(case, "torch")
    case.options.update(pos_tokens=torch.tensor(40), neg_tokens=torch.tensor([31.0]))
    as_tensor, _, _ = run_fused(case, "torch")
    assert torch.equal(as_int.loss, as_tensor.loss)


def test_zero_counts_contribute_nothing():
    case = make_case([6, 9], 12, 57, seed=9, polarity=True, with_ref=False)
    out, grad_hidden, _ = run_fused(case, "torch")
    assert out.loss != 0
    case.options.update(pos_tokens=0)
    out, grad_hidden, grad_weight = run_fused(case, "torch")
    assert out.loss == 0 and grad_hidden.abs().max() == 0 and grad_weight.abs().max() == 0


def test_gradcheck_float64():
    case = make_case([4, 1, 5], 6, 11, seed=11, kl_coef=0.3, temperature=0.8)
    hidden, weight, *rest = case.args(torch.float64)
    from oreal import fused_oreal_loss

    def loss_fn(h, w):
        return fused_oreal_loss(h, w, *rest, backend="torch", **case.options).loss

    assert torch.autograd.gradcheck(loss_fn, (hidden.requires_grad_(), weight.requires_grad_()), eps=1e-6, atol=1e-6)


def test_gradient_scales_with_upstream_gradient():
    case = make_case([8, 5], 10, 33, seed=2)
    hidden, weight, *rest = case.args()
    hidden.requires_grad_()
    from oreal import fused_oreal_loss

    out = fused_oreal_loss(hidden, weight, *rest, backend="torch")
    (3.0 * out.loss).backward()
    _, gh, _ = run_fused(case, "torch")
    assert torch.allclose(hidden.grad, 3.0 * gh, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", sorted(LOW_PRECISION_CASES))
def test_low_precision_no_worse_than_plain_torch(dtype, name):
    assert_low_precision_within_twice_plain(name, "torch", dtype, torch.randint(0, 2**31 - 5, ()).item())


def test_fp16_gradients_survive_large_token_counts_under_loss_scaling():
    assert_fp16_survives_large_token_counts("torch", torch.randint(0, 2**31 - 5, ()).item())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_upstream_gradient_is_applied_in_fp32(dtype):
    assert_upstream_gradient_applied_in_fp32("torch", dtype, torch.randint(0, 2**31 - 5, ()).item())


def test_outputs_are_detached_and_shaped():
    case = make_case([8, 5], 10, 33, seed=4)
    out, _, _ = run_fused(case, "torch")
    assert out.loss.dim() == 0
    assert out.logprobs.shape == out.entropy.shape == (13,)
    assert not out.logprobs.requires_grad and not out.entropy.requires_grad
    action = case.labels != -100
    assert (out.logprobs[action] <= 0).all() and (out.entropy[action] >= 0).all()


def test_plain_relative_error_without_cancellation():
    """Issue 2's literal bound (loss relative error < 1e-5) on a batch whose terms share one sign."""
    from loss_cases import run_reference, scalar_relative_error

    for seed in range(5):
        case = make_case([30, 12, 41], 24, 301, seed=seed, polarity=True, with_ref=False)
        out, _, _ = run_fused(case, "torch")
        assert scalar_relative_error(out.loss.detach(), run_reference(case)[0]) < 1e-5


class _CountMatmuls(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the matrix products the backend runs (logits, grad hidden, grad weight)."""

    MATMULS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.addmm_.default}

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func in self.MATMULS
        return func(*args, **(kwargs or {}))


def test_no_gradient_work_under_no_grad():
    """Under torch.no_grad() (old and reference log-prob passes) only the logits are formed, even for
    inputs that require grad; the log-probs are the same as with gradients."""
    from oreal import fused_oreal_loss

    case = make_case([9, 4], 12, 41, seed=torch.randint(0, 2**31 - 1, ()).item())
    hidden, weight, *rest = case.args()
    hidden, weight = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    counts = {}
    for mode in ("grad", "no_grad"):
        with torch.set_grad_enabled(mode == "grad"), _CountMatmuls() as counter:
            counts[mode] = (fused_oreal_loss(hidden, weight, *rest, backend="torch"), counter.count)
    (with_grad, full), (without, logits_only) = counts["grad"], counts["no_grad"]
    assert (full, logits_only) == (3, 1)  # one chunk: logits, then dz @ W and dz^T @ h
    assert not without.loss.requires_grad
    assert torch.equal(without.logprobs, with_grad.logprobs) and torch.equal(without.loss, with_grad.loss.detach())


def test_second_backward_through_the_same_graph_is_refused():
    """Backward scales the saved gradients in place: a second one must fail loudly, not answer wrong."""
    case = make_case([8, 5], 10, 33, seed=3)
    hidden, weight, *rest = case.args()
    hidden.requires_grad_()
    from oreal import fused_oreal_loss

    out = fused_oreal_loss(hidden, weight, *rest, backend="torch")
    out.loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.loss.backward()
