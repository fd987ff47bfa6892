"""The torch.library ops of oreal._C: input checks, token-RM weights, fake impls, torch.compile."""

import pytest
import torch

from loss_cases import make_case
from oreal.ops import native
from oreal_reference import reference_token_weights

_REASON = native.unavailable_reason(torch.device("cpu"))
if _REASON is not None:
    pytest.skip(f"native backend not built: {_REASON}", allow_module_level=True)

OPS = torch.ops.oreal_native


def _fwd_args(T=6, H=4, V=9, **override):
    g = torch.Generator().manual_seed(0)
    args = dict(hidden=torch.randn(T, H, generator=g), weight=torch.randn(V, H, generator=g),
                labels=torch.randint(0, V, (T,), generator=g), pg_coef=torch.randn(T, generator=g),
                ref_logprobs=-torch.rand(T, generator=g), kl_weight=torch.tensor(0.1), temperature=1.0,
                chunk_size=0, grad_hidden=True, grad_weight=True)
    args.update(override)
    return args


@pytest.mark.parametrize("override, error, message", [
    (dict(hidden=torch.randn(6)), RuntimeError, "hidden must be"),
    (dict(weight=torch.randn(9, 5)), RuntimeError, "does not match hidden's hidden size"),
    (dict(weight=torch.randn(0, 4)), RuntimeError, "empty vocabulary"),
    (dict(weight=torch.randn(9, 4, dtype=torch.float64)), TypeError, "weight dtype"),
    (dict(hidden=torch.randn(6, 4, dtype=torch.float64), weight=torch.randn(9, 4, dtype=torch.float64)),
     TypeError, "hidden dtype"),
    (dict(labels=torch.zeros(5, dtype=torch.long)), RuntimeError, "labels must have 6 entries"),
    (dict(labels=torch.zeros(6)), TypeError, "labels must be int32 or int64"),
    (dict(labels=torch.tensor([0, 1, 2, 9, 0, 1])), ValueError, r"labels: value 9 at position 3 is outside \[0, 9\)"),
    (dict(labels=torch.tensor([0, -5, 2, 1, 0, 1])), ValueError, "labels: value -5"),
    (dict(pg_coef=torch.zeros(6, dtype=torch.float64)), TypeError, "pg_coef must be float32"),
    (dict(ref_logprobs=torch.zeros(7)), RuntimeError, "ref_logprobs must have 6 entries"),
    (dict(kl_weight=torch.zeros(2)), RuntimeError, "kl_weight must hold one value"),
    (dict(temperature=0.0), ValueError, "temperature must be a positive number"),
    (dict(temperature=float("nan")), ValueError, "temperature must be a positive number"),
    (dict(chunk_size=-1), ValueError, "chunk_size must be >= 0"),
])
def test_linear_logprob_checks_raise(override, error, message):
    with pytest.raises(error, match=message):
        OPS.linear_logprob_loss_fwd(**_fwd_args(**override))


@pytest.mark.parametrize("args, error, message", [
    ((torch.randn(4, 1), torch.zeros(4, dtype=torch.long), torch.tensor([0, 4]), torch.tensor([True])),
     RuntimeError, "rm_scores must be a 1-D tensor"),
    ((torch.randn(4), torch.zeros(3, dtype=torch.long), torch.tensor([0, 4]), torch.tensor([True])),
     RuntimeError, "labels must have 4 entries"),
    ((torch.randn(4), torch.zeros(4, dtype=torch.long), torch.tensor([0, 4]), torch.tensor([True, False])),
     RuntimeError, "is_positive must have 1 entries"),
    ((torch.randn(4), torch.zeros(4, dtype=torch.long), torch.tensor([0, 3]), torch.tensor([True])),
     ValueError, "must end at T=4"),
    ((torch.randn(4), torch.zeros(4, dtype=torch.long), torch.tensor([1, 4]), torch.tensor([True])),
     ValueError, "must start at 0"),
    ((torch.randn(4), torch.zeros(4, dtype=torch.long), torch.tensor([0, 3, 2, 4]),
      torch.tensor([True, False, True])), ValueError, "non-decreasing"),
    ((torch.randn(4), torch.zeros(4, dtype=torch.long), torch.tensor([0.0, 4.0]), torch.tensor([True])),
     TypeError, "cu_seqlens must be int32 or int64"),
])
def test_token_rm_weights_checks_raise(args, error, message):
    with pytest.raises(error, match=message):
        OPS.token_rm_weights(*args)


@pytest.mark.parametrize("seq_lens, empty_seq", [([7, 1, 13, 0, 30], None), ([1], None), ([5, 9, 2], 1),
                                                 ([300, 1, 257], None)])
def test_token_rm_weights_match_reference(seq_lens, empty_seq):
    case = make_case(seq_lens, 4, 11, seed=torch.randint(0, 2**31 - 1, ()).item(), empty_seq=empty_seq)
    expected = reference_token_weights(case.rm_scores, case.labels, case.cu_seqlens, case.is_positive)
    got = native.token_rm_weights(case.rm_scores, case.labels, case.cu_seqlens, case.is_positive)
    assert got.dtype == torch.float32 and got.shape == case.labels.shape
    assert torch.allclose(got.double(), expected, atol=1e-6, rtol=1e-5)
    assert (got[case.labels == -100] == 0).all()
    # other index and flag dtypes, and bf16 scores, give the same weights (up to the bf16 rounding)
    same = native.token_rm_weights(case.rm_scores, case.labels.int(), case.cu_seqlens.long(), case.is_positive.int())
    assert torch.equal(same, got)
    rounded = case.rm_scores.bfloat16()
    low = native.token_rm_weights(rounded, case.labels, case.cu_seqlens, case.is_positive)
    assert torch.allclose(low.double(), reference_token_weights(rounded.float(), case.labels, case.cu_seqlens,
                                                                case.is_positive), atol=1e-6)


def test_token_rm_weights_through_the_public_api():
    from oreal import token_rm_weights

    case = make_case([12, 6], 4, 11, seed=7)
    expected = reference_token_weights(case.rm_scores, case.labels, case.cu_seqlens, case.is_positive)
    got = token_rm_weights(case.rm_scores, case.labels, case.cu_seqlens, case.is_positive, backend="native")
    assert torch.allclose(got.double(), expected, atol=1e-6)


def test_opcheck_fake_impls_and_autograd_registration():
    """torch.library.opcheck: schema, fake (meta) impls against the real kernels, autograd, AOT tracing."""
    args = _fwd_args(T=13, H=8, V=37)
    args["hidden"].requires_grad_()
    args["weight"].requires_grad_()
    args["chunk_size"] = 5
    torch.library.opcheck(OPS.linear_logprob_loss_fwd.default, tuple(args.values()))
    case = make_case([7, 1, 5], 4, 11, seed=3)
    torch.library.opcheck(OPS.token_rm_weights.default,
                          (case.rm_scores, case.labels, case.cu_seqlens, case.is_positive))


def test_torch_compile_fullgraph_traces_through():
    """torch.compile(fullgraph=True) traces the ops (via their fake impls) with no graph break, and the
    compiled function gives the eager loss and gradients."""
    case = make_case([9, 4, 11], 12, 41, seed=8, kl_coef=0.2)
    pg_coef = torch.randn(case.labels.numel()) * (case.labels != -100)
    kl_weight = torch.tensor(0.05)

    def step(hidden, weight):
        loss, logprobs, entropy = native.linear_logprob_loss(hidden, weight, case.labels, pg_coef,
                                                             case.ref_logprobs, kl_weight, 0.9, 7)
        return 2.0 * loss, logprobs, entropy

    results = []
    for fn in (step, torch.compile(step, fullgraph=True, backend="aot_eager")):
        hidden = case.hidden.clone().requires_grad_()
        weight = case.weight.clone().requires_grad_()
        loss, logprobs, entropy = fn(hidden, weight)
        loss.backward()
        results.append((loss.detach(), logprobs, entropy, hidden.grad, weight.grad))
    for eager, compiled in zip(*results):
        assert torch.allclose(compiled, eager, rtol=1e-6, atol=1e-8)


def test_unavailable_reason_names_the_device():
    assert native.unavailable_reason(torch.device("cpu")) is None
    assert "meta" in native.unavailable_reason(torch.device("meta"))
    if not native._C.with_cuda:
        assert "without CUDA" in native.unavailable_reason(torch.device("cuda"))


def test_stored_gradient_bits_round_like_torch():
    """csrc/grad_store.h's host conversions (the CPU kernel's 16-bit store; the CUDA kernel uses the
    intrinsics) round to nearest even exactly as torch does, subnormals, overflow and ties included."""
    from oreal import _C

    g = torch.Generator().manual_seed(torch.randint(0, 2**31 - 1, ()).item())
    magnitudes = 10.0 ** torch.randint(-10, 6, (6000,), generator=g).float()
    values = torch.randn(6000, generator=g) * magnitudes
    special = [0.0, -0.0, 1.0, -2.5, 65504.0, 65519.0, 65520.0, 65536.0, 1e30, -1e30, float("inf"), float("-inf"),
               2.0 ** -24, 2.0 ** -25, 1.5 * 2.0 ** -25, 2.0 ** -26, 2.0 ** -14, 2.0 ** -14 * (1 - 2.0 ** -11),
               3 * 2.0 ** -25, 1e-40, 1.00390625, 1.01171875, 3.4e38]
    values = torch.cat([values, torch.tensor(special), -torch.tensor(special)])
    for half, dtype in ((False, torch.bfloat16), (True, torch.float16)):
        bits = torch.tensor(_C.lowp_store_bits(values.tolist(), half), dtype=torch.int32)
        expected = values.to(dtype).view(torch.int16).to(torch.int32) & 0xFFFF
        assert torch.equal(bits, expected), (dtype, values[bits != expected][:5])
    nan_bits = _C.lowp_store_bits([float("nan")] * 5, True) + _C.lowp_store_bits([float("nan")] * 5, False)
    assert torch.tensor([b & 0x7FFF for b in nan_bits]).gt(0x7C00).all()
