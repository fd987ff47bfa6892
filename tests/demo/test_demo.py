"""The demo: its config file, the plot, and a smoke run of the whole orchestration at a minimal budget."""

import json
import math
import random
from pathlib import Path

import pytest

from oreal.runtime.config import Config, parse_args
from oreal.demo.task import SyntheticTask
from oreal.demo.pipeline import DemoError, format_table, load_config_module, main, run_demo
from oreal.demo.plotting import plot_runs, read_records, series
from oreal.algorithms.sft import SFTConfig

REPO = Path(__file__).resolve().parents[2]
DEMO_CONFIG = REPO / "configs" / "demo_cpu.py"
SEED = random.randrange(1_000_000)

# The real demo config, shrunk to seconds: same structure and code paths, tiny sizes.
SMOKE_CONFIG = f"""
import dataclasses, importlib.util
spec = importlib.util.spec_from_file_location("demo_cpu_base", {str(DEMO_CONFIG)!r})
base = importlib.util.module_from_spec(spec)
spec.loader.exec_module(base)

def task():
    return dataclasses.replace(base.task(), train_size=200, rl_size=32, heldout_size=8)

def sft_config():
    cfg = base.sft_config()
    cfg.model.hidden_size, cfg.model.num_layers, cfg.model.intermediate_size = 32, 2, 64
    cfg.model.vocab_size = 400
    cfg.train.steps, cfg.train.sequences_per_step, cfg.train.log_interval = 4, 16, 1
    return cfg

def config():
    cfg = base.config()
    cfg.data.prompts_per_step, cfg.data.samples_per_prompt = 4, 2
    cfg.train.steps, cfg.train.freeze_policy_steps = 2, 1
    cfg.eval.interval, cfg.eval.samples = 1, 1
    cfg.rollout.max_new_tokens = cfg.eval.max_new_tokens = 12
    return cfg

def grpo_options():
    return base.grpo_options()
"""


def test_demo_config_defines_every_stage_consistently():
    module = load_config_module(DEMO_CONFIG)
    task, sft, rl = module.task(), module.sft_config(), module.config()
    assert isinstance(task, SyntheticTask) and isinstance(sft, SFTConfig) and isinstance(rl, Config)
    rl.validate()
    sft_prompt = (sft.data.template, sft.data.system_prompt, sft.data.instruction)
    assert sft_prompt == (rl.data.template, rl.data.system_prompt, rl.data.instruction), \
        "SFT must render prompts exactly as the RL trainer does"
    assert rl.rollout.engine == "hf" and rl.train.device == "cpu" and rl.model.param_dtype == "float32"
    assert rl.loss.use_token_rm and rl.loss.kl_coef > 0  # the whole OREAL recipe, not a shortcut
    assert rl.judge.stop_word == "<|im_end|>" and rl.rollout.stop_words == ["<|im_end|>"]
    assert rl.eval.files and rl.eval.interval > 0 and rl.eval.temperature == 0 and rl.eval.samples == 1  # greedy
    # The demo's overrides are valid options of the trainer's command line.
    cfg = parse_args(["--config", str(DEMO_CONFIG), "--model.path", "/x", "--data.train_files", "a.jsonl",
                      "--eval.files", "b.jsonl", "--train.seed", "3", "--data.seed", "3"]).config
    assert cfg.model.path == "/x" and cfg.train.seed == 3
    # GRPO beside OREAL: the same run with the recipe switched by valid trainer options.
    grpo = parse_args(["--config", str(DEMO_CONFIG), *module.grpo_options()]).config
    grpo.validate()
    assert grpo.algorithm == "grpo" and rl.algorithm == "oreal"
    assert (grpo.train.steps, grpo.data, grpo.eval, grpo.policy_optim) == (rl.train.steps, rl.data, rl.eval,
                                                                             rl.policy_optim)


def test_plot_and_records(tmp_path):
    rng = random.Random(SEED)
    runs = {}
    for name in ("OREAL", "GRPO"):
        run = tmp_path / name
        run.mkdir()
        steps = rng.randint(3, 12)
        lines = [json.dumps({"step": s, "reward/mean": rng.uniform(-1, 1), "response/length_mean": rng.uniform(5, 30)})
                 for s in range(1, steps + 1)]
        lines.append('{"step": 99, "reward/me')  # a line cut short by a kill is skipped
        (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
        evals = [{"step": s, "eval/mean_pass@1": rng.random()} for s in range(0, steps + 1, 2)]
        evals.append({"step": steps + 1, "eval/mean_pass@1": "nan"})  # NaN, as the trainer writes it, is skipped
        (run / "eval.jsonl").write_text("\n".join(json.dumps(e) for e in evals) + "\n")
        runs[name] = run
        assert len(read_records(run / "metrics.jsonl")) == steps
        assert series(read_records(run / "eval.jsonl"), "eval/mean_pass@1")[0] == list(range(0, steps + 1, 2))
    path = plot_runs(runs, tmp_path / "plot" / "curves.png", start_pass1=0.3, title="test")
    import matplotlib.image

    image = matplotlib.image.imread(path)
    assert image.shape[0] > 300 and image.shape[1] > 900  # three readable panels side by side
    assert read_records(tmp_path / "missing.jsonl") == []


def test_table_and_user_errors(tmp_path, capsys):
    table = format_table([("SFT", 0.25, ""), ("OREAL (40 steps)", 0.4, ""), ("GRPO", None, "not run")], 0.25)
    assert "+15.0" in table and "n/a" in table and "not run" in table
    assert main(["--config", str(tmp_path / "nope.py"), "--output-dir", str(tmp_path / "o")]) == 1
    assert "does not exist" in capsys.readouterr().err
    broken = tmp_path / "broken.py"
    broken.write_text("def task():\n    return 1\n")
    with pytest.raises(DemoError, match="sft_config"):
        load_config_module(broken)


def test_demo_smoke_run(tmp_path):
    """The whole orchestration at a minimal budget: data, SFT (torchrun), eval, OREAL and GRPO (torchrun), evals,
    report."""
    config = tmp_path / "smoke_config.py"
    config.write_text(SMOKE_CONFIG)
    printed = []
    results = run_demo(tmp_path / "out", SEED, config_path=config, echo=printed.append)
    out = tmp_path / "out"
    saved = json.loads((out / "results.json").read_text())
    assert saved == json.loads(json.dumps(results))
    for key in ("sft_pass1", "oreal_pass1", "grpo_pass1", "seconds", "seed"):
        assert key in saved
    assert saved["seed"] == SEED and saved["seconds"] > 0
    for key in ("sft_pass1", "oreal_pass1", "grpo_pass1"):  # the demo config runs GRPO beside OREAL
        assert 0.0 <= saved[key] <= 1.0 and math.isfinite(saved[key])
    assert saved["grpo_note"] is None
    assert saved["heldout"]["problems"] == 8
    # Every stage left its artefacts: data, SFT model, RL metrics and evals, the exported RL policy, the plot.
    for path in ("data/train.jsonl", "data/rl.jsonl", "data/heldout.jsonl", "sft/hf/config.json",
                 "sft/metrics.jsonl", "oreal/metrics.jsonl", "oreal/eval.jsonl", "oreal/hf/config.json",
                 "grpo/metrics.jsonl", "grpo/hf/config.json", "curves.png", "sft.log", "oreal.log", "grpo.log"):
        assert (out / path).exists(), path
    for run in ("oreal", "grpo"):
        assert [m["step"] for m in read_records(out / run / "metrics.jsonl")] == [1, 2]
        assert [e["step"] for e in read_records(out / run / "eval.jsonl")] == [1, 2]
    assert any("held-out pass@1" in line for line in printed)
    # The answer-style breakdown scores the greedy SFT model exactly as the demo did.
    from benchmarks.demo_answer_styles import answer_styles

    rl_cfg = parse_args(["--config", str(config), "--eval.files", str(out / "data" / "heldout.jsonl")]).config
    styles = answer_styles(out / "sft" / "hf", rl_cfg, sampled=False)
    assert styles["pass@1"] == saved["sft_pass1"] and styles["responses"] == 8
    assert 0.0 <= styles["bare_share"] <= 1.0
    assert (out / "curves.png").stat().st_size > 10_000


def test_a_rerun_of_the_demo_overwrites_its_rl_runs_knowingly(tmp_path):
    from oreal.demo.pipeline import rl_args

    args = rl_args(DEMO_CONFIG, tmp_path, "oreal", {"rl": "rl.jsonl", "heldout": "heldout.jsonl"}, 0,
                   tmp_path / "sft" / "hf", [])
    cfg = parse_args(args).config
    assert cfg.overwrite is True and not cfg.resume and cfg.output_dir == str(tmp_path / "oreal")
