"""The parts of the vLLM engine that need neither vLLM nor a GPU."""

import random
import sys
from types import SimpleNamespace

import pytest
import torch
from rollout_testlib import tiny_config, tiny_model

from oreal.rollout import SamplingParams, TensorSpec, plan_buckets
from oreal.rollout.vllm import BucketAssembler, _rollouts_from_outputs, read_checkpoint_specs, vllm_sampling_kwargs


def test_importing_the_vllm_module_does_not_import_vllm():
    assert "oreal.rollout.vllm" in sys.modules
    if "vllm" in sys.modules:
        pytest.skip("vllm already imported by something else in this session")
    assert "vllm" not in sys.modules


def test_checkpoint_specs_come_from_safetensors_headers(tmp_path):
    model = tiny_model(tiny_config(tie_word_embeddings=True), seed=3)
    model.save_pretrained(tmp_path, max_shard_size="20KB")  # several shards
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    specs = read_checkpoint_specs(str(tmp_path), "bfloat16")
    params = dict(model.named_parameters())
    assert set(specs) == set(params)  # tied lm_head is not stored, and not expected
    for name, p in params.items():
        assert specs[name] == TensorSpec(name, tuple(p.shape), "bfloat16")
    with pytest.raises(FileNotFoundError, match="safetensors"):
        read_checkpoint_specs(str(tmp_path / "nothing"), "bfloat16")


def test_sampling_options_translate_one_to_one():
    s = SamplingParams(temperature=0.6, top_p=0.95, top_k=0, max_new_tokens=128, stop_token_ids=(2, 7), seed=10)
    kw = vllm_sampling_kwargs(s, n=4, prompt_index=3, top_k_off=-1)
    assert kw == dict(n=4, temperature=0.6, top_p=0.95, top_k=-1, max_tokens=128, stop_token_ids=[2, 7],
                      seed=13, logprobs=0, detokenize=False)
    kw = vllm_sampling_kwargs(SamplingParams(top_k=5), n=1, prompt_index=0, top_k_off=0)
    assert kw["top_k"] == 5 and kw["seed"] is None


@pytest.mark.parametrize("seed", range(3))
def test_assembler_rebuilds_every_tensor_including_split_ones(seed):
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    tensors = {f"t{i}": torch.randn(rng.randint(1, 30), rng.randint(1, 9), generator=g).to(
        rng.choice([torch.float32, torch.bfloat16])) for i in range(12)}
    specs = [TensorSpec(n, tuple(t.shape), str(t.dtype).removeprefix("torch.")) for n, t in tensors.items()]
    plan = plan_buckets(specs, 256)
    assembler = BucketAssembler()
    got = {}
    for bucket in plan.buckets:
        buf = torch.zeros(plan.capacity, dtype=torch.uint8)
        for piece in bucket.pieces:  # what the trainer packs
            src = tensors[piece.name].reshape(-1)[piece.start:piece.start + piece.numel]
            buf[piece.offset:piece.offset + src.numel() * src.element_size()].view(src.dtype).copy_(src)
        for name, t in assembler.tensors(bucket, buf):
            assert name not in got
            got[name] = t.clone()
    assert not assembler.partial
    assert set(got) == set(tensors)
    for name, t in tensors.items():
        assert got[name].dtype == t.dtype and torch.equal(got[name], t)


def test_vllm_outputs_become_rollouts():
    def comp(index, tokens, lps, reason):
        return SimpleNamespace(index=index, token_ids=tokens, finish_reason=reason,
                               logprobs=[{t: SimpleNamespace(logprob=lp)} for t, lp in zip(tokens, lps)])

    outputs = [SimpleNamespace(outputs=[comp(1, [5, 2], [-0.5, -0.1], "stop"), comp(0, [4, 4, 4], [-1, -2, -3], "length")])]
    rollouts = _rollouts_from_outputs(outputs, n=2)
    assert [(r.sample_index, r.token_ids, r.logprobs, r.finish_reason) for r in rollouts] == [
        (0, [4, 4, 4], [-1.0, -2.0, -3.0], "length"), (1, [5, 2], [-0.5, -0.1], "stop")]
    with pytest.raises(RuntimeError, match="expected 3"):
        _rollouts_from_outputs(outputs, n=3)
