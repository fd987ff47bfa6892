"""What RL changed in an `oreal-demo` run: held-out accuracy split by answer style.

    python -m benchmarks.demo_answer_styles outputs/demo [--samples 4] [--json OUT.json]

For the SFT, OREAL and GRPO models of a finished demo, samples answers to the held-out problems
(greedy, and at the rollout temperature) and splits them into bare answers (the response starts
with `\\boxed`) and worked solutions, with the accuracy of each. This is how the demo's README says
where its gain comes from: the share of bare answers, and accuracy inside each style.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

MODELS = ("sft", "oreal", "grpo")


def answer_styles(model_dir: Path, cfg, *, sampled: bool, samples: int = 4, seed: int = 0) -> dict:
    """pass@1 overall and per answer style for one model, scored exactly as the demo scores it (greedy, or
    `samples` answers per problem at the rollout temperature when `sampled`)."""
    from oreal.runtime.heldout import at_rollout_temperature, evaluate_model

    if sampled:
        result = evaluate_model(model_dir, at_rollout_temperature(cfg, samples), seed=seed, num_threads=2,
                                keep_responses=True)
    else:
        result = evaluate_model(model_dir, cfg, greedy=True, seed=seed, num_threads=2, keep_responses=True)
    correct = result["correct"]
    bare = [text.lstrip().startswith("\\boxed") for text in result["responses"]]

    def accuracy(selected):
        chosen = [c for c, s in zip(correct, selected) if s]
        return sum(chosen) / len(chosen) if chosen else None

    return {"pass@1": sum(correct) / len(correct), "bare_share": sum(bare) / len(bare),
            "bare_accuracy": accuracy(bare), "worked_accuracy": accuracy([not b for b in bare]),
            "responses": len(correct), "temperature": cfg.rollout.temperature if sampled else 0.0}


def fmt(share: float | None) -> str:
    return "  n/a " if share is None else f"{100 * share:5.1f}%"


def main(argv: list[str] | None = None) -> int:
    from oreal.runtime.config import parse_args

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("demo_dir", type=Path, help="an oreal-demo --output-dir")
    parser.add_argument("--samples", type=int, default=4, help="samples per problem when sampling")
    parser.add_argument("--json", type=Path, help="also write the table as JSON here")
    args = parser.parse_args(argv)
    rl_config = json.loads((args.demo_dir / "oreal" / "config.json").read_text())
    cfg = parse_args(["--config", str(Path(__file__).resolve().parents[1] / "configs" / "demo_cpu.py"),
                      "--eval.files", *rl_config["eval"]["files"]]).config
    rows = {}
    for name in MODELS:
        model_dir = args.demo_dir / name / "hf"
        if not (model_dir / "config.json").is_file():
            continue
        for sampled in (False, True):
            row = answer_styles(model_dir, cfg, sampled=sampled, samples=args.samples)
            temperature = row["temperature"]
            rows[f"{name}@T={temperature:g}"] = row
            print(f"{name:<6} T={temperature:<4g} pass@1 {fmt(row['pass@1'])}  bare answers {fmt(row['bare_share'])} "
                  f"(right {fmt(row['bare_accuracy'])})  worked right {fmt(row['worked_accuracy'])}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
