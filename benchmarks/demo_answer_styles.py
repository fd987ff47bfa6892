"""What RL changed in an `oreal-demo` run: held-out accuracy split by answer style.

    python -m benchmarks.demo_answer_styles outputs/demo [--samples 4] [--json OUT.json]

For the SFT, OREAL and GRPO models of a finished demo, samples answers to the held-out problems
(greedy, and at the rollout temperature) and splits them into bare answers (the response starts
with `\\boxed`) and worked solutions, with the accuracy of each. This is how the demo's README says
where its gain comes from: the share of bare answers, and accuracy inside each style.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

MODELS = ("sft", "oreal", "grpo")


def answer_styles(model_dir: Path, cfg, *, temperature: float, samples: int, seed: int = 0) -> dict:
    """pass@1 overall and per style for one model, scored by the demo's judge and prompt rendering."""
    from oreal.components import Judge, load_tokenizer, stop_token_ids
    from oreal.data import PromptDataset, PromptRenderer
    from oreal.rollout import SamplingParams
    from oreal.rollout.hf import HFBackend

    tokenizer = load_tokenizer(str(model_dir))
    renderer = PromptRenderer(tokenizer, template=cfg.data.template, system_prompt=cfg.data.system_prompt or None,
                              instruction=cfg.data.instruction)
    prompts = PromptDataset.from_jsonl(cfg.eval.files, renderer=renderer)
    prompts = prompts.batch(range(len(prompts)))
    n = 1 if temperature == 0 else samples
    sampling = SamplingParams(temperature=temperature, top_p=1.0, max_new_tokens=cfg.eval.max_new_tokens,
                              stop_token_ids=stop_token_ids(cfg, tokenizer), seed=seed)
    backend = HFBackend(model=str(model_dir), dtype="float32", device="cpu", seed=seed, num_threads=2)
    rollouts = backend.generate([p.input_ids for p in prompts], n, sampling)
    texts = [tokenizer.decode(r.token_ids, skip_special_tokens=False) for r in rollouts]
    correct = Judge(cfg)(texts, [p.gold_answer for p in prompts for _ in range(n)],
                         [p.example.question for p in prompts for _ in range(n)])
    bare = [text.lstrip().startswith("\\boxed") for text in texts]

    def accuracy(selected):
        chosen = [c for c, s in zip(correct, selected) if s]
        return sum(chosen) / len(chosen) if chosen else None

    return {"pass@1": sum(correct) / len(correct), "bare_share": sum(bare) / len(bare),
            "bare_accuracy": accuracy(bare), "worked_accuracy": accuracy([not b for b in bare]),
            "responses": len(texts), "temperature": temperature}


def fmt(share: float | None) -> str:
    return "  n/a " if share is None else f"{100 * share:5.1f}%"


def main(argv: list[str] | None = None) -> int:
    from oreal.config import parse_args

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("demo_dir", type=Path, help="an oreal-demo --output-dir")
    parser.add_argument("--samples", type=int, default=4, help="samples per problem when sampling")
    parser.add_argument("--json", type=Path, help="also write the table as JSON here")
    args = parser.parse_args(argv)
    rl_config = json.loads((args.demo_dir / "oreal" / "config.json").read_text())
    cfg = parse_args(["--config", str(Path(__file__).resolve().parents[1] / "configs" / "demo_cpu.py"),
                      "--eval.files", *rl_config["eval"]["files"]]).config
    cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, max_problems=0))
    rows = {}
    for name in MODELS:
        model_dir = args.demo_dir / name / "hf"
        if not (model_dir / "config.json").is_file():
            continue
        for temperature in (0.0, cfg.rollout.temperature):
            row = answer_styles(model_dir, cfg, temperature=temperature, samples=args.samples)
            rows[f"{name}@T={temperature:g}"] = row
            print(f"{name:<6} T={temperature:<4g} pass@1 {fmt(row['pass@1'])}  bare answers {fmt(row['bare_share'])} "
                  f"(right {fmt(row['bare_accuracy'])})  worked right {fmt(row['worked_accuracy'])}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
