"""SFT: the in-process tokenizer and tiny Qwen2, the data layout, the command line, and a short torchrun run."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from oreal.runtime.config import ConfigError
from oreal.demo.task import Difficulty, generate_split, read_jsonl, write_jsonl
from oreal.algorithms.sft import (SFTConfig, SFTDataConfig, SFTModelConfig, SFTTrainConfig, build_initial_model, main,
                       parse_args, tokenize_examples)

REPO = Path(__file__).resolve().parents[2]
SEED = random.randrange(1_000_000)


def small_config(tmp_path: Path, train_file: Path, **train) -> SFTConfig:
    return SFTConfig(output_dir=str(tmp_path / "sft"),
                     model=SFTModelConfig(vocab_size=400, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                                          intermediate_size=64, attn_backend="sdpa"),
                     data=SFTDataConfig(train_file=str(train_file)),
                     train=SFTTrainConfig(**{"steps": 8, "sequences_per_step": 16, "micro_batch_tokens": 256,
                                             "loss_backend": "torch", "seed": SEED, "log_interval": 1, **train}))


@pytest.fixture(scope="module")
def train_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("sft_data") / "train.jsonl"
    write_jsonl(generate_split("train", 300, Difficulty(max_steps=2), seed=SEED), path)
    return path


def test_tokenizer_round_trips_and_the_model_matches_it(tmp_path, train_file):
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    cfg = small_config(tmp_path, train_file)
    records = read_jsonl(train_file)
    build_initial_model(cfg, records, tmp_path / "init")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "init", local_files_only=True)
    config = AutoConfig.from_pretrained(tmp_path / "init", local_files_only=True)
    assert config.model_type == "qwen2" and config.vocab_size == len(tokenizer) <= 400
    assert tokenizer.eos_token == "<|im_end|>" and config.eos_token_id == tokenizer.eos_token_id
    assert GenerationConfig.from_pretrained(tmp_path / "init").eos_token_id == tokenizer.eos_token_id
    # Round trip on text it was trained on, on held-out problems and on characters it never saw (byte-level).
    unseen = [p.problem + "\n" + p.solution for p in generate_split("heldout", 20, Difficulty(max_steps=4), seed=SEED)]
    for text in [r["solution"] for r in records[:20]] + unseen + ["Zürich: 3½ × 7 = ?  \\frac{1}{2} 🙂"]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text
        assert max(ids) < config.vocab_size
    # SFT examples: ChatML prompt, then the worked solution and the end-of-turn token.
    examples = tokenize_examples(records[:5], tokenizer, cfg)
    for record, (prompt, response) in zip(records, examples):
        assert tokenizer.decode(prompt) == (f"<|im_start|>user\n{record['problem']}<|im_end|>\n"
                                            "<|im_start|>assistant\n")
        assert tokenizer.decode(response) == record["solution"] + "<|im_end|>"
        assert response[-1] == tokenizer.eos_token_id


def test_command_line_errors_name_the_option(tmp_path, train_file):
    config_file = tmp_path / "cfg.py"
    config_file.write_text(
        "from oreal.algorithms.sft import SFTConfig, SFTDataConfig\n"
        f"def sft_config():\n    return SFTConfig(data=SFTDataConfig(train_file={str(train_file)!r}))\n")
    cfg, print_config = parse_args(["--config", str(config_file), "--steps", "7", "--optim.lr", "0.01",
                                    "--output-dir", str(tmp_path / "o")])
    assert cfg.train.steps == 7 and cfg.optim.lr == 0.01 and cfg.output_dir == str(tmp_path / "o")
    assert not print_config
    with pytest.raises(ConfigError, match="train.stepz"):
        parse_args(["--config", str(config_file), "--train.stepz", "3"])
    with pytest.raises(ConfigError, match="data.train_file.*does not exist"):
        parse_args(["--config", str(config_file), "--data.train_file", str(tmp_path / "missing.jsonl")])
    with pytest.raises(ConfigError, match="sft_config"):
        other = tmp_path / "other.py"
        other.write_text("def config():\n    return None\n")
        parse_args(["--config", str(other)])
    assert main(["--config", str(config_file), "--train.steps", "0"]) == 2  # a validation error, found before
    assert not torch.distributed.is_initialized()  # any process group was started


def test_short_sft_run_under_torchrun_lowers_the_loss(tmp_path, train_file):
    """A few steps on 2 processes (gloo, FSDP2): the loss falls and the exported model generates."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config_file = tmp_path / "cfg.py"
    config_file.write_text(
        "from oreal.algorithms.sft import SFTConfig, SFTDataConfig, SFTModelConfig, SFTTrainConfig\n"
        "from oreal.runtime.config import OptimConfig\n"
        "def sft_config():\n"
        "    return SFTConfig(\n"
        "        model=SFTModelConfig(vocab_size=400, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,\n"
        "                             intermediate_size=64, attn_backend='sdpa'),\n"
        f"        data=SFTDataConfig(train_file={str(train_file)!r}),\n"
        "        optim=OptimConfig(lr=1e-2, min_lr=1e-3, warmup_steps=1, weight_decay=0.0, grad_clip=1.0),\n"
        "        train=SFTTrainConfig(steps=8, sequences_per_step=16, micro_batch_tokens=256, loss_backend='torch',\n"
        "                             log_interval=1))\n")
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
               "oreal.algorithms.sft", "--config", str(config_file), "--output-dir", str(out), "--train.seed", str(SEED)]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss/sft"] for r in records]
    assert [r["step"] for r in records] == list(range(1, 9))
    assert losses[-1] < 0.8 * losses[0], losses  # from ~ln(V) (random init) clearly downwards
    assert all(torch.isfinite(torch.tensor(losses)))
    model = AutoModelForCausalLM.from_pretrained(out / "hf")
    tokenizer = AutoTokenizer.from_pretrained(out / "hf")
    ids = tokenizer("<|im_start|>user\nMia has 3 pens.<|im_end|>\n<|im_start|>assistant\n",
                    return_tensors="pt")["input_ids"]
    generated = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert generated.shape[1] > ids.shape[1]
    # The exported weights are what the two ranks trained: every parameter moved away from the initial model.
    initial = AutoModelForCausalLM.from_pretrained(out / "init_model")
    for (name, trained), (_, start) in zip(model.named_parameters(), initial.named_parameters()):
        assert not torch.equal(trained, start), name
