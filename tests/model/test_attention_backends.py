"""The packed attention backends, checked against float64 per-sequence references.

flash-attn and xformers need a GPU; here they are replaced by the CPU stand-ins of
`kernel_standins.py`, installed under the real module names, which enforce the real libraries'
call contracts (see that module's docstring for what each stand-in assumes). The whole wiring is
exercised: a real `transformers` model load with the backend's registered name, the packed forward
through every layer, and the backward.
"""

import copy

import numpy as np
import pytest
import torch
from kernel_standins import install

from oreal.data import TrainingSample, pack_rollouts
from oreal.model import (
    attention,
    attn_backend_of,
    forward_hidden,
    load_causal_lm,
    resolve_backend,
    set_attn_backend,
)
from oreal.model.tiny import tiny_llama_config, tiny_qwen2_config

VOCAB = 300


@pytest.fixture
def standins(monkeypatch):
    return install(monkeypatch)


def packed_batch(rng, lengths):
    samples = []
    for length in lengths:
        ids = rng.integers(0, VOCAB, size=length)
        prompt_len = int(rng.integers(1, length + 1))
        response_len = length - prompt_len
        samples.append(TrainingSample(ids[:prompt_len], ids[prompt_len:], advantage=0.0, is_positive=True,
                                      rm_scores=np.zeros(response_len), ref_logprobs=np.zeros(response_len)))
    batches, _ = pack_rollouts(samples, max_tokens=sum(lengths))
    assert len(batches) == 1
    return batches[0]


def reference_attention(q, k, v, seq_lens, scale):
    """float64, per sequence, by the definition: q `[T, Hq, D]`, k/v `[T, Hkv, D]`; query head h reads kv head
    h // (Hq // Hkv); causal inside each sequence."""
    group = q.shape[1] // k.shape[1]
    out, start = [], 0
    for n in seq_lens:
        qs, ks, vs = (x[start:start + n].double() for x in (q, k, v))
        ks, vs = ks.repeat_interleave(group, dim=1), vs.repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", qs, ks) * scale
        scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        out.append(torch.einsum("hqk,khd->qhd", scores.softmax(-1), vs))
        start += n
    return torch.cat(out)


def float64_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """One unpadded sequence `[1, H, L, D]` through `reference_attention` (transformers' own eager attention
    takes its softmax in float32, so it is no float64 reference)."""
    assert query.shape[0] == 1 and attention_mask is None and dropout == 0.0
    flat = lambda x: x[0].transpose(0, 1)
    return reference_attention(flat(query), flat(key), flat(value), [query.shape[2]], scaling)[None], None


def per_sequence_reference(model, batch, probe):
    """The model cast to float64, each sequence alone through `float64_attention` (an independent path):
    final hidden states `[T, H]` and the gradients of `(hidden * probe).sum()`."""
    from transformers import AttentionInterface

    AttentionInterface.register("oreal_test_float64", float64_attention)
    reference = copy.deepcopy(model).to(torch.float64)
    reference.set_attn_implementation("oreal_test_float64")
    pieces, start = [], 0
    for n in batch.seq_lens:
        ids = batch.input_ids[:, start:start + n]
        pieces.append(reference.model(input_ids=ids, use_cache=False).last_hidden_state[0])
        start += n
    hidden = torch.cat(pieces)
    (hidden * probe.double()).sum().backward()
    return hidden.detach(), {name: p.grad for name, p in reference.named_parameters() if p.grad is not None}


def packed_forward_backward(model, batch, probe):
    model.zero_grad()
    hidden = forward_hidden(model, batch)
    (hidden.float() * probe).sum().backward()
    return hidden.detach(), {name: p.grad for name, p in model.named_parameters() if p.grad is not None}


def relative_error(got, expected):
    return ((got.double() - expected).norm() / expected.norm()).item()


# --- registration ------------------------------------------------------------------------------


def test_registered_names_are_not_taken_for_transformers_flash_attention():
    """transformers treats any implementation name containing "flash" as a request for its own flash-attention
    loader (and refuses names it does not know): no registered name may look like one."""
    from transformers.utils.generic import is_flash_attention_requested

    for backend in attention.BACKENDS:
        name = attention.implementation_name(backend)
        assert not is_flash_attention_requested(requested_attention_implementation=name), name
        assert attention.backend_of_implementation(name) == backend
    assert attention.backend_of_implementation("sdpa") is None
    assert attention.backend_of_implementation("flash_attention_2") is None


# --- flash-attn --------------------------------------------------------------------------------


@pytest.mark.parametrize("config", [tiny_qwen2_config, tiny_llama_config])
def test_flash_backend_loads_trains_and_matches_float64(standins, config):
    """A real transformers load with the flash backend, then a packed forward and backward in bf16 (flash-attn
    computes in fp16/bf16 only): the stand-in is called once per layer with int32 cu_seqlens, and hidden states
    and gradients match the float64 per-sequence reference to bf16 accuracy."""
    flash, _ = standins
    torch.manual_seed(10)
    model = load_causal_lm(config(VOCAB, num_layers=3, num_heads=6, num_kv_heads=2, hidden_size=48),
                           dtype=torch.bfloat16, attn_backend="flash_attn")
    assert attn_backend_of(model) == "flash_attn"
    batch = packed_batch(np.random.default_rng(11), [1, 37, 2, 90, 16])
    probe = torch.randn(batch.num_tokens, model.config.hidden_size)
    hidden, grads = packed_forward_backward(model, batch, probe)
    assert len(flash.calls) == 3 and all(c["dtype"] == torch.bfloat16 and c["causal"] for c in flash.calls)
    assert flash.calls[0]["shape"] == (batch.num_tokens, 6, 8) and flash.calls[0]["kv_heads"] == 2

    reference_hidden, reference_grads = per_sequence_reference(model, batch, probe)
    assert relative_error(hidden, reference_hidden) < 2e-2
    assert set(grads) == set(reference_grads) == {n for n, _ in model.named_parameters()} - {"lm_head.weight"}
    for name, grad in grads.items():
        assert relative_error(grad, reference_grads[name]) < 5e-2, name


def test_flash_model_still_generates(standins):
    """Outside packed forwards the flash-backed model is transformers' SDPA (its name no longer makes
    transformers take the flash-attention code paths of generate())."""
    torch.manual_seed(12)
    model = load_causal_lm(tiny_qwen2_config(VOCAB), dtype=torch.bfloat16, attn_backend="flash_attn")
    ids = torch.randint(0, VOCAB, (1, 7))
    ours = model.generate(input_ids=ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    set_attn_backend(model, "sdpa")
    plain = model.generate(input_ids=ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(ours, plain) and ours.shape == (1, 12)


def test_flash_backend_refuses_float32(standins):
    with pytest.raises(ValueError, match=r"'flash_attn' is not available: flash_attn computes in float16, "
                                         r"bfloat16 only, and the model computes in float32"):
        load_causal_lm(tiny_qwen2_config(VOCAB), dtype=torch.float32, attn_backend="flash_attn")
    # fp32 master weights computing in bf16 (FSDP2 mixed precision) may use it ...
    model = load_causal_lm(tiny_qwen2_config(VOCAB), dtype=torch.float32, attn_backend="flash_attn",
                           compute_dtype=torch.bfloat16)
    assert attn_backend_of(model) == "flash_attn"
    # ... but a forward that does run in fp32 stops with the reason, not deep inside the kernel
    batch = packed_batch(np.random.default_rng(13), [5, 9])
    with pytest.raises(ValueError, match=r"attn_backend 'flash_attn': flash_attn computes in float16, bfloat16 only, "
                                         r"and the model computes in float32; compute in bfloat16"):
        forward_hidden(model, batch)


def test_auto_prefers_flash_then_xformers_then_sdpa(standins, monkeypatch):
    assert resolve_backend("auto", "cpu", torch.bfloat16) == "flash_attn"
    assert resolve_backend("auto", "cpu", torch.float32) == "xformers"
    assert resolve_backend("auto", "cpu", torch.float64) == "sdpa"
    assert resolve_backend("auto", "cpu") == "flash_attn"  # dtype unknown
    model = load_causal_lm(tiny_qwen2_config(VOCAB), dtype=torch.bfloat16)  # attn_backend="auto"
    assert attn_backend_of(model) == "flash_attn"
    assert attn_backend_of(load_causal_lm(tiny_qwen2_config(VOCAB), dtype=torch.float32)) == "xformers"
    monkeypatch.setattr(attention, "KERNEL_DEVICE_TYPES", {"flash_attn": ("cuda",), "xformers": ("cuda",)})
    assert attn_backend_of(load_causal_lm(tiny_qwen2_config(VOCAB), dtype=torch.bfloat16)) == "sdpa"


# --- xformers ----------------------------------------------------------------------------------


@pytest.mark.parametrize("checkpointing", [False, True])
def test_xformers_backend_trains_with_one_mask_per_forward(standins, checkpointing):
    """xformers' grouped-query 5-D layout has no backward, so the backend passes 4-D tensors with K/V expanded;
    its block-diagonal mask is built once per forward (and reused by checkpoint recomputation), not per layer.
    Hidden states and gradients (fp32) match the float64 per-sequence reference."""
    _, xformers = standins
    torch.manual_seed(14)
    model = load_causal_lm(tiny_qwen2_config(VOCAB, num_layers=3, num_heads=6, num_kv_heads=3, hidden_size=48),
                           dtype=torch.float32, attn_backend="xformers").train()
    if checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    batch = packed_batch(np.random.default_rng(15), [33, 1, 64, 7])
    probe = torch.randn(batch.num_tokens, model.config.hidden_size)
    hidden, grads = packed_forward_backward(model, batch, probe)
    assert xformers.backward_5d_raised == 0 and xformers.masks_built == 1
    assert len(xformers.calls) == (6 if checkpointing else 3)
    assert all(c["shape"] == c["key_shape"] == (1, batch.num_tokens, 6, 8) for c in xformers.calls)

    model.eval()
    reference_hidden, reference_grads = per_sequence_reference(model, batch, probe)
    torch.testing.assert_close(hidden.double(), reference_hidden, rtol=1e-4, atol=1e-5)
    assert set(grads) == set(reference_grads) == {n for n, _ in model.named_parameters()} - {"lm_head.weight"}
    for name, grad in grads.items():
        torch.testing.assert_close(grad.double(), reference_grads[name], rtol=1e-3, atol=1e-5, msg=name)


def test_xformers_mask_is_built_once_per_forward(standins):
    _, xformers = standins
    model = load_causal_lm(tiny_qwen2_config(VOCAB, num_layers=4), dtype=torch.float32, attn_backend="xformers")
    batch = packed_batch(np.random.default_rng(20), [3, 40, 1])
    with torch.no_grad():
        forward_hidden(model, batch)
        assert len(xformers.calls) == 4 and xformers.masks_built == 1
        forward_hidden(model, batch)
        assert len(xformers.calls) == 8 and xformers.masks_built == 2


# --- every backend, at the attention function ---------------------------------------------------


@pytest.mark.parametrize("backend, dtype, tolerance", [("sdpa", torch.float64, 1e-12), ("sdpa", torch.float32, 1e-5),
                                                       ("xformers", torch.float32, 1e-5),
                                                       ("flash_attn", torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("q_heads, kv_heads, head_dim", [(6, 2, 8), (4, 4, 24), (5, 1, 16)])
def test_attention_function_matches_float64_reference(standins, backend, dtype, tolerance, q_heads, kv_heads,
                                                      head_dim):
    """Odd head counts (MQA, GQA, MHA) and sequence lengths (1 included), fresh random inputs, gradients too."""
    rng = np.random.default_rng(q_heads * 100 + head_dim)
    seq_lens = tuple(int(n) for n in rng.choice([1, 2, 3, 17, 40, 65], size=int(rng.integers(1, 6))))
    total = sum(seq_lens)
    meta = attention.VarlenMetadata(torch.tensor([0, *np.cumsum(seq_lens)]), max(seq_lens), seq_lens)
    scale = float(rng.uniform(0.1, 0.5))
    q = torch.randn(1, q_heads, total, head_dim, dtype=dtype, requires_grad=True)
    k, v = (torch.randn(1, kv_heads, total, head_dim, dtype=dtype, requires_grad=True) for _ in range(2))
    out, weights = attention.ATTENTION_FUNCTIONS[backend](None, q, k, v, None, scaling=scale, oreal_varlen=meta)
    assert weights is None and out.shape == (1, total, q_heads, head_dim) and out.dtype == dtype

    flat = lambda x: x.detach()[0].transpose(0, 1)
    q64, k64, v64 = (flat(x).double().requires_grad_() for x in (q, k, v))
    expected = reference_attention(q64, k64, v64, seq_lens, scale)
    assert relative_error(out[0].detach(), expected) < tolerance
    cotangent = torch.randn_like(expected)
    out[0].backward(cotangent.to(dtype))
    expected.backward(cotangent)
    for got, want in ((q, q64), (k, k64), (v, v64)):
        assert relative_error(flat(got.grad), want.grad) < 4 * tolerance


# --- sdpa ---------------------------------------------------------------------------------------


class LargestTensor(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the largest tensor any op produces."""

    def __init__(self):
        super().__init__()
        self.numel, self.op = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(tensor, torch.Tensor) and tensor.numel() > self.numel:
                self.numel, self.op = tensor.numel(), str(func)
        return out


def test_sdpa_backend_builds_no_tokens_by_tokens_mask():
    """A dense [T, T] mask costs 1 GiB at 32k tokens: the SDPA backend's forward and backward build nothing
    of that size (here T > 2000 in sequences of up to 200 tokens)."""
    torch.manual_seed(16)
    model = load_causal_lm(tiny_qwen2_config(VOCAB), dtype=torch.float32, attn_backend="sdpa")
    rng = np.random.default_rng(17)
    lengths = [int(n) for n in rng.integers(1, 200, size=30)] + [200]
    batch = packed_batch(rng, lengths)
    with LargestTensor() as largest:
        forward_hidden(model, batch).sum().backward()
    assert batch.num_tokens > 2000
    assert largest.numel < batch.num_tokens ** 2 / 16, (largest.numel, largest.op)


def test_sdpa_backend_matches_float64_per_sequence_model():
    """The whole packed model in float64 against each sequence alone through `float64_attention`. (Qwen2's
    RMSNorm computes in float32 even in a float64 model, so agreement stops near float32 rounding.)"""
    torch.manual_seed(18)
    model = load_causal_lm(tiny_qwen2_config(VOCAB, num_heads=6, num_kv_heads=2, hidden_size=48),
                           dtype=torch.float64, attn_backend="sdpa")
    batch = packed_batch(np.random.default_rng(19), [1, 130, 2, 57, 300])
    probe = torch.randn(batch.num_tokens, model.config.hidden_size, dtype=torch.float64)
    hidden, grads = packed_forward_backward(model, batch, probe)
    reference_hidden, reference_grads = per_sequence_reference(model, batch, probe)
    torch.testing.assert_close(hidden, reference_hidden, rtol=1e-6, atol=1e-9)
    assert set(grads) == set(reference_grads)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, reference_grads[name], rtol=1e-6, atol=1e-8, msg=name)


# --- availability -------------------------------------------------------------------------------


def test_backend_resolution_without_the_kernels():
    from oreal.model import available_backends

    assert resolve_backend("auto", "cpu") == "sdpa" and resolve_backend("sdpa", "cpu") == "sdpa"
    reasons = available_backends("cpu")
    assert reasons["sdpa"] is None and "CUDA" in reasons["flash_attn"] and "CUDA" in reasons["xformers"]
    with pytest.raises(ValueError, match=r"'flash_attn' is not available: flash_attn runs on CUDA devices only"):
        resolve_backend("flash_attn", "cpu")
    with pytest.raises(ValueError, match=r"'xformers' is not available: xformers runs on CUDA devices only"):
        load_causal_lm(tiny_qwen2_config(VOCAB), attn_backend="xformers")
    with pytest.raises(ValueError, match="unknown attention backend 'flash'"):
        resolve_backend("flash", "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="compute_device: 'cuda' was asked for, but torch sees no CUDA device"):
            load_causal_lm(tiny_qwen2_config(VOCAB), compute_device="cuda")


def test_backend_missing_package_is_named(monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("flash_attn", "xformers") else real_find_spec(name, *a))
    reasons = attention.available_backends("cuda")
    assert "flash_attn is not installed (build it from source against a CUDA torch: pip install flash-attn" \
        in reasons["flash_attn"]
    assert "xformers is not installed (pip install xformers" in reasons["xformers"]


# --- shared prompts (oreal.data.shared_prompts) ---------------------------------------------------


def shared_and_plain_batches(rng, groups):
    """`groups`: (prompt length, [response lengths]); every prompt is repeated for its responses and the samples
    are shuffled. Returns the micro-batch packed with shared prompts and the same sequences packed plainly."""
    samples = []
    for prompt_len, response_lens in groups:
        prompt = rng.integers(0, VOCAB, size=prompt_len)
        samples += [TrainingSample(prompt, rng.integers(0, VOCAB, size=n), advantage=0.0, is_positive=True)
                    for n in response_lens]
    samples = [samples[i] for i in rng.permutation(len(samples))]
    total = sum(s.num_tokens for s in samples)
    (shared,), _ = pack_rollouts(samples, max_tokens=total, shared_prompts=True)
    (plain,), _ = pack_rollouts(samples, max_tokens=total)
    assert shared.shared is not None and shared.seq_indices == plain.seq_indices
    assert shared.shared.num_tokens < plain.num_tokens
    return shared, plain


GROUPS = [(7, [5, 0, 12, 1]), (1, [3, 3]), (40, [9]), (2, [30, 1, 17])]


@pytest.mark.parametrize("backend, dtype, hidden_tol, grad_tol", [("sdpa", torch.float64, 1e-6, 1e-6),
                                                                   ("xformers", torch.float32, 1e-5, 1e-4),
                                                                   ("flash_attn", torch.bfloat16, 2e-2, 5e-2)])
def test_shared_prompts_match_float64_per_sequence_model(standins, backend, dtype, hidden_tol, grad_tol):
    """Each distinct prompt runs once (the kernel sees only the compact rows, keys gathered per segment), and the
    hidden states of every sequence and the parameter gradients match each sequence run alone in float64.
    Prompts of 1 to 40 tokens, empty and one-token answers, a prompt with one answer, shuffled order."""
    flash, xformers = standins
    torch.manual_seed(21)
    model = load_causal_lm(tiny_qwen2_config(VOCAB, num_layers=2, num_heads=6, num_kv_heads=2, hidden_size=48),
                           dtype=dtype, attn_backend=backend)
    shared, plain = shared_and_plain_batches(np.random.default_rng(22), GROUPS)
    probe = torch.randn(plain.num_tokens, model.config.hidden_size, dtype=torch.float64 if dtype == torch.float64
                        else torch.float32)
    hidden, grads = packed_forward_backward(model, shared, probe)
    compact = shared.shared.num_tokens
    if backend == "flash_attn":
        assert [c["shape"][0] for c in flash.calls] == [compact, compact]
    if backend == "xformers":
        assert [c["shape"][1] for c in xformers.calls] == [compact, compact] and xformers.masks_built == 1
        assert all(c["key_shape"][1] == int(shared.shared.kv_index.numel()) for c in xformers.calls)

    reference_hidden, reference_grads = per_sequence_reference(model, plain, probe)
    assert relative_error(hidden, reference_hidden) < hidden_tol
    assert set(grads) == set(reference_grads)
    for name, grad in grads.items():
        assert relative_error(grad, reference_grads[name]) < grad_tol, name


@pytest.mark.parametrize("backend, dtype, tolerance", [("sdpa", torch.float64, 1e-12), ("sdpa", torch.float32, 1e-5),
                                                       ("xformers", torch.float32, 1e-5),
                                                       ("flash_attn", torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("q_heads, kv_heads", [(6, 2), (4, 4), (5, 1)])
def test_attention_function_with_shared_keys_matches_float64_reference(standins, backend, dtype, tolerance, q_heads,
                                                                       kv_heads):
    """Compact rows in, segments with gathered keys and bottom-right causal masks: the output, spread back to
    every sequence, and the gradients of the compact q/k/v equal the per-sequence reference on the full rows."""
    rng = np.random.default_rng(q_heads * 10 + kv_heads)
    shared, plain = shared_and_plain_batches(rng, GROUPS)
    layout = shared.shared
    meta = attention.VarlenMetadata(layout.cu_seqlens_q, max(layout.q_lens), layout.q_lens, kv_index=layout.kv_index,
                                    cu_seqlens_k=layout.cu_seqlens_k, kv_lens=layout.kv_lens)
    compact, head_dim, scale = layout.num_tokens, 16, float(rng.uniform(0.1, 0.5))
    q = torch.randn(1, q_heads, compact, head_dim, dtype=dtype, requires_grad=True)
    k, v = (torch.randn(1, kv_heads, compact, head_dim, dtype=dtype, requires_grad=True) for _ in range(2))
    out, _ = attention.ATTENTION_FUNCTIONS[backend](None, q, k, v, None, scaling=scale, oreal_varlen=meta)
    assert out.shape == (1, compact, q_heads, head_dim)
    spread = out[0].index_select(0, layout.expand_index)

    flat = lambda x: x.detach()[0].transpose(0, 1)
    q64, k64, v64 = (flat(x).double().requires_grad_() for x in (q, k, v))
    expected = reference_attention(*(x.index_select(0, layout.expand_index) for x in (q64, k64, v64)),
                                   plain.seq_lens, scale)
    assert relative_error(spread.detach(), expected) < tolerance
    cotangent = torch.randn_like(expected)
    spread.backward(cotangent.to(dtype))
    expected.backward(cotangent)
    for got, want in ((q, q64), (k, k64), (v, v64)):
        assert relative_error(flat(got.grad), want.grad) < 4 * tolerance


def test_shared_keys_need_as_many_keys_as_queries():
    with pytest.raises(ValueError, match="each segment needs at least as many keys as queries"):
        attention.VarlenMetadata(torch.tensor([0, 3]), 3, (3,), kv_index=torch.arange(2),
                                 cu_seqlens_k=torch.tensor([0, 2]), kv_lens=(2,))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gathered_rows_sum_their_gradients_in_fp32(dtype):
    """A shared prompt's rows are read by every answer: `gather_rows`' gradient is the fp32 sum of the repeats,
    rounded once (what the plain layout's fp32-accumulated weight gradients see). A row read 4096 times, with
    confident-scale gradients (|g| up to ~40) and tiny ones mixed in; the forward is `index_select` itself.
    (On CPU torch's own `index_select` backward is exact too; on CUDA it adds the repeats by half-precision
    atomics, which this pins against.)"""
    gen = torch.Generator().manual_seed(int(np.random.default_rng().integers(1 << 30)))
    source = torch.randn(3, 5, 64, generator=gen).to(dtype).requires_grad_()
    index = torch.tensor([1] * 4096 + [0, 2, 1], dtype=torch.long)
    out = attention.gather_rows(source, 1, index)
    assert torch.equal(out, source.index_select(1, index))
    grad = (torch.randn(3, index.numel(), 64, generator=gen) * 40 * (torch.rand(index.numel(), 1, generator=gen) < 0.5)
            + 1e-3 * torch.randn(3, index.numel(), 64, generator=gen)).to(dtype)
    out.backward(grad)
    exact = torch.zeros(3, 5, 64, dtype=torch.float64).index_add_(1, index, grad.double())
    # one rounding to `dtype` (relative eps) after an fp32 sum of 4096 terms of up to ~40 (absolute ~1e-2)
    tolerance = dict(rtol=torch.finfo(dtype).eps, atol=0.05)
    torch.testing.assert_close(source.grad.double(), exact, **tolerance)
    # what adding the repeats one half-precision add at a time gives (CUDA's atomics) falls outside it
    atomic = torch.zeros(3, 64, dtype=dtype)
    for j in (index == 1).nonzero().flatten().tolist():
        atomic = atomic + grad[:, j]
    with pytest.raises(AssertionError):
        torch.testing.assert_close(atomic.double(), exact[:, 1], **tolerance)
    plain = source.detach().requires_grad_()
    attention.gather_rows(plain.float(), 1, index).backward(grad.float())  # fp32 sources keep index_select
    assert plain.grad.dtype == dtype and plain.grad.shape == source.shape
