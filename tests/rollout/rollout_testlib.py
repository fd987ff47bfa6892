"""Shared helpers for the rollout tests: tiny Qwen2 models built from configs, reference decoding."""

from __future__ import annotations

import torch


def tiny_config(**overrides):
    """A Qwen2 small enough for CPU tests; large init so greedy choices are far from ties."""
    from transformers import Qwen2Config

    fields = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  tie_word_embeddings=False, initializer_range=0.4, rope_theta=10000.0)
    fields.update(overrides)
    return Qwen2Config(**fields)


def tiny_model(config, seed: int, dtype=torch.float32):
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(seed)
    return Qwen2ForCausalLM(config).to(dtype).eval()


@torch.no_grad()
def greedy_reference(model, prompts, max_new_tokens: int):
    """Greedy tokens and their log-probs by repeated full forwards (no cache, no padding)."""
    tokens, logps = [], []
    device = next(model.parameters()).device
    for prompt in prompts:
        ids = torch.tensor([prompt], device=device)
        out_t, out_lp = [], []
        for _ in range(max_new_tokens):
            logits = model(input_ids=ids).logits[0, -1].float()
            nxt = int(logits.argmax())
            out_t.append(nxt)
            out_lp.append(float(torch.log_softmax(logits, -1)[nxt]))
            ids = torch.cat([ids, torch.tensor([[nxt]], device=device)], dim=1)
        tokens.append(out_t)
        logps.append(out_lp)
    return tokens, logps
