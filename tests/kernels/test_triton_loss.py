"""`backend="triton"` of `fused_oreal_loss` (interpreted on CPU) against the independent float64 reference."""

import pytest
import torch

from loss_cases import (FP32_CASES, LOW_PRECISION_CASES, assert_fp16_survives_large_token_counts,
                        assert_low_precision_within_twice_plain, assert_matches_reference_fp32,
                        assert_upstream_gradient_applied_in_fp32, make_case, relative_error)
from oreal.ops import backends
from oreal_kernels import linear_logprob_loss
from oreal_kernels.linear_logprob import gradient_scale

# Shapes are small: the interpreter executes every program instance in Python.
CASES = FP32_CASES  # loss_cases.py: shared by every backend and by benchmarks/gpu_acceptance.py


def fresh_seed() -> int:
    return torch.randint(0, 2**31 - 1, ()).item()  # fresh inputs every run; pytest shows it on failure


def direct_inputs(num_tokens, hidden_size, vocab_size, *, seed, dtype=torch.float32, with_ref=True):
    """Inputs of the internal op: random per-token coefficients in place of OREAL's bookkeeping."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(num_tokens, hidden_size, generator=g).to(dtype)
    weight = (torch.randn(vocab_size, hidden_size, generator=g) / hidden_size ** 0.5).to(dtype)
    labels = torch.randint(0, vocab_size, (num_tokens,), generator=g)
    labels[torch.rand(num_tokens, generator=g) < 0.25] = -100
    pg_coef = torch.where(labels >= 0, torch.randn(num_tokens, generator=g) / max(num_tokens, 1), 0.0)
    ref = -torch.rand(num_tokens, generator=g) * 6 if with_ref else None
    return hidden, weight, labels, pg_coef, ref, torch.tensor(0.03)


def direct_reference(hidden, weight, labels, pg_coef, ref, kl_weight, temperature=1.0):
    """The internal op's formula in float64 with autograd: (loss, logprobs, entropy, grad_h, grad_w)."""
    h = hidden.detach().double().requires_grad_()
    w = weight.detach().double().requires_grad_()
    log_probs = torch.log_softmax(h @ w.T / temperature, -1)
    valid = labels >= 0
    lp = log_probs.gather(1, labels.clamp(min=0)[:, None])[:, 0]
    loss = -(pg_coef.double() * lp)
    if ref is not None:
        d = ref.double() - lp
        loss = loss + kl_weight.double() * (d.exp() - d - 1)
    loss = torch.where(valid, loss, 0.0).sum()
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    gh, gw = torch.autograd.grad(loss, (h, w)) if valid.any() else (torch.zeros_like(h), torch.zeros_like(w))
    zero = torch.zeros((), dtype=torch.float64)
    return loss.detach(), torch.where(valid, lp, zero).detach(), torch.where(valid, entropy, zero).detach(), gh, gw


def test_triton_backend_is_available_under_the_interpreter():
    assert "triton" in backends.available_backends(torch.device("cpu"))


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_float64_reference(name):
    case = make_case(seed=fresh_seed(), **CASES[name])
    assert_matches_reference_fp32(case, "triton")


def test_many_chunks_match_the_reference():
    """Chunk size 7 over 101 tokens: 15 chunks, the weight gradient accumulated in fp32 across them."""
    inputs = direct_inputs(101, 40, 203, seed=fresh_seed())
    hidden, weight, *rest = inputs
    ref_loss, ref_lp, ref_ent, ref_gh, ref_gw = direct_reference(*inputs, temperature=1.3)
    for chunk in (7, None):
        h = hidden.clone().requires_grad_()
        w = weight.clone().requires_grad_()
        loss, lp, ent = linear_logprob_loss(h, w, *rest, temperature=1.3, chunk_size=chunk)
        loss.backward()
        assert abs(loss.item() - ref_loss.item()) <= 1e-5 * ref_loss.abs().item() + 1e-7
        assert torch.allclose(lp.double(), ref_lp, rtol=1e-5, atol=1e-5)
        assert torch.allclose(ent.double(), ref_ent, rtol=1e-5, atol=1e-5)
        assert relative_error(h.grad, ref_gh) < 1e-4
        assert relative_error(w.grad, ref_gw) < 1e-4


@pytest.mark.parametrize("wants", [(True, False), (False, True), (False, False)])
def test_partial_gradients(wants):
    """Only the requested gradients are formed; without any, the kernels skip the logit gradient."""
    hidden, weight, labels, pg, ref, kl = direct_inputs(19, 24, 130, seed=fresh_seed())
    ref_loss, ref_lp, _, ref_gh, ref_gw = direct_reference(hidden, weight, labels, pg, ref, kl)
    h = hidden.clone().requires_grad_(wants[0])
    w = weight.clone().requires_grad_(wants[1])
    loss, lp, _ = linear_logprob_loss(h, w, labels, pg, ref, kl)
    assert abs(loss.item() - ref_loss.item()) <= 1e-5 * ref_loss.abs().item() + 1e-7
    assert torch.allclose(lp.double(), ref_lp, rtol=1e-5, atol=1e-5)
    if any(wants):
        loss.backward()
        if wants[0]:
            assert relative_error(h.grad, ref_gh) < 1e-4
        if wants[1]:
            assert relative_error(w.grad, ref_gw) < 1e-4
    else:
        assert not loss.requires_grad


def test_no_grad_mode_skips_the_gradient_matmuls(monkeypatch):
    """Log-probs of a policy that requires grad, computed under torch.no_grad(): no gradient work."""
    from oreal_kernels import linear_logprob

    hidden, weight, labels, pg, ref, kl = direct_inputs(9, 16, 70, seed=fresh_seed())
    _, ref_lp, ref_ent, _, _ = direct_reference(hidden, weight, labels, pg, ref, kl)

    def refuse(*args, **kwargs):
        raise AssertionError("a gradient matmul was planned under torch.no_grad()")

    monkeypatch.setattr(linear_logprob, "plan_matmul_into", refuse)
    with torch.no_grad():
        loss, lp, ent = linear_logprob_loss(hidden.requires_grad_(), weight.requires_grad_(), labels, pg, ref, kl)
    assert not loss.requires_grad
    assert torch.allclose(lp.double(), ref_lp, rtol=1e-5, atol=1e-5)
    assert torch.allclose(ent.double(), ref_ent, rtol=1e-5, atol=1e-5)


def test_strided_hidden_and_upstream_gradient():
    """A row-strided view of hidden (a slice of a wider buffer) and a non-unit incoming gradient."""
    hidden, weight, labels, pg, ref, kl = direct_inputs(23, 20, 77, seed=fresh_seed())
    wide = torch.randn(23, 31)
    wide[:, 5:25] = hidden
    view = wide[:, 5:25].requires_grad_()
    _, _, _, ref_gh, ref_gw = direct_reference(hidden, weight, labels, pg, ref, kl)
    w = weight.clone().requires_grad_()
    loss, _, _ = linear_logprob_loss(view, w, labels, pg, ref, kl)
    (-2.5 * loss).backward()
    assert relative_error(view.grad, -2.5 * ref_gh) < 1e-4
    assert relative_error(w.grad, -2.5 * ref_gw) < 1e-4


def test_no_tokens():
    hidden, weight, labels, pg, ref, kl = direct_inputs(0, 8, 33, seed=1)
    h = hidden.requires_grad_()
    loss, lp, ent = linear_logprob_loss(h, weight, labels, pg, ref, kl)
    loss.backward()
    assert loss.item() == 0 and lp.shape == ent.shape == (0,) and h.grad.shape == (0, 8)


def test_float64_is_refused_with_a_clear_error():
    hidden, weight, labels, pg, ref, kl = direct_inputs(4, 8, 33, seed=2, dtype=torch.float64)
    with pytest.raises(ValueError, match="hidden: dtype torch.float64 is not supported by the Triton backend"):
        linear_logprob_loss(hidden, weight, labels, pg, ref, kl)


def test_gradient_scale_is_a_power_of_two_bounding_the_logit_gradient():
    pg = torch.tensor([3e-7, -5e-6, 0.0])
    sigma = gradient_scale(pg, torch.tensor(1e-6), 0.5)
    bound = (5e-6 + 1e-6) / 0.5
    assert 0.5 < bound * sigma.item() <= 1.0
    assert torch.log2(sigma).item() == round(torch.log2(sigma).item())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", sorted(LOW_PRECISION_CASES))
def test_low_precision_no_worse_than_plain_torch(dtype, name):
    assert_low_precision_within_twice_plain(name, "triton", dtype, fresh_seed())


def test_fp16_gradients_survive_large_token_counts_under_loss_scaling():
    assert_fp16_survives_large_token_counts("triton", fresh_seed())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_upstream_gradient_is_applied_in_fp32(dtype):
    assert_upstream_gradient_applied_in_fp32("triton", dtype, fresh_seed())


def test_out_of_range_label_gives_nan_with_value_checks_off(monkeypatch):
    """With OREAL_CHECK_VALUES=0 nothing catches a label >= V: the kernel must not read a stale logit
    (a plausible, wrong log-prob) but poison that token's outputs, as the native kernels do."""
    from oreal import fused_oreal_loss

    monkeypatch.setenv("OREAL_CHECK_VALUES", "0")
    case = make_case([6, 5], 16, 77, seed=fresh_seed())
    action = (case.labels >= 0).nonzero()[:, 0]
    bad = int(action[len(action) // 2])
    case.labels[bad] = 77 + 5
    out = fused_oreal_loss(*case.args(), backend="triton", **case.options)
    assert torch.isnan(out.loss) and torch.isnan(out.logprobs[bad]) and torch.isnan(out.entropy[bad])
    good = torch.ones_like(case.labels, dtype=torch.bool)
    good[bad] = False
    assert torch.isfinite(out.logprobs[good]).all()


@pytest.mark.parametrize("arch", [80, 90, 120])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_gpu_launch_plans_fit_their_work_space(arch, dtype):
    """The GPU launch plans (built on meta tensors, as the AOT report does) for every chunk of a batch,
    including a short last chunk, which takes more vocabulary splits: the partials must hold them, and
    the splits must cover the vocabulary exactly once. Every tile's pipeline fits the device's shared
    memory: sm_120 (consumer Blackwell) has ~99 KiB, where Hopper's 128 KiB tiles would not launch."""
    from oreal_kernels._runtime import SMEM_BYTES_BY_ARCH, DeviceInfo, cdiv
    from oreal_kernels.linear_logprob import ChunkBuffers, chunk_launches

    device = DeviceInfo(arch=arch, sm_count={80: 108, 90: 132, 120: 170}[arch])
    element = torch.empty((), dtype=dtype).element_size()

    def pipeline_bytes(launch):
        c = launch.constexprs
        m, n, k = (c["BLOCK_T"], c["BLOCK_V"], c["BLOCK_H"]) if "BLOCK_T" in c else (c["BLOCK_M"], c["BLOCK_N"],
                                                                                       c["BLOCK_K"])
        return launch.num_stages * (m * k + k * n) * element

    hidden_size, vocab_size = 3584, 152064
    meta = dict(device="meta")
    for total, chunk in ((16384, 1664), (5000, 1664), (300, 64), (1, 1), (130, 129)):
        hidden = torch.empty(total, hidden_size, dtype=dtype, **meta)
        weight = torch.empty(vocab_size, hidden_size, dtype=dtype, **meta)
        floats = [torch.empty(total, **meta) for _ in range(5)]
        scalar = torch.empty((), **meta)
        grad_weight = torch.empty(vocab_size, hidden_size, **meta)
        buffers = ChunkBuffers(chunk, vocab_size, hidden_size, dtype, "meta", device)
        for start in range(0, total, chunk):
            part = slice(start, min(start + chunk, total))
            launches = chunk_launches(hidden[part], weight, floats[0][part].long(), floats[1][part], floats[2][part],
                                      scalar, scalar, tuple(f[part] for f in floats[2:]),
                                      (hidden[part], grad_weight), buffers, 1.0, device, first_chunk=start == 0)
            fwd = launches[0]
            tokens = part.stop - part.start
            token_blocks = cdiv(tokens, fwd.constexprs["BLOCK_T"])
            splits = fwd.grid[0] // token_blocks
            span = fwd.args["blocks_per_split"] * fwd.constexprs["BLOCK_V"]
            assert splits <= buffers.partials.shape[1]
            assert (splits - 1) * span < vocab_size <= splits * span
            assert launches[1].args["num_splits"] == splits
            assert [launch.name for launch in launches] == ["logits_lse_fwd", "softmax_grad", "grad_hidden",
                                                            "grad_weight"]
            for launch in (launches[0], *launches[2:]):
                assert pipeline_bytes(launch) <= SMEM_BYTES_BY_ARCH[arch] - (4 << 10), (launch.name, arch)
                assert launch.num_stages >= 2
