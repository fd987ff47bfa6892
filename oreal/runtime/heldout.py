"""Held-out evaluation of a saved model, outside any training run: pass@1 on prompt files.

    metrics = evaluate_model("outputs/demo/sft/hf", cfg)          # cfg: the RL run's `oreal.runtime.config.Config`

Everything that decides a score comes from the RL config, so a model is scored here exactly as the
trainer's periodic evaluation scores it: prompts rendered by `cfg.data` (template, system prompt,
instruction), sampled by the transformers rollout backend with `cfg.eval` (temperature, top-p,
max new tokens, samples per problem) and stopped by `cfg.rollout.stop_words` plus the model's eos,
judged by the trainer's `Judge` (`cfg.judge`). The model runs in this process (no engine process,
no process group), which is what a stage boundary of the demo wants: SFT done, score it, move on.

pass@1 is the mean over problems of (correct samples / samples); with temperature 0 (`greedy=True`)
one sample per problem is drawn. `at_rollout_temperature(cfg, samples)` is the same config scoring
the policy as RL samples it (the rollout temperature and top-p) instead of as `cfg.eval` says.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Sequence

from oreal.runtime.config import Config


def at_rollout_temperature(cfg: Config, samples: int) -> Config:
    """`cfg` with its evaluation sampling `samples` answers per problem at the rollout temperature and top-p."""
    return dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, temperature=cfg.rollout.temperature,
                                                             top_p=cfg.rollout.top_p, samples=samples))


def evaluate_model(model_dir: str | Path, cfg: Config, *, files: Sequence[str] | None = None,
                   samples: int | None = None, greedy: bool = False, seed: int = 0,
                   num_threads: int | None = None, max_batch_rows: int = 256, keep_responses: bool = False) -> dict:
    """pass@1 and mean response length of the model in `model_dir` on `files` (default: `cfg.eval.files`).

    Returns `{"pass@1", "response_length", "problems", "samples", "seconds", "per_file": {stem: pass@1}}`;
    `pass@1` averages over every problem of every file. With `keep_responses`, also `"responses"`: the
    decoded texts and `"correct"`: their verdicts, in order (problem by problem, its samples together).
    Raises ValueError naming a missing file or model directory.
    """
    from oreal.runtime.build import Judge, load_tokenizer, stop_token_ids
    from oreal.data import PromptDataset, PromptRenderer
    from oreal.rollout import SamplingParams
    from oreal.rollout.hf import HFBackend

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise ValueError(f"model_dir: {str(model_dir)!r} is not a Hugging Face model directory (no config.json)")
    files = list(files if files is not None else cfg.eval.files)
    if not files:
        raise ValueError("files: no prompt file to evaluate on (set cfg.eval.files or pass files=)")
    for file in files:
        if not Path(file).is_file():
            raise ValueError(f"files: {file!r} does not exist")
    n = 1 if greedy else (samples or cfg.eval.samples)
    start = time.perf_counter()
    tokenizer = load_tokenizer(str(model_dir))
    renderer = PromptRenderer(tokenizer, template=cfg.data.template, system_prompt=cfg.data.system_prompt or None,
                              instruction=cfg.data.instruction)
    sampling = SamplingParams(temperature=0.0 if greedy else cfg.eval.temperature,
                              top_p=1.0 if greedy else cfg.eval.top_p, max_new_tokens=cfg.eval.max_new_tokens,
                              stop_token_ids=stop_token_ids(cfg, tokenizer), seed=seed)
    backend = HFBackend(model=str(model_dir), dtype="float32", device="cpu", seed=seed, num_threads=num_threads,
                        max_batch_rows=max_batch_rows)
    judge = Judge(cfg)
    budget = cfg.rollout.max_total_tokens - cfg.eval.max_new_tokens
    per_file, total_pass, total_len, total_problems = {}, 0.0, 0.0, 0
    all_texts, all_verdicts = [], []
    for file in files:
        dataset = PromptDataset.from_jsonl([file], renderer=renderer)
        count = len(dataset) if not cfg.eval.max_problems else min(len(dataset), cfg.eval.max_problems)
        prompts = [p for p in dataset.batch(range(count)) if len(p.input_ids) <= budget]
        if not prompts:
            raise ValueError(f"files: {file!r} has no problem whose prompt fits in {budget} tokens")
        rollouts = backend.generate([p.input_ids for p in prompts], n, sampling)
        texts = [tokenizer.decode(r.token_ids, skip_special_tokens=False) for r in rollouts]
        golds = [p.gold_answer for p in prompts for _ in range(n)]
        questions = [p.example.question for p in prompts for _ in range(n)]
        verdicts = judge(texts, golds, questions)
        all_texts += texts
        all_verdicts += list(verdicts)
        file_pass = sum(verdicts) / n
        per_file[Path(file).stem] = file_pass / len(prompts)
        total_pass += file_pass
        total_len += sum(len(r.token_ids) for r in rollouts) / n
        total_problems += len(prompts)
    result = {"pass@1": total_pass / total_problems, "response_length": total_len / total_problems,
              "problems": total_problems, "samples": n, "seconds": time.perf_counter() - start, "per_file": per_file}
    if keep_responses:
        result.update(responses=all_texts, correct=all_verdicts)
    return result
