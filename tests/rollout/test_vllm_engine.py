"""The vLLM engine for real, through the same RolloutEngine interface as the transformers engine.

Runs wherever vLLM is installed: on two GPUs (trainer on cuda:0, engine on GPU 1, bfloat16,
weights over NCCL) or, without CUDA, on vLLM's CPU build (float32, weights over gloo; the
`.venv-vllm` environment that scripts/install_vllm_cpu.sh builds and .ci/run uses). The same
tests run in both places; only the dtype and the tolerance of the log-prob agreement differ.

The engine's weights are checked through what it generates: after every sync its greedy
continuations must equal transformers' greedy generation with the trainer's weights (a prompt
longer than one KV block checks that the prefix cache was reset), and the log-prob it reports
for every sampled token must equal the trainer's own log-prob of that token.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from rollout_testlib import tiny_config, tiny_model

pytest.importorskip("vllm", reason="vLLM is not installed: run `bash scripts/install_vllm_cpu.sh` and use .venv-vllm")
if torch.cuda.is_available() and torch.cuda.device_count() < 2:
    pytest.skip("the vLLM engine test on GPUs needs 2 (NCCL cannot join two ranks on one GPU)", allow_module_level=True)

from oreal.rollout import SamplingParams, WeightMismatchError, WeightSyncer, build_engine  # noqa: E402

ON_GPU = torch.cuda.is_available()


@dataclasses.dataclass(frozen=True)
class Placement:
    trainer_device: str
    dtype: torch.dtype
    engine_options: dict
    logprob_mean_tol: float  # mean |engine - trainer| over sampled tokens
    greedy_logprob_atol: float  # each greedy token's log-prob against transformers'


PLACEMENT = (
    Placement("cuda:0", torch.bfloat16,
              dict(dtype="bfloat16", gpus="1", gpu_memory_utilization=0.3, vllm_kwargs={"enforce_eager": True}),
              2e-2, 5e-2)
    if ON_GPU else Placement("cpu", torch.float32, dict(dtype="float32"), 1e-4, 1e-4)
)

# head_dim 32: vLLM's CPU attention supports head sizes 32, 64, 80, ...; grouped-query (2 heads, 1 KV head)
CONFIG = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_attention_heads=2, num_key_value_heads=1,
              max_position_embeddings=512)
LONG_PROMPT = list(range(3, 60))  # longer than one KV block: the second generation reuses cached blocks


def trainer_model(seed: int, **overrides):
    return tiny_model(tiny_config(**{**CONFIG, **overrides}), seed=seed, dtype=PLACEMENT.dtype).to(
        PLACEMENT.trainer_device)


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def engine(request, tmp_path_factory):
    """An engine on a checkpoint of random weights (seed 1); tests sync the weights they compare with."""
    tied = request.param
    path = tmp_path_factory.mktemp("tiny-qwen2")
    tiny_model(tiny_config(**CONFIG, tie_word_embeddings=tied), seed=1, dtype=PLACEMENT.dtype).save_pretrained(path)
    if ON_GPU:
        torch.cuda.set_device(0)
    eng = build_engine("vllm", str(path), max_model_len=256, startup_timeout_s=900, request_timeout_s=300,
                       sync_timeout_s=300, **PLACEMENT.engine_options)
    eng.tied = tied
    yield eng
    eng.close()


@torch.no_grad()
def transformers_greedy(model, prompts, max_new_tokens):
    """Greedy tokens and their log-probs from transformers' own `generate`, one prompt at a time."""
    tokens, logprobs = [], []
    for prompt in prompts:
        ids = torch.tensor([prompt], device=PLACEMENT.trainer_device)
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, output_scores=True,
                             return_dict_in_generate=True, pad_token_id=0)
        new = out.sequences[0, len(prompt):]
        lp = torch.stack([torch.log_softmax(s[0].float(), -1) for s in out.scores])
        tokens.append(new.tolist())
        logprobs.append(lp.gather(-1, new[:, None])[:, 0].tolist())
    return tokens, logprobs


@torch.no_grad()
def trainer_logprobs(model, prompt, response, temperature):
    """The trainer's log-prob of every response token: one forward over prompt + response."""
    ids = torch.tensor([list(prompt) + list(response)], device=PLACEMENT.trainer_device)
    logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1].float() / temperature
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(response, device=ids.device)[:, None])[:, 0].cpu()


def train_one_step(model, seed):
    """One real optimizer step on a language-model loss over random tokens (weights really change)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, CONFIG["vocab_size"], (4, 24), generator=g).to(PLACEMENT.trainer_device)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    model.eval()


def test_greedy_equals_transformers_after_every_sync(engine):
    trainer = trainer_model(seed=2, tie_word_embeddings=engine.tied)
    syncer = WeightSyncer(trainer, engine, bucket_bytes=16 << 10)  # many buckets, tensors split across them
    assert any(not p.whole for b in syncer.make_plan().buckets for p in b.pieces)
    prompts = [[1, 2, 3, 4], LONG_PROMPT, [9]]
    greedy = SamplingParams(temperature=0, max_new_tokens=10)
    before = engine.generate(prompts, n=1, sampling=greedy)  # fills the prefix cache with the old weights
    for step in range(1, 4):
        if step > 1:
            train_one_step(trainer, seed=step)
        version = syncer.sync()
        ref_tokens, ref_logprobs = transformers_greedy(trainer, prompts, 10)
        out = engine.generate(prompts, n=2, sampling=greedy)
        assert [(r.prompt_index, r.sample_index) for r in out] == [(i, j) for i in range(3) for j in range(2)]
        assert [r.token_ids for r in out] == [t for t in ref_tokens for _ in range(2)], f"after sync {step}"
        for r in out:
            assert r.weights_version == version and r.finish_reason == "length"
            torch.testing.assert_close(torch.tensor(r.logprobs), torch.tensor(ref_logprobs[r.prompt_index]),
                                       atol=PLACEMENT.greedy_logprob_atol, rtol=0)
    assert [r.token_ids for r in before] != ref_tokens  # the engine's weights did change


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_engine_logprobs_equal_the_trainers(engine, temperature):
    trainer = trainer_model(seed=3, tie_word_embeddings=engine.tied)
    WeightSyncer(trainer, engine, bucket_bytes=1 << 20).sync()
    g = torch.Generator().manual_seed(11)
    prompts = [torch.randint(0, CONFIG["vocab_size"], (int(k),), generator=g).tolist()
               for k in torch.randint(1, 40, (6,), generator=g)]
    samples = engine.generate(prompts, n=4, sampling=SamplingParams(temperature=temperature, max_new_tokens=24, seed=5))
    diffs = []
    for r in samples:
        assert len(r.logprobs) == len(r.token_ids) > 0
        mine = trainer_logprobs(trainer, prompts[r.prompt_index], r.token_ids, temperature)
        diffs.append((torch.tensor(r.logprobs) - mine).abs())
    diffs = torch.cat(diffs)
    assert diffs.numel() > 100
    assert diffs.mean() < PLACEMENT.logprob_mean_tol, f"mean |engine - trainer| = {diffs.mean():.3g}"


def test_seeded_samples_are_distinct_and_reproducible(engine):
    """Sample j of prompt i must not reuse the noise of another (prompt, sample) of the call."""
    trainer = trainer_model(seed=4, tie_word_embeddings=engine.tied, initializer_range=0.02)  # near-uniform
    WeightSyncer(trainer, engine, bucket_bytes=1 << 20).sync()
    prompt = [5, 6, 7]
    sampling = SamplingParams(temperature=1.0, max_new_tokens=12, seed=7)
    first = engine.generate([prompt, prompt, prompt], n=3, sampling=sampling)
    texts = [tuple(r.token_ids) for r in first]
    assert len(set(texts)) == len(texts), "two samples of one call drew the same noise"
    assert [tuple(r.token_ids) for r in engine.generate([prompt] * 3, n=3, sampling=sampling)] == texts


def test_stop_tokens_and_finish_reasons(engine):
    trainer = trainer_model(seed=5, tie_word_embeddings=engine.tied, initializer_range=0.02)
    WeightSyncer(trainer, engine, bucket_bytes=1 << 20).sync()
    stops = tuple(range(0, 128, 9))  # one token in 9 stops: most samples stop early
    out = engine.generate([[1, 2], [3]], n=8, sampling=SamplingParams(temperature=1.0, top_k=50, top_p=0.9,
                                                                      max_new_tokens=16, stop_token_ids=stops, seed=1))
    assert len(out) == 16 and {r.finish_reason for r in out} == {"stop", "length"}
    for r in out:
        assert len(r.token_ids) == len(r.logprobs) and all(lp <= 0 for lp in r.logprobs)
        assert (r.finish_reason == "stop") == (r.token_ids[-1] in stops)
        assert not any(t in stops for t in r.token_ids[:-1])
        assert r.finish_reason == "stop" or len(r.token_ids) == 16


def test_mismatched_weights_are_refused_before_any_byte_moves(engine):
    trainer = trainer_model(seed=6, tie_word_embeddings=engine.tied)
    WeightSyncer(trainer, engine, bucket_bytes=1 << 20).sync()
    greedy = SamplingParams(temperature=0, max_new_tokens=6)
    expected = [r.token_ids for r in engine.generate([[1, 2, 3]], sampling=greedy)]
    wrong = trainer_model(seed=7, tie_word_embeddings=engine.tied, vocab_size=129)
    with pytest.raises(WeightMismatchError, match="model.embed_tokens.weight"):
        WeightSyncer(wrong, engine).sync()
    assert [r.token_ids for r in engine.generate([[1, 2, 3]], sampling=greedy)] == expected
