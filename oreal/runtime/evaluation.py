"""Held-out evaluation: pass@1 and pass@k on eval JSONL files, judged exactly like training rollouts.

For each problem, n samples are drawn; with c of them correct, pass@1 is c/n averaged over
problems, and pass@k (k <= n) is the unbiased estimate `1 - C(n-c, k) / C(n, k)` (Chen et al.,
2021), also averaged. Every rank evaluates its share of each file; the per-problem sums are
added across ranks. The trainer tracks its best checkpoint by `eval/mean_pass@1`, the mean of
pass@1 over the eval files.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

BEST_METRIC = "eval/mean_pass@1"


def pass_at_k(num_samples: int, num_correct: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct."""
    if not 1 <= k <= num_samples:
        raise ValueError(f"k: expected 1 <= k <= n={num_samples}, got {k}")
    if not 0 <= num_correct <= num_samples:
        raise ValueError(f"num_correct: expected 0 <= c <= n={num_samples}, got {num_correct}")
    if num_samples - num_correct < k:
        return 1.0
    return 1.0 - math.comb(num_samples - num_correct, k) / math.comb(num_samples, k)


@dataclass(frozen=True)
class EvalSet:
    """One eval file: its short name (the file stem) and this rank's share of its prompts (`oreal.data.Prompt`)."""

    name: str
    prompts: list


def eval_set_name(path: str | Path) -> str:
    return Path(path).stem


def evaluate(eval_sets: Sequence[EvalSet], *, samples: int, generate: Callable, judge: Callable,
             reduce_sum: Callable[[list[float]], list[float]] = lambda values: values) -> dict:
    """Metrics of every eval set.

    `generate(prompts, n)` returns, per prompt, n engine rollouts (with `.token_ids`);
    `judge(prompts, outputs)` returns one bool per rollout, prompt-major; `reduce_sum` adds a list of
    numbers across ranks (identity in one process). Prompts are this rank's share.
    """
    metrics: dict = {}
    for eval_set in eval_sets:
        outputs = generate(eval_set.prompts, samples)
        verdicts = judge(eval_set.prompts, outputs)
        pass1 = passk = length = 0.0
        i = 0
        for group in outputs:
            correct = sum(bool(v) for v in verdicts[i:i + len(group)])
            pass1 += correct / len(group)
            passk += pass_at_k(len(group), correct, len(group))
            length += sum(len(s.token_ids) for s in group) / len(group)
            i += len(group)
        problems, pass1, passk, length = reduce_sum([float(len(outputs)), pass1, passk, length])
        name = eval_set.name
        metrics[f"eval/{name}/pass@1"] = pass1 / problems if problems else math.nan
        if samples > 1:
            metrics[f"eval/{name}/pass@{samples}"] = passk / problems if problems else math.nan
        metrics[f"eval/{name}/response_length"] = length / problems if problems else math.nan
        metrics[f"eval/{name}/problems"] = problems
    scores = [v for k, v in metrics.items() if k.endswith("/pass@1")]
    metrics[BEST_METRIC] = sum(scores) / len(scores) if scores else math.nan
    return metrics
