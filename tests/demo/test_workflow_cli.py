"""The command-line workflow on CPU: `oreal-sft` -> (`oreal-train`) -> `oreal-eval`, with the demo's config and data.

- `oreal-eval` scores a model exactly as the demo's own scoring does (same model, samples and seed: the same
  numbers and the same response texts), though it generates in the rollout engine's process;
- killed midway and rerun with --resume, it keeps the finished chunks and ends with the same table as an
  uninterrupted run; a used output folder is refused without --resume / --overwrite, and a resume with
  other settings is refused naming them;
- the README's CPU walk-through ("From a base model to a table") runs end to end at a tiny size.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from oreal.demo.pipeline import NPROC, SAMPLED_SAMPLES, load_config_module

REPO = Path(__file__).resolve().parents[2]
DEMO_CONFIG = REPO / "configs" / "demo_cpu.py"
SEED = random.randrange(1_000_000)
MAX_NEW = "16"
TINY_SFT = ["--model.hidden_size", "32", "--model.num_layers", "2", "--model.intermediate_size", "64",
            "--model.vocab_size", "400", "--train.sequences_per_step", "8", "--train.log_interval", "1",
            "--log.tensorboard", "false", "--train.loss_backend", "torch"]
ENV = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")


def run(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, env=ENV, capture_output=True, text=True,
                          timeout=timeout)


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """The demo's data (small) and an SFT model trained by `oreal-sft` on it (single process, a few steps)."""
    root = tmp_path_factory.mktemp("workflow")
    task = dataclasses.replace(load_config_module(DEMO_CONFIG).task(), train_size=120, rl_size=12, heldout_size=16)
    task.write(root / "data", seed=SEED)
    result = ok(run(["-m", "oreal.algorithms.sft", "--config", str(DEMO_CONFIG), "--output-dir", str(root / "sft"),
                     "--data.train_file", str(root / "data" / "train.jsonl"), "--steps", "3",
                     "--train.seed", str(SEED), *TINY_SFT]))
    assert "sft step 3/3 | loss" in result.stderr  # the console line of each step
    steps = [json.loads(line)["step"] for line in (root / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    assert (root / "sft" / "checkpoints" / "step-000003").is_dir() and (root / "sft" / "hf" / "config.json").is_file()
    return root


def rl_config(root: Path):
    from oreal.runtime.config import parse_args

    files = f"{root / 'data' / 'heldout.jsonl'},{root / 'data' / 'rl.jsonl'}"
    return parse_args(["--config", str(DEMO_CONFIG), "--eval.files", files, "--eval.max_new_tokens", MAX_NEW,
                       "--rollout.max_new_tokens", MAX_NEW]).config


def eval_args(root: Path, model: Path, out: Path, *extra: str) -> list[str]:
    return ["-m", "oreal.runtime.eval_cli", "--model", str(model), "--output", str(out), "--config", str(DEMO_CONFIG),
            "--data", f"{root / 'data' / 'heldout.jsonl'},{root / 'data' / 'rl.jsonl'}", "--max-new-tokens", MAX_NEW,
            "--seed", str(SEED), "--threads", str(NPROC), *extra]


def overall_pass1(summary: dict) -> float:
    return sum(s["pass@1"] * s["problems"] for s in summary.values()) / sum(s["problems"] for s in summary.values())


def responses(out: Path) -> list[str]:
    return [text for name in ("heldout", "rl") for line in (out / f"{name}.jsonl").read_text().splitlines()
            for text in json.loads(line)["responses"]]


def test_eval_scores_like_the_demo_and_resumes_after_a_kill(workdir, capsys):
    from oreal.runtime.eval_cli import main as eval_main
    from oreal.runtime.heldout import at_rollout_temperature, evaluate_model

    model = workdir / "sft" / "hf"
    sampled = ["--samples", str(SAMPLED_SAMPLES), "--temperature", "1.0", "--top-p", "1.0"]  # as the demo samples

    # An uninterrupted run, and what the demo's own scoring reports for the same model, samples and seed: its
    # sampled score is exactly this call (oreal.demo.pipeline.score_model), here also keeping the texts.
    full = workdir / "eval_full"
    ok(run(eval_args(workdir, model, full, *sampled)))
    reference = evaluate_model(model, at_rollout_temperature(rl_config(workdir), SAMPLED_SAMPLES), seed=SEED,
                               num_threads=NPROC, keep_responses=True)
    summary = json.loads((full / "summary.json").read_text())
    assert set(summary) == {"heldout", "rl"}
    assert overall_pass1(summary) == pytest.approx(reference["pass@1"], rel=1e-12, abs=1e-12)
    assert responses(full) == reference["responses"]  # the very same samples, not just the same score
    for name, s in summary.items():
        assert s["pass@1"] == pytest.approx(reference["per_file"][name], rel=1e-12, abs=1e-12)
        k = SAMPLED_SAMPLES
        assert s["samples"] == k and s[f"avg@{k}"] == s["pass@1"] and s[f"pass@{k}"] >= s["pass@1"]
    table = (full / "results.md").read_text()
    assert "| Model | heldout | rl | Average |" in table and "| sft |" in table

    # Killed (SIGKILL, no cleanup) after its first chunk: the first benchmark is on disk, nothing else.
    killed = workdir / "eval_killed"
    result = run(eval_args(workdir, model, killed, *sampled, "--debug-kill-after-chunks", "1"))
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    first = (killed / "heldout.jsonl").read_bytes()
    assert len(first.splitlines()) == 16 and not (killed / "summary.json").exists()
    assert not (killed / "rl.jsonl").exists() or not (killed / "rl.jsonl").read_text().strip()

    # A rerun without --resume is refused (nothing touched); with other settings it is refused, naming them.
    assert eval_main(eval_args(workdir, model, killed, *sampled)[2:]) == 2
    assert "already holds files" in capsys.readouterr().err
    other = eval_args(workdir, model, killed, "--samples", "2", "--temperature", "1.0", "--top-p", "1.0", "--resume")
    assert eval_main(other[2:]) == 2
    assert "other settings (samples)" in capsys.readouterr().err
    assert (killed / "heldout.jsonl").read_bytes() == first

    resumed = ok(run(eval_args(workdir, model, killed, *sampled, "--resume")))
    assert "16 already scored, 0 chunk(s) to go" in resumed.stdout  # the finished benchmark was skipped
    assert (killed / "heldout.jsonl").read_bytes() == first
    assert (killed / "results.md").read_text() == table
    assert json.loads((killed / "summary.json").read_text()) == summary
    assert responses(killed) == responses(full)


def test_readme_cpu_walkthrough(workdir):
    """The README's three CPU commands (after the data), tiny: SFT (the fixture), RL, then a greedy table whose
    pass@1 is the demo's headline score of the RL model."""
    from oreal.runtime.heldout import evaluate_model

    readme = (REPO / "README.md").read_text()
    for command in ("oreal-demo --data-only", "oreal-sft --config configs/demo_cpu.py",
                    "torchrun --nproc_per_node 2 -m oreal.train --config configs/demo_cpu.py",
                    "oreal-eval --model outputs/demo/oreal/hf"):
        assert command in readme, command
    rl = workdir / "oreal"
    ok(run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "oreal.train",
            "--config", str(DEMO_CONFIG), "--output-dir", str(rl), "--model.path", str(workdir / "sft" / "hf"),
            "--data.train_files", str(workdir / "data" / "rl.jsonl"),
            "--eval.files", str(workdir / "data" / "heldout.jsonl"), "--steps", "1", "--train.freeze_policy_steps",
            "0", "--data.prompts_per_step", "4", "--data.samples_per_prompt", "2", "--eval.interval", "0",
            "--rollout.max_new_tokens", MAX_NEW, "--eval.max_new_tokens", MAX_NEW, "--loss.backend", "torch"],
           timeout=600))
    out = workdir / "eval_rl"
    result = ok(run(eval_args(workdir, rl / "hf", out, "--temperature", "0", "--samples", "1")))
    assert "| Model | heldout | rl | Average |" in result.stdout and "| oreal |" in result.stdout
    summary = json.loads((out / "summary.json").read_text())
    headline = evaluate_model(rl / "hf", rl_config(workdir), seed=SEED, num_threads=NPROC)  # the demo's greedy score
    assert overall_pass1(summary) == pytest.approx(headline["pass@1"], rel=1e-12, abs=1e-12)


def test_readme_gpu_commands_parse(tmp_path):
    """The README's 7B commands (no GPU here): each parses into the intended settings."""
    from oreal.algorithms.sft import parse_args as sft_args
    from oreal.runtime.config import parse_args as rl_args
    from oreal.runtime.eval_cli import parse_args as eval_args_of

    readme = (REPO / "README.md").read_text()
    for command in ("-m oreal.algorithms.sft --config configs/sft_7b.py", "--log.wandb true",
                    "oreal-eval --model runs/oreal_7b/hf --data math500,aime24,amc23,gsm8k"):
        assert command in readme, command
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    data = tmp_path / "sft.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "1+1?"},
                                             {"role": "assistant", "content": "\\boxed{2}"}]}) + "\n")
    sft, _ = sft_args(["--config", str(REPO / "configs" / "sft_7b.py"), "--model.init_path", str(model),
                       "--data.train_file", str(data), "--output-dir", str(tmp_path / "sft")])
    rl = rl_args(["--config", str(REPO / "configs" / "oreal_7b.py"), "--model.path", str(model),
                  "--data.train_files", str(data), "--output-dir", str(tmp_path / "rl"), "--log.wandb", "true"]).config
    assert sft.data.system_prompt == rl.data.system_prompt and sft.data.instruction == rl.data.instruction
    assert sft.data.end_token in rl.rollout.stop_words and rl.log.wandb
    request = eval_args_of(["--model", str(model), "--data", "math500,aime24,amc23,gsm8k", "--output",
                            str(tmp_path / "ev"), "--config", str(REPO / "configs" / "oreal_7b.py"), "--samples", "16",
                            "--temperature", "1.0", "--top-p", "0.95", "--max-new-tokens", "14000"])
    assert [name for name, _ in request.benchmarks] == ["math500", "aime24", "amc23", "gsm8k"]
    assert all(Path(path).is_file() for _, path in request.benchmarks)
    assert (request.cfg.eval.samples, request.cfg.eval.top_p, request.cfg.eval.max_new_tokens) == (16, 0.95, 14000)
