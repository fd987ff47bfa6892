"""The transformers engine batches a request's prompts of different lengths into few `generate` calls
(left-padded length buckets), and still returns exactly n samples per prompt, in prompt order, each
sampled from its own prompt."""

import random

import pytest
import torch
from rollout_testlib import greedy_reference, tiny_config

from oreal.rollout.hf import HFBackend, length_buckets
from oreal.rollout.types import SamplingParams


def check_buckets(buckets, lengths, *, rows_per_prompt, max_rows, new_tokens, max_padding):
    flat = [i for b in buckets for i in b]
    assert sorted(flat) == list(range(len(lengths))), "every prompt in exactly one bucket"
    for b in buckets:
        assert [lengths[i] for i in b] == sorted(lengths[i] for i in b)
        if len(b) > 1:
            assert len(b) * rows_per_prompt <= max_rows
            real = sum(lengths[i] + new_tokens for i in b)
            padded = len(b) * (max(lengths[i] for i in b) + new_tokens)
            assert padded - real <= max_padding * real + 1e-9


@pytest.mark.parametrize("trial", range(20))
def test_length_buckets_cover_every_prompt_within_the_bounds(trial):
    rng = random.Random(1000 + trial + random.randrange(1 << 30))
    lengths = [rng.randint(1, 80) for _ in range(rng.randint(1, 60))]
    rows_per_prompt = rng.choice([1, 2, 8, 16])
    max_rows = rng.choice([1, 7, 64, 256])
    new_tokens = rng.choice([1, 16, 48])
    max_padding = rng.choice([0.0, 0.1, 0.25, 10.0])
    buckets = length_buckets(lengths, rows_per_prompt=rows_per_prompt, max_rows=max_rows, new_tokens=new_tokens,
                             max_padding=max_padding)
    check_buckets(buckets, lengths, rows_per_prompt=rows_per_prompt, max_rows=max_rows, new_tokens=new_tokens,
                  max_padding=max_padding)


def test_length_buckets_hard_cases():
    # no padding allowed: only equal lengths share a call
    assert length_buckets([3, 5, 3, 5, 4], rows_per_prompt=2, max_rows=64, new_tokens=8, max_padding=0.0) == \
        [[0, 2], [4], [1, 3]]
    # a prompt needing more rows than a call holds still gets a call of its own
    assert length_buckets([4, 4], rows_per_prompt=16, max_rows=8, new_tokens=8, max_padding=1.0) == [[0], [1]]
    # a step's prompts of close lengths: one call, not one per length
    lengths = [35, 37, 37, 41, 41, 41, 42, 42, 42, 43, 45, 46, 46, 47, 48, 49]
    assert len(length_buckets(lengths, rows_per_prompt=8, max_rows=256, new_tokens=48, max_padding=0.25)) == 1
    assert length_buckets([], rows_per_prompt=8, max_rows=256, new_tokens=48, max_padding=0.25) == []


@pytest.fixture(scope="module", params=["oreal", "transformers"])
def backend(request):
    """Both samplers: this package's decode loop (the default) and transformers' `generate` (the fallback)."""
    backend = HFBackend(model=tiny_config().to_dict(), seed=int(torch.randint(0, 1 << 16, ()).item()), num_threads=1,
                        decoder=request.param)
    assert (backend.decode_unsupported is None) == (request.param == "oreal")
    return backend


def random_prompts(rng: random.Random, count: int, max_len: int = 14) -> list[list[int]]:
    return [[rng.randrange(1, 97) for _ in range(rng.randint(1, max_len))] for _ in range(count)]


def count_generate_calls(backend, monkeypatch) -> list[int]:
    """The prompts of each call into the sampler (oreal.rollout.decode.decode or `model.generate`)."""
    calls = []
    if backend.decode_unsupported is None:
        import oreal.rollout.hf as hf

        inner = hf.decode

        def counted(model, prompts, *args, **kwargs):
            calls.append(len(prompts))
            return inner(model, prompts, *args, **kwargs)

        monkeypatch.setattr(hf, "decode", counted)
        return calls
    inner = backend.model.generate

    def counted(*args, **kwargs):
        calls.append(kwargs["input_ids"].shape[0])
        return inner(*args, **kwargs)

    monkeypatch.setattr(backend.model, "generate", counted)
    return calls


@pytest.mark.parametrize("max_batch_rows, max_padding", [(256, 10.0), (3, 10.0), (256, 0.0)])
def test_greedy_batches_return_each_prompts_own_unpadded_answer_in_order(backend, monkeypatch, max_batch_rows,
                                                                          max_padding):
    rng = random.Random()
    prompts = random_prompts(rng, 9)
    prompts.append([5])  # length 1: the most padding a row can get
    backend.max_batch_rows, backend.max_padding = max_batch_rows, max_padding
    calls = count_generate_calls(backend, monkeypatch)
    n = 3
    out = backend.generate(prompts, n, SamplingParams(temperature=0, max_new_tokens=6))
    assert [(r.prompt_index, r.sample_index) for r in out] == [(i, j) for i in range(len(prompts)) for j in range(n)]
    ref_tokens, ref_lp = greedy_reference(backend.model, prompts, 6)
    for r in out:
        assert r.token_ids == ref_tokens[r.prompt_index]
        torch.testing.assert_close(torch.tensor(r.logprobs), torch.tensor(ref_lp[r.prompt_index]), atol=1e-4, rtol=0)
    if max_padding > 1 and max_batch_rows >= len(prompts):
        assert calls == [len(prompts)], "one generate call for every prompt, whatever their lengths"
    assert sum(calls) == len(prompts)


@torch.no_grad()
def test_sampled_batches_return_exactly_n_samples_per_prompt_from_that_prompt(backend, monkeypatch):
    rng = random.Random()
    prompts = random_prompts(rng, 7)
    n = 4
    backend.max_batch_rows, backend.max_padding = 256, 10.0
    calls = count_generate_calls(backend, monkeypatch)
    sampling = SamplingParams(temperature=0.8, max_new_tokens=5, seed=rng.randrange(1 << 20))
    out = backend.generate(prompts, n, sampling)
    assert calls == [len(prompts)]  # one call; generate expands each row into its n samples
    assert [(r.prompt_index, r.sample_index) for r in out] == [(i, j) for i in range(len(prompts)) for j in range(n)]
    for r in out:
        # the sampler's log-probs of this sample's tokens after its own prompt, by an unpadded forward: a sample
        # from another prompt's row, or numerics changed by the padding, would not match
        ids = torch.tensor([prompts[r.prompt_index] + r.token_ids])
        logits = backend.model(input_ids=ids).logits[0, len(prompts[r.prompt_index]) - 1:-1].float()
        ref = torch.log_softmax(logits / sampling.temperature, -1).gather(-1, torch.tensor(r.token_ids)[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(r.logprobs), ref, atol=2e-4, rtol=0)
    again = backend.generate(prompts, n, sampling)
    assert [r.token_ids for r in again] == [r.token_ids for r in out], "a seeded request samples the same"


def test_bad_batching_options_raise(backend):
    with pytest.raises(ValueError, match="max_batch_rows"):
        HFBackend(model=tiny_config().to_dict(), max_batch_rows=0)
    with pytest.raises(ValueError, match="decoder"):
        HFBackend(model=tiny_config().to_dict(), decoder="vllm")
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        backend.generate([[1], []], 1, SamplingParams(max_new_tokens=2))
