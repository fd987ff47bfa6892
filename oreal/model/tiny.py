"""Tiny models and tokenizers built offline, for tests, demos and CPU smoke runs.

Nothing is downloaded: `build_tiny_tokenizer(texts)` trains a byte-level BPE tokenizer in-process
with `tokenizers` and gives it a ChatML chat template (`<|im_start|>role ... <|im_end|>`, as Qwen2
uses), and `tiny_qwen2_config` / `tiny_llama_config` describe randomly initialised models of a few
hundred thousand parameters that run a forward on CPU in milliseconds.
"""

from __future__ import annotations

from collections.abc import Iterable

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

# ChatML, as Qwen2 chat models use it; a system message is optional.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_tiny_tokenizer(texts: Iterable[str], vocab_size: int = 512, *, chat_template: str | None = CHATML_TEMPLATE):
    """A `PreTrainedTokenizerFast` (byte-level BPE) trained on `texts`.

    Byte-level, so any text encodes, unseen characters included. Special tokens: `<|endoftext|>`
    (pad), `<|im_start|>`, `<|im_end|>` (eos). `vocab_size` is an upper bound: a small corpus
    may yield fewer merges.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = list(texts)
    if not texts:
        raise ValueError("texts: need at least one text to train a tokenizer on")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<|endoftext|>", eos_token="<|im_end|>",
                                   chat_template=chat_template)


def tiny_qwen2_config(vocab_size: int = 512, *, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4,
                      num_kv_heads: int = 2, intermediate_size: int = 128, max_position_embeddings: int = 4096,
                      tie_word_embeddings: bool = False, **overrides):
    """A small random `Qwen2Config` (grouped-query attention, q/k/v biases, RoPE, RMSNorm, SwiGLU)."""
    from transformers import Qwen2Config

    overrides.setdefault("use_sliding_window", False)
    return Qwen2Config(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
                       num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                       max_position_embeddings=max_position_embeddings, tie_word_embeddings=tie_word_embeddings,
                       **overrides)


def tiny_llama_config(vocab_size: int = 512, *, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4,
                      num_kv_heads: int = 2, intermediate_size: int = 128, max_position_embeddings: int = 4096,
                      **overrides):
    """A small random `LlamaConfig`."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
                       num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                       max_position_embeddings=max_position_embeddings, **overrides)
