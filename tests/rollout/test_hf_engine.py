"""The transformers engine process: sampling options, ordering, finish reasons, sampler log-probs."""

import pytest
import torch
from rollout_testlib import greedy_reference, tiny_model

from oreal.rollout import SamplingParams, WeightSyncer


@pytest.fixture(scope="module")
def policy(hf_engine, engine_config):
    """A fresh trainer model, synced into the shared engine."""
    model = tiny_model(engine_config, seed=7)
    WeightSyncer(model, hf_engine, bucket_bytes=1 << 20).sync()
    return model


def processed_logprobs(logits: torch.Tensor, s: SamplingParams) -> torch.Tensor:
    """The sampler's distribution as transformers builds it: temperature, then top-k, then top-p."""
    scores = logits.float() / s.temperature
    if s.top_k:
        kth = torch.topk(scores, s.top_k).values[..., -1, None]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if s.top_p < 1:
        sorted_scores, order = torch.sort(scores, descending=False)
        cum = sorted_scores.softmax(-1).cumsum(-1)
        remove = cum <= 1 - s.top_p
        remove[..., -1] = False
        scores = scores.masked_fill(remove.scatter(-1, order, remove), float("-inf"))
    return torch.log_softmax(scores, -1)


@torch.no_grad()
def test_sampling_order_finish_reasons_and_sampler_logprobs(hf_engine, policy):
    prompts = [[5], [1, 2, 3, 4], [9, 8, 7, 6], [11, 12, 13, 14, 15, 16, 17]]
    sampling = SamplingParams(temperature=0.7, top_k=20, top_p=0.9, max_new_tokens=6,
                              stop_token_ids=(3, 50), seed=11)
    rollouts = hf_engine.generate(prompts, n=3, sampling=sampling)

    assert [(r.prompt_index, r.sample_index) for r in rollouts] == [(i, j) for i in range(4) for j in range(3)]
    for r in rollouts:
        assert 1 <= len(r.token_ids) <= 6 and len(r.logprobs) == len(r.token_ids)
        stops = [t in (3, 50) for t in r.token_ids]
        if r.finish_reason == "stop":
            assert stops[-1] and not any(stops[:-1])
        else:
            assert r.finish_reason == "length" and len(r.token_ids) == 6 and not any(stops)
        assert r.weights_version >= 1
        # Log-probs are those of the processed distribution the sampler drew from.
        ids = torch.tensor([prompts[r.prompt_index] + r.token_ids])
        logits = policy(input_ids=ids).logits[0, len(prompts[r.prompt_index]) - 1:-1]
        ref = processed_logprobs(logits, sampling).gather(-1, torch.tensor(r.token_ids)[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(r.logprobs), ref, atol=2e-4, rtol=0)
        assert all(lp > float("-inf") for lp in r.logprobs)
    assert len({tuple(r.token_ids) for r in rollouts}) > 4, "samples should differ"


def test_greedy_equals_reference_and_stops_on_stop_token(hf_engine, policy):
    prompts = [[1, 2, 3], [40, 41, 42], [7, 7, 7, 7, 7]]
    out = hf_engine.generate(prompts, n=2, sampling=SamplingParams(temperature=0, max_new_tokens=8))
    ref_tokens, ref_lp = greedy_reference(policy, prompts, 8)
    for r in out:
        assert r.token_ids == ref_tokens[r.prompt_index]
        assert r.finish_reason == "length"
        torch.testing.assert_close(torch.tensor(r.logprobs), torch.tensor(ref_lp[r.prompt_index]), atol=1e-4, rtol=0)

    stop = ref_tokens[0][2]
    first = ref_tokens[0].index(stop)
    cut = hf_engine.generate(prompts[:1], n=1, sampling=SamplingParams(temperature=0, max_new_tokens=8,
                                                                        stop_token_ids=(stop,)))
    assert cut[0].token_ids == ref_tokens[0][:first + 1] and cut[0].finish_reason == "stop"


def test_seed_makes_sampling_reproducible(hf_engine, policy):
    prompts = [[1, 2], [3, 4], [5, 6, 7]]
    s = SamplingParams(temperature=1.0, max_new_tokens=8, seed=5)
    a = hf_engine.generate(prompts, n=2, sampling=s)
    b = hf_engine.generate(prompts, n=2, sampling=s)
    c = hf_engine.generate(prompts, n=2, sampling=SamplingParams(temperature=1.0, max_new_tokens=8, seed=6))
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    assert [r.logprobs for r in a] == [r.logprobs for r in b]
    assert [r.token_ids for r in a] != [r.token_ids for r in c]


def test_bad_requests_raise_clear_errors(hf_engine):
    with pytest.raises(ValueError, match="prompt_token_ids\\[1\\] is empty"):
        hf_engine.generate([[1], []], n=1)
    with pytest.raises(ValueError, match="n must be"):
        hf_engine.generate([[1]], n=0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    assert hf_engine.ping()["dirty"] is None  # still healthy
