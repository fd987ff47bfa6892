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
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from oreal.runtime.config import Config
from oreal.runtime.evaluation import pass_at_k


def at_rollout_temperature(cfg: Config, samples: int) -> Config:
    """`cfg` with its evaluation sampling `samples` answers per problem at the rollout temperature and top-p."""
    return dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, temperature=cfg.rollout.temperature,
                                                             top_p=cfg.rollout.top_p, samples=samples))


DEFAULT_CHUNK_PROMPTS = 256  # prompts per generate call: the unit of seeding (and of `oreal-eval`'s resume)


@dataclass
class ScoredProblem:
    """One problem's samples and verdicts (`index`: its position among the file's scored prompts)."""

    index: int
    uid: str
    question: str
    gold: str
    responses: list[str]
    correct: list[bool]
    lengths: list[int]
    finish: list[str]

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def load_eval_prompts(file: str | Path, cfg: Config, tokenizer) -> tuple[list, int]:
    """The prompts of `file` rendered as `cfg.data` says (at most `cfg.eval.max_problems`), and how many were
    left out because their prompt leaves no room for `cfg.eval.max_new_tokens` in `cfg.rollout.max_total_tokens`."""
    from oreal.data import PromptDataset, PromptRenderer

    renderer = PromptRenderer(tokenizer, template=cfg.data.template, system_prompt=cfg.data.system_prompt or None,
                              instruction=cfg.data.instruction)
    dataset = PromptDataset.from_jsonl([file], renderer=renderer)
    count = len(dataset) if not cfg.eval.max_problems else min(len(dataset), cfg.eval.max_problems)
    budget = cfg.rollout.max_total_tokens - cfg.eval.max_new_tokens
    prompts = dataset.batch(range(count))
    kept = [p for p in prompts if len(p.input_ids) <= budget]
    return kept, len(prompts) - len(kept)


def eval_sampling(cfg: Config, tokenizer, *, greedy: bool, seed: int):
    """The `SamplingParams` of an evaluation: `cfg.eval`'s temperature and top-p (or greedy), stopped by the
    rollout stop words and the tokenizer's eos."""
    from oreal.rollout import SamplingParams
    from oreal.runtime.build import stop_token_ids

    return SamplingParams(temperature=0.0 if greedy else cfg.eval.temperature,
                          top_p=1.0 if greedy else cfg.eval.top_p, max_new_tokens=cfg.eval.max_new_tokens,
                          stop_token_ids=stop_token_ids(cfg, tokenizer), seed=seed)


def chunk_starts(count: int, chunk: int) -> list[int]:
    """Where each generate call starts: fixed boundaries, so a resumed evaluation makes the same calls."""
    return list(range(0, count, max(1, chunk)))


def chunk_sampling(sampling, start: int):
    """The sampling of the call that starts at prompt `start`: seeded `seed + start` (the engines then seed prompt
    i of the call with that + i), so every problem's samples are the same however the calls are spread."""
    return sampling if sampling.seed is None else dataclasses.replace(sampling, seed=sampling.seed + start)


def score_chunk(prompts: Sequence, start: int, *, generate: Callable, tokenizer, judge: Callable, n: int,
                sampling) -> list[ScoredProblem]:
    """Generate n samples for each prompt in one call (`generate(prompt_ids, n, sampling)`), then judge them."""
    rollouts = generate([p.input_ids for p in prompts], n, chunk_sampling(sampling, start))
    return judge_chunk(prompts, start, rollouts, tokenizer=tokenizer, judge=judge, n=n)


def judge_chunk(prompts: Sequence, start: int, rollouts: Sequence, *, tokenizer, judge: Callable,
                n: int) -> list[ScoredProblem]:
    """Decode and judge the n samples of each prompt (`rollouts` prompt-major, as the engines return them)."""
    if len(rollouts) != len(prompts) * n:
        raise RuntimeError(f"the engine returned {len(rollouts)} samples for {len(prompts)} prompts x {n}")
    texts = [tokenizer.decode(r.token_ids, skip_special_tokens=False) for r in rollouts]
    verdicts = judge(texts, [p.gold_answer for p in prompts for _ in range(n)],
                     [p.example.question for p in prompts for _ in range(n)])
    out = []
    for i, prompt in enumerate(prompts):
        rows = slice(i * n, (i + 1) * n)
        out.append(ScoredProblem(index=start + i, uid=prompt.example.uid, question=prompt.example.question,
                                 gold=prompt.gold_answer, responses=texts[rows],
                                 correct=[bool(v) for v in verdicts[rows]],
                                 lengths=[len(r.token_ids) for r in rollouts[rows]],
                                 finish=[r.finish_reason for r in rollouts[rows]]))
    return out


def summarize(problems: Sequence[ScoredProblem]) -> dict:
    """pass@1 (mean over problems of correct / samples), and with n > 1 samples `avg@n` (the same number, as
    papers name it) and the unbiased `pass@n`; mean response length and the share of samples cut at the limit."""
    if not problems:
        raise ValueError("problems: nothing to summarize")
    n = len(problems[0].correct)
    pass1 = sum(sum(p.correct) / len(p.correct) for p in problems) / len(problems)
    out = {"pass@1": pass1}
    if n > 1:
        out[f"avg@{n}"] = pass1
        out[f"pass@{n}"] = sum(pass_at_k(len(p.correct), sum(p.correct), n) for p in problems) / len(problems)
    out.update(problems=len(problems), samples=n,
               response_length=sum(sum(p.lengths) / len(p.lengths) for p in problems) / len(problems),
               truncated=sum(f == "length" for p in problems for f in p.finish) / (n * len(problems)))
    return out


def evaluate_model(model_dir: str | Path, cfg: Config, *, files: Sequence[str] | None = None,
                   samples: int | None = None, greedy: bool = False, seed: int = 0,
                   num_threads: int | None = None, max_batch_rows: int = 256, keep_responses: bool = False,
                   chunk_prompts: int = DEFAULT_CHUNK_PROMPTS) -> dict:
    """pass@1 and mean response length of the model in `model_dir` on `files` (default: `cfg.eval.files`).

    Returns `{"pass@1", "response_length", "problems", "samples", "seconds", "per_file": {stem: pass@1}}`;
    `pass@1` averages over every problem of every file. With `keep_responses`, also `"responses"`: the
    decoded texts and `"correct"`: their verdicts, in order (problem by problem, its samples together).
    The model runs in this process; `oreal-eval` (oreal.runtime.eval_cli) makes the same calls through the
    rollout engines, so both score a model alike. Raises ValueError naming a missing file or model directory.
    """
    from oreal.rollout.hf import HFBackend
    from oreal.runtime.build import Judge, load_tokenizer

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
    sampling = eval_sampling(cfg, tokenizer, greedy=greedy, seed=seed)
    backend = HFBackend(model=str(model_dir), dtype="float32", device="cpu", seed=seed, num_threads=num_threads,
                        max_batch_rows=max_batch_rows)
    judge = Judge(cfg)
    per_file, scored = {}, []
    for file in files:
        prompts, _ = load_eval_prompts(file, cfg, tokenizer)
        if not prompts:
            raise ValueError(f"files: {file!r} has no problem whose prompt fits in "
                             f"{cfg.rollout.max_total_tokens - cfg.eval.max_new_tokens} tokens")
        problems = []
        for lo in chunk_starts(len(prompts), chunk_prompts):
            problems += score_chunk(prompts[lo:lo + chunk_prompts], lo, generate=backend.generate,
                                    tokenizer=tokenizer, judge=judge, n=n, sampling=sampling)
        per_file[Path(file).stem] = summarize(problems)["pass@1"]
        scored += problems
    total = summarize(scored)
    result = {"pass@1": total["pass@1"], "response_length": total["response_length"], "problems": len(scored),
              "samples": n, "seconds": time.perf_counter() - start, "per_file": per_file}
    if keep_responses:
        result.update(responses=[t for p in scored for t in p.responses],
                      correct=[v for p in scored for v in p.correct])
    return result
