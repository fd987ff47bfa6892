"""Weight sync from a single-process trainer (no torch.distributed) into the engine process."""

import pytest
import torch
from rollout_testlib import tiny_config, tiny_model

from oreal.rollout import WeightMismatchError, WeightSyncer


def assert_engine_equals(engine, model):
    state = engine.state_dict()
    params = dict(model.named_parameters())
    assert set(state) == set(params)
    for name, p in params.items():
        expected = p.detach().to(state[name].dtype)
        assert torch.equal(state[name], expected), f"{name} differs"


def test_sync_is_bit_exact_across_split_buckets_and_repeats(hf_engine, engine_config):
    model = tiny_model(engine_config, seed=21)
    syncer = WeightSyncer(model, hf_engine, bucket_bytes=2048)
    v1 = syncer.sync()
    plan = syncer.last_plan
    assert len(plan.buckets) > 5 and plan.capacity <= 2048
    split = {p.name for b in plan.buckets for p in b.pieces if not p.whole}
    assert "model.embed_tokens.weight" in split  # 97*32*4 bytes > 2048: travels in pieces
    assert_engine_equals(hf_engine, model)
    assert hf_engine.ping()["last_receive"] == "inplace"  # buckets landed straight in the parameters

    # Train-like change, then sync again through the same buffers and group.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    assert syncer.sync() == v1 + 1
    assert_engine_equals(hf_engine, model)


def test_trainer_dtype_is_cast_to_the_engine_dtype(hf_engine, engine_config):
    model = tiny_model(engine_config, seed=22, dtype=torch.bfloat16)  # engine holds float32
    WeightSyncer(model, hf_engine, bucket_bytes=4096).sync()
    assert_engine_equals(hf_engine, model)


def test_mismatch_is_refused_before_any_byte_is_written(hf_engine, engine_config):
    model = tiny_model(engine_config, seed=23)
    WeightSyncer(model, hf_engine, bucket_bytes=1 << 20).sync()
    before = hf_engine.state_dict()
    version = hf_engine.ping()["version"]

    wrong = tiny_model(tiny_config(tie_word_embeddings=False, vocab_size=98), seed=24)
    with pytest.raises(WeightMismatchError) as err:
        WeightSyncer(wrong, hf_engine, bucket_bytes=1 << 20).sync()
    text = str(err.value)
    assert "shape differs: model.embed_tokens.weight trainer [98, 32] vs engine [97, 32]" in text
    assert "unknown to the engine: lm_head.weight" in text
    assert len(err.value.problems) == 2

    # The engine side double-checks too (a plan built behind the syncer's back).
    from oreal.rollout import TensorSpec, plan_buckets

    bad_plan = plan_buckets([TensorSpec("model.norm.weight", (31,), "float32")], 1024)
    with pytest.raises(WeightMismatchError, match="model.norm.weight"):
        hf_engine.begin_weight_update(bad_plan, allow_missing=True)

    after = hf_engine.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert hf_engine.ping()["version"] == version and hf_engine.ping()["dirty"] is None
    assert hf_engine.broken is None
    assert len(hf_engine.generate([[1, 2]], n=1)) == 1  # still serving


def test_rank0_must_pass_the_engine(engine_config):
    with pytest.raises(ValueError, match="rank 0 must pass the engine"):
        WeightSyncer(tiny_model(engine_config, seed=1), None)


def test_per_tensor_update_protocol_used_as_the_benchmark_baseline(hf_engine, engine_config):
    from oreal.rollout import TensorSpec

    model = tiny_model(engine_config, seed=25)
    WeightSyncer(model, hf_engine, bucket_bytes=1 << 20).sync()
    transport = hf_engine.open_transport()
    new = torch.randn(32)
    rid = hf_engine.begin_two_phase("receive_tensor", spec=TensorSpec("model.norm.weight", (32,), "float32"))
    transport.broadcast(new).wait(30)
    hf_engine.end_two_phase(rid, "receive_tensor")
    state = hf_engine.state_dict()
    assert torch.equal(state["model.norm.weight"], new)
    assert torch.equal(state["model.embed_tokens.weight"], model.model.embed_tokens.weight)  # others untouched
