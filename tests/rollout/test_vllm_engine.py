"""Contract test of the vLLM engine: runs where vLLM and two GPUs are available, skipped otherwise.

Trainer on cuda:0, the vLLM engine process on GPU 1: sync new weights over NCCL into vLLM's
fused layouts, then greedy generation must equal the trainer model's, including for a prompt
whose KV blocks were cached under the old weights (the prefix cache must be reset).
"""

import pytest
import torch
from rollout_testlib import greedy_reference, tiny_config, tiny_model

pytest.importorskip("vllm", reason="vLLM is not installed (it needs a CUDA GPU); the vLLM engine contract is untested here")
if torch.cuda.device_count() < 2:
    pytest.skip("the vLLM contract test needs 2 GPUs (NCCL cannot join two ranks on one GPU)", allow_module_level=True)

from oreal.rollout import SamplingParams, WeightMismatchError, WeightSyncer, build_engine  # noqa: E402


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-qwen2")
    config = tiny_config(vocab_size=128, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=512)
    tiny_model(config, seed=1, dtype=torch.bfloat16).save_pretrained(path)
    return path, config


def test_vllm_engine_contract(checkpoint):
    path, config = checkpoint
    torch.cuda.set_device(0)
    engine = build_engine("vllm", str(path), dtype="bfloat16", gpus="1", gpu_memory_utilization=0.3,
                          max_model_len=256, vllm_kwargs={"enforce_eager": True}, startup_timeout_s=900)
    try:
        long_prompt = list(range(3, 40))  # > one KV block: cached by the prefix cache
        prompts = [[1, 2, 3, 4], long_prompt]
        greedy = SamplingParams(temperature=0, max_new_tokens=8)
        first = engine.generate(prompts, n=2, sampling=greedy)
        assert [(r.prompt_index, r.sample_index) for r in first] == [(0, 0), (0, 1), (1, 0), (1, 1)]

        trainer = tiny_model(config, seed=2, dtype=torch.bfloat16).cuda()
        syncer = WeightSyncer(trainer, engine, bucket_bytes=64 << 10)  # many buckets, some split tensors
        assert syncer.sync() == 1
        ref_tokens, ref_logprobs = greedy_reference(trainer, prompts, 8)
        out = engine.generate(prompts, n=1, sampling=greedy)
        assert [r.token_ids for r in out] == ref_tokens
        for r in out:
            assert r.weights_version == 1 and r.finish_reason == "length"
            torch.testing.assert_close(torch.tensor(r.logprobs), torch.tensor(ref_logprobs[r.prompt_index]),
                                       atol=0.05, rtol=0)

        sampled = engine.generate(prompts, n=3, sampling=SamplingParams(temperature=1.0, top_k=20, max_new_tokens=6,
                                                                        stop_token_ids=(5,), seed=0))
        for r in sampled:
            assert len(r.token_ids) == len(r.logprobs) and all(lp <= 0 for lp in r.logprobs)
            assert (r.finish_reason == "stop") == (r.token_ids[-1] == 5)

        wrong = tiny_model(tiny_config(vocab_size=129, hidden_size=64, intermediate_size=128), seed=3).cuda()
        with pytest.raises(WeightMismatchError, match="model.embed_tokens.weight"):
            WeightSyncer(wrong, engine).sync()
        assert [r.token_ids for r in engine.generate(prompts, n=1, sampling=greedy)] == ref_tokens
    finally:
        engine.close()
