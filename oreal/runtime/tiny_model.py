"""The tiny offline model of CPU runs and tests: a random Qwen2 and a tokenizer trained in-process.

`model.tiny.enabled` makes rank 0 write one to `<output_dir>/tiny_model` before anything loads, so
every rank, the reference, the token RM and the rollout engine start from the very same weights,
read from disk like a real checkpoint. Nothing is downloaded. The tokenizer is trained on the run's
own prompt and eval files: byte-level BPE (`oreal.model.tiny`, any text encodes) or a word-level
vocabulary (`model.tiny.tokenizer word`).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from oreal.runtime.config import Config
from oreal.runtime.setup_errors import SetupError
from oreal.data import PromptFormatError, read_prompt_file
from oreal.model import load_causal_lm
from oreal.model.tiny import CHATML_TEMPLATE, SPECIAL_TOKENS, build_tiny_tokenizer, tiny_qwen2_config


def write_tiny_model(cfg: Config, path: str) -> None:
    """A tiny random Qwen2 and a tokenizer trained on the run's own prompts, saved to `path` (atomically)."""
    tiny = cfg.model.tiny
    corpus = ["user assistant system"]
    for option, files, fmt in (("data.train_files", cfg.data.train_files, cfg.data.format),
                               ("eval.files", cfg.eval.files, "auto")):
        for file in files:
            try:
                examples = read_prompt_file(file, fmt)
            except PromptFormatError as exc:
                raise SetupError(f"--{option}: {exc}") from exc
            corpus.extend(f"{e.question} {e.gold_answer} {cfg.data.system_prompt} {cfg.data.instruction}"
                          for e in examples)
    if tiny.tokenizer == "word":
        tokenizer = build_word_tokenizer(corpus)
    else:
        tokenizer = build_tiny_tokenizer(corpus, vocab_size=tiny.vocab_size)
    config = tiny_qwen2_config(len(tokenizer), hidden_size=tiny.hidden_size, num_layers=tiny.num_layers,
                               num_heads=tiny.num_heads, num_kv_heads=tiny.num_kv_heads,
                               intermediate_size=tiny.intermediate_size,
                               max_position_embeddings=max(4096, cfg.rollout.max_total_tokens),
                               eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                               bos_token_id=None)
    torch.manual_seed(tiny.seed)
    model = load_causal_lm(config, dtype=torch.float32, attn_backend="sdpa", liger=False)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    tmp = Path(path + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, path)


def build_word_tokenizer(texts: list[str]):
    """A word-level tokenizer trained on `texts` (words, single digits, punctuation), with ChatML specials.

    Sampling a random model over such a vocabulary gives readable words and numbers (a byte-level
    vocabulary gives mostly invalid bytes), which is what lets a tiny random policy get arithmetic
    answers right by chance and so gives OREAL's filter both right and wrong samples to keep.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel(unk_token="<|endoftext|>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(),
                                                       pre_tokenizers.Digits(individual_digits=True)])
    tokenizer.decoder = decoders.WordPiece(prefix="##")  # joins tokens with single spaces
    trainer = trainers.WordLevelTrainer(special_tokens=list(SPECIAL_TOKENS), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<|endoftext|>", eos_token="<|im_end|>",
                                   unk_token="<|endoftext|>", chat_template=CHATML_TEMPLATE)
