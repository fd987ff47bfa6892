"""The transformers engine's own sampling loop (oreal/rollout/decode.py): the distribution it draws from, the
draw itself, and rows that finish at different steps (the batch is compacted under them) keeping their own
tokens and log-probabilities."""

import random

import pytest
import torch
from rollout_testlib import greedy_reference, tiny_config

from oreal.rollout.decode import decode, fast_decode_unsupported, processed_logprobs, sample_rows
from oreal.rollout.hf import HFBackend
from oreal.rollout.types import SamplingParams

SEED = random.randrange(1 << 30)


def reference_processed(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """float64, one row at a time, by the definition: scale, keep the k largest (ties at the k-th kept), then the
    smallest most-likely set whose mass reaches top_p (sorted descending; the first token always kept). top_p 1
    keeps every token, as transformers (no top-p warper at 1.0): summed in float64, a confident row's mass
    reaches 1.0 before its negligible tokens, which a literal reading would then drop."""
    out = torch.full(logits.shape, float("-inf"), dtype=torch.float64)
    for r, row in enumerate(logits.double() / temperature):
        keep = torch.ones_like(row, dtype=torch.bool)
        if 0 < top_k < row.numel():
            keep &= row >= torch.sort(row, descending=True).values[top_k - 1]
        masked = row.masked_fill(~keep, float("-inf"))
        probs = masked.softmax(-1)
        order = torch.argsort(probs, descending=True, stable=True)
        mass, kept = 0.0, torch.zeros_like(keep)
        for i in order.tolist():
            if top_p < 1.0 and mass >= top_p and kept.any():
                break
            kept[i] = probs[i] > 0
            mass += float(probs[i])
        out[r] = torch.log_softmax(row.masked_fill(~(keep & kept), float("-inf")), -1)
    return out


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 0, 1.0), (0.7, 20, 0.9), (1.3, 2, 1.0), (0.5, 0, 0.5)])
def test_processed_distribution_matches_the_definition(temperature, top_k, top_p):
    gen = torch.Generator().manual_seed(SEED)
    logits = torch.randn(6, 97, generator=gen) * 4
    logits[0, :10] = 30.0 - 0.05 * torch.arange(10)  # a confident row: ten close tokens, the rest negligible
    if top_p == 1.0:  # ties at the top: top-k keeps every tied token (at a top-p boundary a tie has no answer)
        logits[1, :4] = 25.0
    got = processed_logprobs(logits, temperature=temperature, top_k=top_k, top_p=top_p)
    want = reference_processed(logits, temperature, top_k, top_p)
    finite = torch.isfinite(want)
    assert torch.equal(torch.isfinite(got), finite), "the same tokens are filtered"
    torch.testing.assert_close(got[finite].double(), want[finite], atol=1e-5, rtol=0)


def test_sampling_draws_the_distribution_and_never_a_filtered_token():
    gen = torch.Generator().manual_seed(SEED)
    probs = torch.tensor([0.0, 0.5, 0.0, 0.25, 0.125, 0.125, 0.0])
    logprobs = probs.log().expand(200_000, -1).contiguous()
    drawn = sample_rows(logprobs, gen)
    counts = torch.bincount(drawn, minlength=probs.numel()).double()
    assert counts[probs == 0].sum() == 0
    # 200k draws: each frequency within ~5 standard deviations
    freq = counts / counts.sum()
    assert torch.all((freq - probs.double()).abs() <= 5 * (probs.double() * (1 - probs.double()) / 2e5).sqrt() + 1e-12)
    # a one-token distribution and a confident one
    assert torch.all(sample_rows(torch.tensor([[float("-inf"), 0.0, float("-inf")]]).expand(50, -1), gen) == 1)


@pytest.fixture(scope="module")
def model():
    backend = HFBackend(model=tiny_config().to_dict(), seed=SEED % 65536, num_threads=1)
    assert backend.decode_unsupported is None and fast_decode_unsupported(backend.model) is None
    return backend.model


def prompts_of(rng: random.Random, count: int) -> list[list[int]]:
    return [[rng.randrange(1, 97) for _ in range(rng.randint(1, 12))] for _ in range(count)]


def test_greedy_rows_that_stop_at_different_steps_keep_their_own_tokens(model):
    """Stop tokens chosen so that rows finish at different steps: the batch is compacted several times, and every
    row still equals its own unpadded greedy decode cut at its first stop token."""
    rng = random.Random(SEED)
    prompts = prompts_of(rng, 12)
    ref_tokens, ref_lp = greedy_reference(model, prompts, 10)
    seen = [t for row in ref_tokens for t in row[1:6]]
    stop = {max(set(seen), key=seen.count), rng.choice(seen)}
    rows = decode(model, prompts, 1, max_new_tokens=10, temperature=0.0, stop_ids=sorted(stop))
    finished_early = 0
    for decoded, tokens, lps in zip(rows, ref_tokens, ref_lp):
        cut = next((i + 1 for i, t in enumerate(tokens) if t in stop), len(tokens))
        finished_early += cut < len(tokens)
        assert decoded.token_ids == tokens[:cut]
        assert decoded.finish_reason == ("stop" if tokens[cut - 1] in stop else "length")
        torch.testing.assert_close(torch.tensor(decoded.logprobs), torch.tensor(lps[:cut]), atol=1e-4, rtol=0)
    assert finished_early >= 3, "the case must make rows finish early"


@torch.no_grad()
def test_sampled_rows_carry_the_logprobs_of_their_own_prompt_through_compaction(model):
    rng = random.Random(SEED + 1)
    prompts = prompts_of(rng, 5)
    s = SamplingParams(temperature=0.9, top_k=30, top_p=0.95, max_new_tokens=12)
    stop = [rng.randrange(97) for _ in range(8)]  # frequent enough that rows stop at different steps
    torch.manual_seed(SEED)
    rows = decode(model, prompts, 4, max_new_tokens=12, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
                  stop_ids=stop)
    assert len(rows) == 20
    for index, row in enumerate(rows):
        prompt = prompts[index // 4]
        stops = [t in stop for t in row.token_ids]
        assert not any(stops[:-1]) and (row.finish_reason == "stop") == stops[-1]
        assert row.finish_reason == "stop" or len(row.token_ids) == 12
        logits = model(input_ids=torch.tensor([prompt + row.token_ids])).logits[0, len(prompt) - 1:-1]
        ref = processed_logprobs(logits, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p)
        ref = ref.gather(-1, torch.tensor(row.token_ids)[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(row.logprobs), ref, atol=2e-4, rtol=0)
    assert len({r.finish_reason for r in rows}) == 2 or len({len(r.token_ids) for r in rows}) > 1


def test_models_the_loop_cannot_take_fall_back_to_generate():
    sliding = HFBackend(model=tiny_config(use_sliding_window=True, sliding_window=4, max_window_layers=0).to_dict(),
                        num_threads=1)
    assert sliding.decode_unsupported is not None and "cache layers" in sliding.decode_unsupported
    out = sliding.generate([[1, 2, 3]], 2, SamplingParams(temperature=1.0, max_new_tokens=3, seed=1))
    assert len(out) == 2 and all(1 <= len(r.token_ids) <= 3 for r in out)
