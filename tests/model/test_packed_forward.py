"""The packed forward on tiny random Qwen2/Llama models equals per-sequence forwards."""

import numpy as np
import pytest
import torch

import oreal
from oreal.data import TrainingSample, pack_rollouts
from oreal.model import forward_hidden, lm_head_weight, load_causal_lm, set_attn_backend
from oreal.model.tiny import tiny_llama_config, tiny_qwen2_config

VOCAB = 300
# Lengths 1 to 300, the extremes included; prompt lengths vary inside each.
LENGTHS = [1, 2, 3, 7, 31, 64, 129, 200, 300, 1, 45]


def make_rollouts(seed: int, lengths=LENGTHS):
    rng = np.random.default_rng(seed)
    rollouts = []
    for length in lengths:
        prompt_len = int(rng.integers(1, length + 1))
        ids = rng.integers(0, VOCAB, size=length)
        response_len = length - prompt_len
        rollouts.append(TrainingSample(ids[:prompt_len], ids[prompt_len:], advantage=float(rng.normal()),
                                is_positive=bool(rng.random() < 0.5), rm_scores=rng.normal(size=response_len),
                                ref_logprobs=-rng.random(response_len) - 3.0))
    return rollouts


def one_batch(rollouts):
    batches, _ = pack_rollouts(rollouts, max_tokens=sum(r.num_tokens for r in rollouts))
    assert len(batches) == 1
    return batches[0]


def per_sequence_hidden(model, batch, rollouts):
    """Each sequence alone, unpadded, through transformers' eager attention (an independent path)."""
    set_attn_backend(model, "sdpa")
    model.set_attn_implementation("eager")
    try:
        pieces = []
        for index in batch.seq_indices:
            r = rollouts[index]
            ids = torch.as_tensor(np.concatenate([r.prompt_ids, r.response_ids]))[None]
            pieces.append(model.model(input_ids=ids, use_cache=False).last_hidden_state[0])
        return torch.cat(pieces)
    finally:
        set_attn_backend(model, "sdpa")


@pytest.fixture(scope="module")
def qwen2():
    torch.manual_seed(0)
    return load_causal_lm(tiny_qwen2_config(VOCAB), dtype=torch.float32, attn_backend="sdpa")


def test_packed_equals_per_sequence_qwen2(qwen2):
    """Must show: packed and unpacked forwards agree on a tiny Qwen2 for lengths 1 to 300."""
    rollouts = make_rollouts(1)
    batch = one_batch(rollouts)
    assert sorted(batch.seq_lens) == sorted(LENGTHS) and batch.max_seqlen == 300
    with torch.no_grad():
        packed = forward_hidden(qwen2, batch)
        reference = per_sequence_hidden(qwen2, batch, rollouts)
    assert packed.shape == (sum(LENGTHS), qwen2.config.hidden_size) and packed.dtype == torch.float32
    torch.testing.assert_close(packed, reference, rtol=1e-5, atol=1e-5)


def test_packed_equals_per_sequence_llama():
    torch.manual_seed(1)
    model = load_causal_lm(tiny_llama_config(VOCAB), dtype=torch.float32)
    rollouts = make_rollouts(2, [5, 1, 77, 150])
    batch = one_batch(rollouts)
    with torch.no_grad():
        torch.testing.assert_close(forward_hidden(model, batch), per_sequence_hidden(model, batch, rollouts),
                                   rtol=1e-5, atol=1e-5)


def test_no_attention_across_sequence_boundaries(qwen2):
    rollouts = make_rollouts(3, [40, 60, 50])
    batch = one_batch(rollouts)
    changed = batch.input_ids.clone()
    start, end = batch.cu_seqlens[1].item(), batch.cu_seqlens[2].item()  # the middle sequence
    changed[0, start:end] = (changed[0, start:end] + 1) % VOCAB
    with torch.no_grad():
        before = forward_hidden(qwen2, batch)
        after = forward_hidden(qwen2, type(batch)(**{**batch.__dict__, "input_ids": changed}))
    torch.testing.assert_close(after[:start], before[:start], rtol=0, atol=1e-6)
    torch.testing.assert_close(after[end:], before[end:], rtol=0, atol=1e-6)
    assert (after[start:end] - before[start:end]).abs().amax(dim=-1).min() > 1e-3  # every changed row moved


def test_loss_gradients_match_per_sequence(qwen2):
    """The fused loss on packed hidden states gives the same loss and parameter gradients as unpacked."""
    rollouts = make_rollouts(4, [3, 90, 1, 150, 20])
    batch = one_batch(rollouts)
    weight_of = lambda: lm_head_weight(qwen2)

    def loss_and_grads(hidden):
        loss = oreal.fused_oreal_loss(hidden, weight_of(), batch.labels, batch.cu_seqlens, batch.advantages,
                                      batch.is_positive, batch.rm_scores, batch.ref_logprobs, backend="torch").loss
        qwen2.zero_grad()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in qwen2.named_parameters() if p.grad is not None}

    packed_loss, packed_grads = loss_and_grads(forward_hidden(qwen2, batch))
    reference_loss, reference_grads = loss_and_grads(per_sequence_hidden(qwen2, batch, rollouts))
    torch.testing.assert_close(packed_loss, reference_loss, rtol=1e-5, atol=1e-6)
    assert packed_grads.keys() == reference_grads.keys() and len(packed_grads) == len(list(qwen2.parameters()))
    for name, grad in packed_grads.items():
        torch.testing.assert_close(grad, reference_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    assert any(g.abs().max() > 0 for g in packed_grads.values())


def test_padding_batch_runs_a_forward(qwen2):
    from oreal.data import PackedBatch

    hidden = forward_hidden(qwen2, PackedBatch.padding(pad_token_id=5))
    assert hidden.shape == (1, qwen2.config.hidden_size) and torch.isfinite(hidden).all()


def test_plain_forward_with_padding_still_works(qwen2):
    """Outside forward_hidden the packed-SDPA model behaves as transformers' SDPA, padding masks included."""
    ids = torch.randint(0, VOCAB, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    with torch.no_grad():
        ours = qwen2(input_ids=ids, attention_mask=mask).logits
        qwen2.set_attn_implementation("eager")
        try:
            eager = qwen2(input_ids=ids, attention_mask=mask).logits
        finally:
            set_attn_backend(qwen2, "sdpa")
    torch.testing.assert_close(ours[0], eager[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours[1, 4:], eager[1, 4:], rtol=1e-5, atol=1e-5)
    out = qwen2.generate(input_ids=ids[:1, :5], max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 9)


# --- loading and errors ----------------------------------------------------------------------


def test_forward_hidden_errors(qwen2):
    batch = one_batch(make_rollouts(5, [4, 6]))
    with pytest.raises(ValueError, match="batch: expected a PackedBatch"):
        forward_hidden(qwen2, {"input_ids": batch.input_ids})
    with pytest.raises(ValueError, match=r"batch: is on meta, the model on cpu; call batch.to\('cpu'\)"):
        forward_hidden(qwen2, batch.to("meta"))
    qwen2.set_attn_implementation("sdpa")
    try:
        with pytest.raises(ValueError, match="attention implementation 'sdpa' does not know packed"):
            forward_hidden(qwen2, batch)
    finally:
        set_attn_backend(qwen2, "sdpa")


def test_load_from_a_local_directory(tmp_path, qwen2):
    qwen2.save_pretrained(tmp_path)
    loaded = load_causal_lm(tmp_path, dtype="float32")
    assert loaded.config._attn_implementation == "oreal_sdpa_varlen" and loaded.dtype == torch.float32
    batch = one_batch(make_rollouts(6, [9, 30]))
    with torch.no_grad():
        torch.testing.assert_close(forward_hidden(loaded, batch), forward_hidden(qwen2, batch))
    assert load_causal_lm(tmp_path, dtype=torch.bfloat16).dtype == torch.bfloat16


def test_load_errors(tmp_path):
    with pytest.raises(ValueError, match="is not a local directory; models load from local files only"):
        load_causal_lm(tmp_path / "Qwen2.5-7B")
    with pytest.raises(ValueError, match="has no config.json"):
        load_causal_lm(tmp_path)
    with pytest.raises(ValueError, match="expected a local directory or a PretrainedConfig, got dict"):
        load_causal_lm({"model_type": "qwen2"})
    with pytest.raises(ValueError, match="dtype: expected a torch dtype"):
        load_causal_lm(tiny_qwen2_config(VOCAB), dtype="float8")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device: 'cuda' was asked for, but torch sees no CUDA device"):
            load_causal_lm(tiny_qwen2_config(VOCAB), device="cuda")
    with pytest.raises(ValueError, match="sliding-window attention"):
        load_causal_lm(tiny_qwen2_config(VOCAB, use_sliding_window=True, sliding_window=16, max_window_layers=0))


def test_lm_head_weight_tied_and_untied(qwen2):
    assert lm_head_weight(qwen2) is qwen2.lm_head.weight
    tied = load_causal_lm(tiny_qwen2_config(VOCAB, tie_word_embeddings=True), dtype=torch.float32)
    assert lm_head_weight(tied).data_ptr() == tied.model.embed_tokens.weight.data_ptr()
    assert lm_head_weight(tied).shape == (VOCAB, tied.config.hidden_size)


def test_liger_switch(monkeypatch):
    from transformers.models.qwen2 import modeling_qwen2

    from oreal.model.liger import apply_liger

    with pytest.raises(ValueError, match="liger: cannot apply Liger kernels: Liger's Triton kernels need a CUDA"):
        load_causal_lm(tiny_qwen2_config(VOCAB), liger=True)
    with pytest.raises(ValueError, match="liger: expected True, False or 'auto'"):
        load_causal_lm(tiny_qwen2_config(VOCAB), liger="yes")
    model = load_causal_lm(tiny_qwen2_config(VOCAB), dtype=torch.float32)  # "auto" on CPU: not applied
    assert not getattr(model, "oreal_liger", False)
    # Liger also patches transformers' module globals; let pytest restore them after this test.
    for name in ("apply_rotary_pos_emb", "Qwen2RMSNorm", "Qwen2MLP"):
        monkeypatch.setattr(modeling_qwen2, name, getattr(modeling_qwen2, name))
    apply_liger(model)
    from liger_kernel.transformers.rms_norm import LigerRMSNorm
    from liger_kernel.transformers.rope import liger_rotary_pos_emb

    assert model.oreal_liger and modeling_qwen2.apply_rotary_pos_emb is liger_rotary_pos_emb
    assert model.model.norm.forward.__func__ is LigerRMSNorm.forward
    assert model.model.layers[0].input_layernorm.forward.__func__ is LigerRMSNorm.forward
    assert model.model.layers[1].mlp._get_name() == "LigerSwiGLUMLP"
    assert "lce_forward" not in type(model).forward.__qualname__  # the loss is ours, not Liger's


def test_activation_checkpointing_keeps_gradients():
    """Recomputation in backward sees the same packed boundaries (they travel as forward kwargs)."""
    torch.manual_seed(2)
    model = load_causal_lm(tiny_qwen2_config(VOCAB), dtype=torch.float32).train()
    batch = one_batch(make_rollouts(7, [30, 1, 50]))
    probe = torch.randn(batch.num_tokens, model.config.hidden_size)

    def grads():
        model.zero_grad()
        (forward_hidden(model, batch) * probe).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = grads()
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    checkpointed = grads()
    assert plain.keys() == checkpointed.keys() and plain
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-6, atol=1e-7, msg=name)


def float64_rms_norm(self, hidden_states):
    """RMSNorm in the input's own dtype: transformers' Qwen2/Llama norms round to float32 inside, which makes a
    float64 model agree only to float32 rounding wherever two layouts sum the same gradients in another order."""
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


@pytest.mark.parametrize("config", [tiny_qwen2_config, tiny_llama_config])
def test_shared_prompts_equal_the_plain_layout_in_float64(monkeypatch, config):
    """Must show (issue 17, shared prompts): the GRPO loss over a micro-batch whose prompts run once equals, in
    value and in every parameter gradient, the loss over every sequence run whole, to float64 rounding; fresh
    random groups (prompts of 1 to 60 tokens, 1 to 9 answers of 0 to 50 tokens, shuffled)."""
    from transformers.models.llama import modeling_llama
    from transformers.models.qwen2 import modeling_qwen2

    monkeypatch.setattr(modeling_qwen2.Qwen2RMSNorm, "forward", float64_rms_norm)
    monkeypatch.setattr(modeling_llama.LlamaRMSNorm, "forward", float64_rms_norm)
    seed = int(np.random.default_rng().integers(1 << 30))
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    model = load_causal_lm(config(VOCAB, num_kv_heads=2), dtype=torch.float64, attn_backend="sdpa")
    samples = []
    for _ in range(int(rng.integers(2, 6))):
        prompt = rng.integers(0, VOCAB, size=int(rng.integers(1, 61)))
        samples += [TrainingSample(prompt, rng.integers(0, VOCAB, size=int(rng.integers(0, 51))),
                                   advantage=float(rng.normal()))
                    for _ in range(int(rng.integers(1, 10)))]
    samples = [samples[i] for i in rng.permutation(len(samples))]
    samples[0] = TrainingSample(samples[0].prompt_ids, rng.integers(0, VOCAB, size=5), advantage=1.0)  # some action
    total = sum(s.num_tokens for s in samples)

    def loss_and_grads(shared_prompts):
        (batch,), _ = pack_rollouts(samples, max_tokens=total, shared_prompts=shared_prompts)
        model.zero_grad()
        hidden = forward_hidden(model, batch)
        logprobs = torch.zeros(batch.num_tokens, dtype=torch.float32)
        out = oreal.fused_policy_loss(hidden, lm_head_weight(model), batch.labels, batch.cu_seqlens, batch.advantages,
                                      logprobs, backend="torch")
        out.loss.backward()
        return batch, hidden.detach(), out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                                           if p.grad is not None}

    shared, shared_hidden, shared_loss, shared_grads = loss_and_grads(True)
    plain, plain_hidden, plain_loss, plain_grads = loss_and_grads(False)
    repeated = len(samples) - len({s.prompt_ids.tobytes() for s in samples})
    if repeated:
        assert shared.shared is not None and shared.shared.num_tokens < plain.num_tokens, seed
    torch.testing.assert_close(shared_hidden, plain_hidden, rtol=1e-12, atol=1e-12, msg=f"seed {seed}")
    torch.testing.assert_close(shared_loss, plain_loss, rtol=1e-12, atol=1e-12, msg=f"seed {seed}")
    assert shared_grads.keys() == plain_grads.keys()
    for name, grad in shared_grads.items():
        torch.testing.assert_close(grad, plain_grads[name], rtol=1e-10, atol=1e-12, msg=f"{name}, seed {seed}")
    assert any(g.abs().max() > 0 for g in shared_grads.values())
