"""`oreal-sft` on real data: the chat and pair layouts, loss on response tokens only, the example order's exact
continuation, the output-folder rule, and an exact resume after a hard kill."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from oreal.algorithms.sft import (ExampleOrder, SFTConfig, SFTDataConfig, build_initial_model, main,
                                  tokenize_examples)
from oreal.data import TrainingSample, pack_rollouts
from oreal.data.sft_records import read_sft_records
from oreal.runtime.config import ConfigError

REPO = Path(__file__).resolve().parents[2]
SEED = random.randrange(1_000_000)
WORDS = ["seven", "apples", "minus", "three", "boxed", "answer", "triangle", "area", "is", "x", "=", "12"]


def text(rng: random.Random, words: int = 6) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, words)))


def rows(rng: random.Random) -> list[tuple[dict, str, object]]:
    """(JSON row, expected response, expected question or messages) in every accepted layout."""
    q, a, s = text(rng), text(rng), text(rng)
    return [
        ({"messages": [{"role": "system", "content": s}, {"role": "user", "content": q},
                       {"role": "assistant", "content": a}]}, a,
         ({"role": "system", "content": s}, {"role": "user", "content": q})),
        ({"message_data": [{"role": "user", "content": q}, {"role": "assistant", "content": a}], "pass_rate": 0.5},
         a, ({"role": "user", "content": q},)),
        ({"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]}, a,
         ({"role": "user", "content": q},)),
        ({"prompt": q, "response": a}, a, q),
        ({"problem": q, "solution": a, "answer": 12}, a, q),
        ({"question": q, "completion": a}, a, q),
    ]


def test_every_layout_reads_and_bad_lines_name_file_line_and_field(tmp_path):
    rng = random.Random(SEED)
    cases = rows(rng)
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row, _, _ in cases) + "\n")
    for record, (_, response, before) in zip(read_sft_records(path), cases):
        assert record.response == response
        if isinstance(before, tuple):
            assert record.messages == before and record.question is None
        else:
            assert record.question == before and record.messages is None
    assert read_sft_records(path)[4].answer == "12"
    bad = [({"messages": [{"role": "user", "content": "q"}]}, "must be a non-empty assistant turn"),
           ({"messages": [{"role": "assistant", "content": "a"}]}, "no user turn"),
           ({"messages": [{"role": "robot", "content": "q"}, {"role": "assistant", "content": "a"}]}, "role 'robot'"),
           ({"messages": []}, "non-empty list"),
           ({"prompt": "q"}, "field 'response' is missing"),
           ({"problem": "q", "solution": "  "}, "field 'solution' is missing or empty"),
           ({"text": "hello"}, "no SFT example")]
    for row, message in bad:
        line = rng.randint(1, 4)
        path.write_text(json.dumps({"prompt": "p", "response": "r"}) + "\n" * line + json.dumps(row) + "\n")
        with pytest.raises(ValueError, match=rf"sft.jsonl:{line + 1}: .*{message}"):
            read_sft_records(path)
    path.write_bytes(b'{"prompt": "\xff", "response": "r"}\n')
    with pytest.raises(ValueError, match="not UTF-8"):
        read_sft_records(path)


def test_prompts_render_like_rl_and_the_loss_is_on_the_response_only(tmp_path):
    from transformers import AutoTokenizer

    rng = random.Random(SEED + 1)
    cases = rows(rng)
    cfg = SFTConfig(data=SFTDataConfig(train_file="unused", instruction="\nThink."))
    build_initial_model(cfg, [row for row, _, _ in cases] * 4, tmp_path / "init")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "init")
    examples = tokenize_examples([row for row, _, _ in cases], tokenizer, cfg)
    for (row, response, before), (prompt_ids, response_ids) in zip(cases, examples):
        if isinstance(before, tuple):  # chat turns verbatim through the chat template
            expected = tokenizer.apply_chat_template(list(before), tokenize=False, add_generation_prompt=True)
        else:  # a bare question as the RL trainer renders it: template + instruction
            expected = tokenizer.apply_chat_template([{"role": "user", "content": before + "\nThink."}],
                                                     tokenize=False, add_generation_prompt=True)
        assert tokenizer.decode(prompt_ids) == expected
        assert response_ids[-1] == tokenizer.eos_token_id and tokenizer.decode(response_ids[:-1]) == response
        batch = pack_rollouts([TrainingSample(prompt_ids, response_ids, advantage=1.0, is_positive=True)],
                              max_tokens=512, world_size=1, rank=0, pad_token_id=0)[0][0]
        targets = batch.labels[batch.labels != -100].tolist()
        assert targets == response_ids  # every response token is a target, no prompt token is
    cfg.data.end_token = "<|im_start|>"
    assert tokenize_examples(cases[0][:1], tokenizer, cfg)[0][1][-1] == tokenizer.convert_tokens_to_ids("<|im_start|>")
    cfg.data.end_token = "two tokens"
    with pytest.raises(ConfigError, match="data.end_token.*exactly one"):
        tokenize_examples([cases[0][0]], tokenizer, cfg)


def test_example_order_continues_exactly_from_its_state():
    rng = random.Random(SEED)
    count, seed = rng.randint(1, 40), rng.randrange(1000)
    reference, restored = ExampleOrder(count, seed), None
    draws = [reference.take(rng.randint(1, 2 * count)) for _ in range(12)]
    assert all(0 <= i < count for draw in draws for i in draw)
    replay = ExampleOrder(count, seed)
    for cut in range(12):  # restore from the state after each draw: the rest comes out the same
        restored = ExampleOrder(count, seed)
        restored.load_state_dict(json.loads(json.dumps(replay.state_dict())))
        assert [restored.take(len(d)) for d in draws[cut:]] == draws[cut:]
        replay.take(len(draws[cut]))
    with pytest.raises(ConfigError, match="seed"):
        ExampleOrder(count, seed + 1).load_state_dict(reference.state_dict())


def sft_command(config: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "oreal.algorithms.sft", "--config", str(config), "--output-dir", str(out), *extra]


@pytest.fixture
def chat_config(tmp_path) -> Path:
    rng = random.Random(SEED + 2)
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for _ in range(12) for row, _, _ in rows(rng)))
    config = tmp_path / "cfg.py"
    config.write_text(
        "from oreal.algorithms.sft import SFTConfig, SFTDataConfig, SFTModelConfig, SFTTrainConfig\n"
        "from oreal.runtime.config import CheckpointConfig, LogConfig, OptimConfig\n"
        "def sft_config():\n"
        "    return SFTConfig(\n"
        "        model=SFTModelConfig(vocab_size=320, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,\n"
        "                             intermediate_size=64, attn_backend='sdpa'),\n"
        f"        data=SFTDataConfig(train_file={str(data)!r}),\n"
        "        optim=OptimConfig(lr=1e-2, min_lr=1e-3, warmup_steps=1, weight_decay=0.0, grad_clip=1.0),\n"
        f"        train=SFTTrainConfig(steps=4, sequences_per_step=6, micro_batch_tokens=256, loss_backend='torch',\n"
        f"                             log_interval=1, seed={SEED}),\n"
        "        checkpoint=CheckpointConfig(interval=2, keep_last=2), log=LogConfig(tensorboard=False))\n")
    return config


def test_used_output_folder_is_refused_before_anything_starts(tmp_path, chat_config, capsys):
    out = tmp_path / "used"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert main(["--config", str(chat_config), "--output-dir", str(out)]) == 2
    assert "already holds files" in capsys.readouterr().err and (out / "notes.txt").read_text() == "keep me"
    assert not torch.distributed.is_initialized()
    assert main(["--config", str(chat_config), "--output-dir", str(out), "--resume", "--overwrite"]) == 2


def test_resume_after_a_hard_kill_ends_where_an_uninterrupted_run_ends(tmp_path, chat_config):
    """Chat data, 4 steps, a checkpoint every 2: killed right after step 2's checkpoint, resumed, the final
    weights and the logged losses equal those of a run that was never stopped."""
    from safetensors.torch import load_file

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    full, cut = tmp_path / "full", tmp_path / "cut"
    for command in (sft_command(chat_config, full), sft_command(chat_config, cut, "--debug.kill_after_step", "2")):
        result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode in (0, -9), result.stderr[-3000:]
    assert not (cut / "hf").exists() and (cut / "checkpoints" / "step-000002").is_dir()
    result = subprocess.run(sft_command(chat_config, cut, "--resume"), cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stderr and "sft step 3/4" in result.stderr
    a, b = load_file(full / "hf" / "model.safetensors"), load_file(cut / "hf" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    losses = [[json.loads(line)["loss/sft"] for line in (run / "metrics.jsonl").read_text().splitlines()]
              for run in (full, cut)]
    assert len(losses[0]) == 4 and losses[0] == losses[1]
