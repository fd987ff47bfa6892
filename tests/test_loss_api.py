"""Public API of the fused loss: input validation, backend selection, the module wrapper, helpers."""

import pytest
import torch

import oreal
from loss_cases import make_case, run_reference, scalar_relative_error
from oreal_reference import reference_token_weights


def _args(**overrides):
    case = make_case([5, 3, 4], 8, 29, seed=1)
    args = dict(zip(["hidden", "weight", "labels", "cu_seqlens", "advantages", "is_positive", "rm_scores",
                     "ref_logprobs"], case.args()))
    args.update(overrides)
    return args


def _call(backend="torch", **overrides):
    args = _args(**{k: v for k, v in overrides.items() if k not in ("kl_coef", "temperature", "pos_tokens")})
    options = {k: v for k, v in overrides.items() if k in ("kl_coef", "temperature", "pos_tokens")}
    return oreal.fused_oreal_loss(**args, **options, backend=backend)


BAD_INPUTS = {
    "hidden": dict(hidden=torch.randn(12)),
    "weight": dict(weight=torch.randn(29, 9)),
    "labels": dict(labels=torch.full((12,), 29)),
    "cu_seqlens": dict(cu_seqlens=torch.tensor([1, 5, 8, 12], dtype=torch.int32)),
    "advantages": dict(advantages=torch.randn(4)),
    "is_positive": dict(is_positive=torch.ones(2, dtype=torch.bool)),
    "rm_scores": dict(rm_scores=torch.randn(11)),
    "ref_logprobs": dict(ref_logprobs=torch.randn(12, 2)),
    "temperature": dict(temperature=0.0),
    "kl_coef": dict(kl_coef=float("nan")),
    "pos_tokens": dict(pos_tokens=-3),
}


@pytest.mark.parametrize("name", sorted(BAD_INPUTS))
def test_bad_input_names_the_argument(name):
    with pytest.raises(ValueError, match=f"^{name}:"):
        _call(**BAD_INPUTS[name])


@pytest.mark.parametrize("name, value, message", [
    ("pos_tokens", torch.tensor(float("nan")), "finite non-negative count, got nan"),
    ("pos_tokens", torch.tensor([-2]), "finite non-negative count, got -2"),
    ("pos_tokens", torch.tensor(float("inf")), "finite non-negative count, got inf"),
    ("pos_tokens", torch.tensor(True), "dtype bool is not a count"),
    ("pos_tokens", torch.tensor([3, 4]), "expected one element"),
    ("neg_tokens", torch.tensor(float("nan")), "finite non-negative count"),
    ("kl_coef", True, "must be a finite number, got True"),
    ("pos_coef", False, "must be a finite number, got False"),
    ("temperature", True, "must be a positive finite number, got True"),
    ("temperature", float("inf"), "must be a positive finite number, got inf"),
])
def test_counts_given_as_tensors_and_bool_coefficients_are_refused(name, value, message):
    args = _args()
    with pytest.raises(ValueError, match=f"^{name}: .*{message}"):
        oreal.fused_oreal_loss(**args, **{name: value}, backend="torch")


def test_counts_given_as_tensors_equal_counts_given_as_ints():
    args = _args()
    as_ints = oreal.fused_oreal_loss(**args, pos_tokens=17, neg_tokens=5, backend="torch").loss
    as_tensors = oreal.fused_oreal_loss(**args, pos_tokens=torch.tensor(17), neg_tokens=torch.tensor([5.0]),
                                        backend="torch").loss
    assert torch.equal(as_ints, as_tensors)


@pytest.mark.parametrize("cu, message", [
    ([0, 5, 3, 12], "non-decreasing"),
    ([0, 5, 8, 11], "end at T=12"),
    ([2, 5, 8, 12], "start at 0"),
])
def test_cu_seqlens_errors(cu, message):
    with pytest.raises(ValueError, match=message):
        _call(cu_seqlens=torch.tensor(cu, dtype=torch.int32), advantages=torch.randn(3),
              is_positive=torch.ones(3, dtype=torch.bool))


def test_dtype_errors():
    with pytest.raises(ValueError, match="^weight: dtype"):
        _call(weight=torch.randn(29, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="^labels: dtype"):
        _call(labels=torch.zeros(12))
    with pytest.raises(ValueError, match="^hidden: dtype"):
        _call(hidden=torch.zeros(12, 8, dtype=torch.int32))


def test_negative_label_other_than_ignore_index():
    labels = torch.zeros(12, dtype=torch.long)
    labels[3] = -1
    with pytest.raises(ValueError, match="^labels: value -1"):
        _call(labels=labels)


def test_unknown_and_unavailable_backends(monkeypatch):
    with pytest.raises(ValueError, match="unknown backend 'cuda'.*torch"):
        _call(backend="cuda")
    # the kernels' conftest turns the interpreter on for the whole session: turn it off here
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="'triton' is unavailable on cpu.*TRITON_INTERPRET=1.*Available here: torch"):
        _call(backend="triton")


def test_auto_backend_runs_on_cpu():
    auto = _call(backend="auto")
    torch_out = _call(backend="torch")
    assert torch.allclose(auto.loss, torch_out.loss, rtol=1e-5)


def test_module_wrapper_passes_every_option_on():
    # Against the float64 reference with non-default options: a wrapper that dropped or swapped
    # one of them would give a different loss.
    options = dict(kl_coef=0.05, pos_coef=0.8, neg_coef=0.3, temperature=0.9)
    case = make_case([6, 7, 3], 10, 31, seed=torch.randint(0, 10**6, ()).item(), **options)
    module = oreal.OrealLoss(**options, backend="torch")
    assert "kl_coef=0.05" in repr(module)
    out = module(*case.args())
    reference = run_reference(case)[0]
    assert isinstance(out, oreal.LossOutput)
    assert scalar_relative_error(out.loss, reference) < 1e-5
    default = oreal.OrealLoss(backend="torch")(*case.args())
    assert scalar_relative_error(default.loss, reference) > 1e-3  # the options matter on this case


def test_token_rm_weights_match_reference():
    case = make_case([9, 1, 0, 14, 5], 4, 11, seed=torch.randint(0, 10**6, ()).item(), empty_seq=3)
    weights = oreal.token_rm_weights(case.rm_scores, case.labels, case.cu_seqlens, case.is_positive, backend="torch")
    expected = reference_token_weights(case.rm_scores, case.labels, case.cu_seqlens, case.is_positive)
    assert weights.dtype == torch.float32
    assert torch.allclose(weights.double(), expected, atol=1e-6)
    assert (weights[case.labels == -100] == 0).all() and (weights >= 0).all() and (weights <= 1).all()


def test_token_rm_weights_long_sequence_precision():
    """A 100k-token row: the segmented prefix sums must not lose the later sequences' precision."""
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(100_000, generator=g) * 3 + 5
    labels = torch.zeros(100_000, dtype=torch.long)
    cu = torch.tensor([0, 99_990, 100_000], dtype=torch.int32)
    positive = torch.tensor([True, False])
    weights = oreal.token_rm_weights(scores, labels, cu, positive, backend="torch")
    tail = scores[99_990:].double().cumsum(0) / torch.arange(1, 11, dtype=torch.float64)
    expected = (1 - 2 * torch.sigmoid(tail)).clamp(0, 1)
    assert torch.allclose(weights[99_990:].double(), expected, atol=1e-6)


def test_rloo_advantages():
    rewards = torch.tensor([1.0, -1.0, -1.0, -1.0, 1.0, 1.0, 1.0])
    groups = torch.tensor([7, 7, 7, 7, 3, 3, 9])
    adv = oreal.rloo_advantages(rewards, groups)
    # group 7: r=[1,-1,-1,-1]; A_0 = 1 - (-1) = 2; A_1 = -1 - (1-1-1)/3 = -1 + 1/3
    expected = torch.tensor([2.0, -2 / 3, -2 / 3, -2 / 3, 0.0, 0.0, 0.0])
    assert torch.allclose(adv, expected)
    random_rewards = torch.where(torch.rand(64) < 0.4, 1.0, -1.0)
    random_groups = torch.arange(64) // 8
    adv = oreal.rloo_advantages(random_rewards, random_groups)
    for g in range(8):
        r = random_rewards[g * 8:(g + 1) * 8]
        for k in range(8):
            others = torch.cat([r[:k], r[k + 1:]])
            assert torch.isclose(adv[g * 8 + k], r[k] - others.mean(), atol=1e-6)
    with pytest.raises(ValueError, match="1-D"):
        oreal.rloo_advantages(torch.ones(3), torch.ones(4))
