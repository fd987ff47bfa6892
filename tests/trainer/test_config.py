"""Config files, command-line overrides and their errors (no torch.distributed, fast)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from oreal.runtime.config import (Config, ConfigError, convert, format_config, load_config_file, option_paths, parse_args,
                          set_option)

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs"


def tiny_file(tmp_path: Path) -> Path:
    """A minimal valid config file."""
    path = tmp_path / "cfg.py"
    path.write_text(
        "from oreal.runtime.config import Config, DataConfig, ModelConfig\n"
        "def config():\n"
        "    return Config(model=ModelConfig(path='m'), data=DataConfig(train_files=['p.jsonl']))\n")
    return path


def parse(tmp_path, *args):
    return parse_args(["--config", str(tiny_file(tmp_path)), *args]).config


# ---------------------------------------------------------------------------------------------------
# The paper's recipe
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, model", [("oreal_7b.py", "OREAL-7B-SFT"), ("oreal_32b.py", "OREAL-32B-SFT")])
def test_paper_recipe_numbers(name, model):
    cfg = load_config_file(CONFIGS / name).validate()
    assert cfg.model.path.endswith(model)
    assert cfg.data.samples_per_prompt == 16
    assert cfg.data.prompts_per_step == 64
    assert (cfg.policy_optim.lr, cfg.policy_optim.min_lr) == (5e-7, 1e-7)
    assert (cfg.rm_optim.lr, cfg.rm_optim.min_lr) == (2e-6, 4e-7)
    assert cfg.policy_optim.warmup_steps == cfg.rm_optim.warmup_steps == 10
    assert cfg.train.freeze_policy_steps == 10
    assert cfg.loss.kl_coef == 0.01 and cfg.loss.use_token_rm
    assert cfg.model.reference_path == "" and cfg.model.token_rm_path == ""  # both start from the initial policy
    assert (cfg.loss.pos_coef, cfg.loss.neg_coef) == (1.0, 0.5)
    assert (cfg.rollout.temperature, cfg.rollout.top_p) == (1.0, 0.9)
    assert cfg.rollout.max_total_tokens == 16384
    assert cfg.train.steps == 90
    assert cfg.policy_optim.weight_decay == cfg.rm_optim.weight_decay == 0.01
    assert cfg.policy_optim.grad_clip == cfg.rm_optim.grad_clip == 1.0
    assert cfg.loss.filter_groups
    assert cfg.data.difficulty_balance == [(0.0, 0.2, 6), (0.2, 0.4, 4), (0.4, 0.6, 4), (0.6, 0.8, 2)]


@pytest.mark.parametrize("name", ["oreal_7b.py", "oreal_32b.py"])
def test_print_config_shows_resolved_values(name, capsys):
    """`oreal-train --config F --print-config` prints every resolved option and starts no process group."""
    from oreal.train import main

    assert main(["--config", str(CONFIGS / name), "--print-config", "--steps", "7"]) == 0
    out = capsys.readouterr().out
    print(out)  # the resolved config, for the record (pytest -s shows it)
    lines = dict(line.split(" = ", 1) for line in out.splitlines() if " = " in line)
    expected = {
        "data.samples_per_prompt": "16", "data.prompts_per_step": "64", "policy_optim.lr": "5e-07",
        "policy_optim.min_lr": "1e-07", "rm_optim.lr": "2e-06", "rm_optim.min_lr": "4e-07",
        "policy_optim.warmup_steps": "10", "train.freeze_policy_steps": "10", "loss.kl_coef": "0.01",
        "loss.pos_coef": "1.0", "loss.neg_coef": "0.5", "rollout.temperature": "1.0", "rollout.top_p": "0.9",
        "rollout.max_total_tokens": "16384", "train.steps": "7", "policy_optim.weight_decay": "0.01",
        "policy_optim.grad_clip": "1.0",
    }
    for option, value in expected.items():
        assert lines.get(option) == value, (option, lines.get(option))
    assert set(lines) == set(option_paths(Config()))


def test_tiny_cpu_config_loads():
    cfg = load_config_file(CONFIGS / "tiny_cpu.py").validate()
    assert cfg.model.tiny.enabled and cfg.rollout.engine == "hf"
    assert cfg.data.samples_per_prompt == 4


# ---------------------------------------------------------------------------------------------------
# Overrides
# ---------------------------------------------------------------------------------------------------

def test_overrides_convert_by_field_type(tmp_path):
    rng = random.Random()
    lr = rng.uniform(1e-8, 1e-3)
    steps = rng.randint(1, 10_000)
    cfg = parse(tmp_path, "--policy_optim.lr", repr(lr), "--steps", str(steps), "--output-dir", "/tmp/x",
                "--data.train_files", "a.jsonl,b.jsonl", "--loss.filter_groups", "false",
                "--policy_optim.betas", "(0.8, 0.99)", "--data.difficulty_balance", "[(0.0, 0.5, 3)]",
                "--rollout.stop_words=<|im_end|>", "--model.tiny.hidden_size", "48", "--judge.timeout_s=3")
    assert cfg.policy_optim.lr == lr and isinstance(cfg.policy_optim.lr, float)
    assert cfg.train.steps == steps and isinstance(cfg.train.steps, int)
    assert cfg.output_dir == "/tmp/x"
    assert cfg.data.train_files == ["a.jsonl", "b.jsonl"]
    assert cfg.loss.filter_groups is False
    assert cfg.policy_optim.betas == (0.8, 0.99)
    assert cfg.data.difficulty_balance == [(0.0, 0.5, 3)]
    assert cfg.rollout.stop_words == ["<|im_end|>"]
    assert cfg.model.tiny.hidden_size == 48
    assert cfg.judge.timeout_s == 3.0 and isinstance(cfg.judge.timeout_s, float)
    assert cfg.resume == ""


def test_resume_flag(tmp_path):
    assert parse(tmp_path, "--resume").resume == "latest"
    assert parse(tmp_path, "--resume", "--steps", "3").resume == "latest"
    assert parse(tmp_path, "--resume", "/ckpt/step-000002").resume == "/ckpt/step-000002"


def test_print_config_round_trips_every_option(tmp_path):
    cfg = parse(tmp_path)
    text = format_config(cfg)
    assert len(text.splitlines()) == len(option_paths(cfg))
    assert "policy_optim.lr = 1e-06" in text


@pytest.mark.parametrize("typo, suggestion", [
    ("--policy_optim.lrr", "--policy_optim.lr"),
    ("--polcy_optim.lr", "--policy_optim.lr"),
    ("--data.prompt_per_step", "--data.prompts_per_step"),
    ("--rollout.top-p", "--rollout.top_p"),
    ("--step", "--steps"),
    ("--model.tiny.hiden_size", "--model.tiny.hidden_size"),
])
def test_unknown_option_names_it_and_the_nearest(tmp_path, typo, suggestion):
    with pytest.raises(ConfigError) as info:
        parse(tmp_path, typo, "1")
    message = str(info.value)
    assert typo in message and f"did you mean {suggestion}?" in message


def test_typo_without_value_is_reported_as_typo(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown option --train\.stepz; did you mean --train\.steps"):
        parse(tmp_path, "--train.stepz")


def test_section_is_not_an_option(tmp_path):
    with pytest.raises(ConfigError, match=r"--model is a section"):
        parse(tmp_path, "--model", "x")


@pytest.mark.parametrize("args, match", [
    (["--train.steps", "abc"], r"--train\.steps: expected int, got 'abc'"),
    (["--loss.filter_groups", "maybe"], r"--loss\.filter_groups: expected bool"),
    (["--policy_optim.betas", "(0.9,)"], r"--policy_optim\.betas: expected"),
    (["--policy_optim.lr"], r"--policy_optim\.lr needs a value"),
    (["stray"], r"unexpected argument 'stray'"),
])
def test_bad_values(tmp_path, args, match):
    with pytest.raises(ConfigError, match=match):
        parse(tmp_path, *args)


@pytest.mark.parametrize("args, match", [
    (["--data.samples_per_prompt", "1"], r"--data\.samples_per_prompt: must be >= 2"),
    (["--rollout.engine", "sglang"], r"--rollout\.engine: must be one of vllm, hf"),
    (["--train.freeze_policy_steps", "-1"], r"--train\.freeze_policy_steps: must be >= 0"),
    (["--policy_optim.min_lr", "1"], r"--policy_optim\.min_lr"),
    (["--rollout.max_new_tokens", "100", "--rollout.max_total_tokens", "50"], r"--rollout\.max_total_tokens"),
    (["--eval.interval", "5"], r"--eval\.files"),
    (["--model.path", ""], r"--model\.path: is required"),
])
def test_validation_names_the_option(tmp_path, args, match):
    with pytest.raises(ConfigError, match=match):
        parse(tmp_path, *args)


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        parse_args(["--config", str(tmp_path / "missing.py")])
    with pytest.raises(ConfigError, match="--config FILE is required"):
        parse_args(["--steps", "3"])
    no_function = tmp_path / "nofn.py"
    no_function.write_text("x = 1\n")
    with pytest.raises(ConfigError, match=r"must define a function `config\(\)`"):
        load_config_file(no_function)
    wrong_type = tmp_path / "wrong.py"
    wrong_type.write_text("def config():\n    return {'lr': 1}\n")
    with pytest.raises(ConfigError, match="returned dict"):
        load_config_file(wrong_type)
    broken = tmp_path / "broken.py"
    broken.write_text("def config(:\n")
    with pytest.raises(ConfigError, match="failed to run: SyntaxError"):
        load_config_file(broken)


def test_convert_optional_and_literals():
    assert convert("none", int | None) is None
    assert convert("5", int | None) == 5
    assert convert("[1, 2]", list[int]) == [1, 2]
    assert convert("", list[str]) == []
    cfg = Config()
    set_option(cfg, "rm_optim.lr", "3e-6")
    assert cfg.rm_optim.lr == 3e-6 and cfg.policy_optim.lr != 3e-6  # sections are separate objects


@pytest.mark.parametrize("option, value, match", [
    ("judge.timeout_s", "nan", "judge.timeout_s: expected float, got 'nan' \\(not a finite number\\)"),
    ("rollout.timeout_s", "inf", "rollout.timeout_s: expected float, got 'inf'"),
    ("judge.verifier_timeout_s", "-inf", "judge.verifier_timeout_s: expected float"),
    ("judge.timeout_s", "0", "judge.timeout_s: must be > 0, got 0.0"),
    ("rollout.timeout_s", "-5", "rollout.timeout_s: must be > 0, got -5.0"),
    ("judge.verifier_timeout_s", "1e12", "judge.verifier_timeout_s: must be at most 604800 seconds"),
    ("judge.num_workers", "-3", "judge.num_workers: must be >= 0, got -3"),
    ("rollout.sync_bucket_mb", "0", "rollout.sync_bucket_mb: must be > 0"),
    ("rollout.gpu_memory_utilization", "1.5", "rollout.gpu_memory_utilization: must be in \\(0, 1\\]"),
    ("rollout.top_k", "-1", "rollout.top_k: must be >= 0"),
    ("policy_optim.betas", "(0.9, nan)", "policy_optim.betas: expected"),
])
def test_every_number_is_checked_at_parse_time_naming_the_option(tmp_path, option, value, match):
    with pytest.raises(ConfigError, match=f"^--{match}"):
        parse(tmp_path, f"--{option}", value)


def test_non_finite_numbers_from_a_config_file_are_refused(tmp_path):
    path = tmp_path / "nan.py"
    path.write_text(
        "from oreal.runtime.config import Config, DataConfig, JudgeConfig, ModelConfig\n"
        "def config():\n"
        "    return Config(model=ModelConfig(path='m'), data=DataConfig(train_files=['p.jsonl']),\n"
        "                  judge=JudgeConfig(verifier_timeout_s=float('nan')))\n")
    with pytest.raises(ConfigError, match="^--judge.verifier_timeout_s: must be a finite number, got nan"):
        parse_args(["--config", str(path)])


@pytest.mark.parametrize("typo, expected", [
    ("--judge.timeout", "did you mean --judge.timeout_s?"),
    ("--timeout_s", "did you mean --rollout.timeout_s or --judge.timeout_s?"),
    ("--data.num_workers", "did you mean --judge.num_workers?"),
    ("--zzz.qqq", "unknown option --zzz.qqq (--print-config lists every option)"),
    ("--verbose", "unknown option --verbose (--print-config lists every option)"),
])
def test_did_you_mean_suggests_close_names_only(tmp_path, typo, expected):
    with pytest.raises(ConfigError) as info:
        parse(tmp_path, typo, "1")
    assert expected in str(info.value)


def test_overwrite_flag(tmp_path):
    assert parse(tmp_path, "--overwrite").overwrite is True
    assert parse(tmp_path, "--overwrite", "--steps", "3").overwrite is True
    assert parse(tmp_path).overwrite is False
    with pytest.raises(ConfigError, match="^--overwrite: contradicts --resume"):
        parse(tmp_path, "--resume", "--overwrite")
