"""The segmented-scan Triton kernel for OREAL's token-RM weights against the float64 reference."""

import pytest
import torch

import oreal
from oreal.ops.token_weights import token_rm_weights as torch_token_rm_weights
from oreal_kernels import token_rm_weights
from oreal_reference import reference_token_weights


def packed_batch(seq_lens, *, seed, ignore_fraction=0.3, all_ignored=(), cu_dtype=torch.int32):
    g = torch.Generator().manual_seed(seed)
    total = sum(seq_lens)
    scores = torch.randn(total, generator=g) * 2
    labels = torch.randint(0, 1000, (total,), generator=g)
    labels[torch.rand(total, generator=g) < ignore_fraction] = -100
    cu = [0]
    for length in seq_lens:
        cu.append(cu[-1] + length)
    for i in all_ignored:
        labels[cu[i]:cu[i + 1]] = -100
    positive = torch.rand(len(seq_lens), generator=g) < 0.5
    return scores, labels, torch.tensor(cu, dtype=cu_dtype), positive


def fresh_seed() -> int:
    return torch.randint(0, 2**31 - 1, ()).item()


@pytest.mark.parametrize("cu_dtype", [torch.int32, torch.int64])
def test_matches_float64_reference_over_odd_sequences(cu_dtype):
    """Empty, length-1, all-ignored and multi-block (> 1024 tokens) sequences in one packed row."""
    seq_lens = [0, 1, 2500, 7, 0, 300, 1, 1030, 5]
    scores, labels, cu, positive = packed_batch(seq_lens, seed=fresh_seed(), all_ignored=(3,), cu_dtype=cu_dtype)
    weights = token_rm_weights(scores, labels, cu, positive)
    expected = reference_token_weights(scores, labels, cu, positive)
    assert weights.dtype == torch.float32 and weights.shape == labels.shape
    assert torch.allclose(weights.double(), expected, rtol=0, atol=2e-6)
    assert (weights[labels == -100] == 0).all()
    assert (weights >= 0).all() and (weights <= 1).all()


@pytest.mark.parametrize("score_dtype", [torch.bfloat16, torch.float16])
def test_low_precision_scores_and_integer_polarity(score_dtype):
    scores, labels, cu, positive = packed_batch([40, 1, 90, 13], seed=fresh_seed())
    scores = scores.to(score_dtype)
    weights = token_rm_weights(scores, labels, cu, positive.to(torch.int64))
    expected = reference_token_weights(scores.float(), labels, cu, positive)
    assert torch.allclose(weights.double(), expected, rtol=0, atol=2e-6)


def test_public_api_matches_torch_backend():
    scores, labels, cu, positive = packed_batch([12, 0, 33, 1, 64], seed=fresh_seed(), ignore_fraction=0.5)
    weights = oreal.token_rm_weights(scores, labels, cu, positive, backend="triton")
    assert torch.allclose(weights, torch_token_rm_weights(scores, labels, cu, positive), rtol=0, atol=1e-6)


def test_all_positive_and_all_negative_are_complementary():
    """Same scores: positive weights are clamp(2q-1), negative ones clamp(1-2q), so at most one is non-zero."""
    scores, labels, cu, _ = packed_batch([20, 9, 31], seed=fresh_seed())
    pos = token_rm_weights(scores, labels, cu, torch.ones(3, dtype=torch.bool))
    neg = token_rm_weights(scores, labels, cu, torch.zeros(3, dtype=torch.bool))
    assert ((pos == 0) | (neg == 0)).all()
    action = labels != -100
    assert (pos[action] + neg[action] > 0).any()


def test_no_sequences():
    weights = token_rm_weights(torch.empty(0), torch.empty(0, dtype=torch.long), torch.zeros(1, dtype=torch.int32),
                               torch.empty(0, dtype=torch.bool))
    assert weights.shape == (0,)


def test_float64_scores_are_accepted_and_integer_scores_refused():
    scores, labels, cu, positive = packed_batch([4, 9], seed=fresh_seed())
    weights = token_rm_weights(scores.double(), labels, cu, positive)
    assert torch.allclose(weights.double(), reference_token_weights(scores, labels, cu, positive), atol=2e-6)
    with pytest.raises(ValueError, match="rm_scores: dtype torch.int64"):
        token_rm_weights(labels, labels, cu, positive)
