"""OREAL's sample filter: which of a prompt's K judged samples are trained on.

A prompt all of whose samples are right (or all wrong) has no contrast to learn from and is
dropped. Of every other prompt, one random correct and one random wrong sample are kept, so the
policy always sees a matched positive/negative pair (OREAL, section 3; DESIGN.md). The choice is
drawn from a generator seeded by (seed, step, prompt id): it does not depend on how prompts are
spread over ranks or on what ran before, which keeps resumed runs exact.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def select_samples(correct: Sequence[bool], group_ids: Sequence[int], *, seed: int, step: int,
                   one_pair_per_prompt: bool = True) -> list[int]:
    """Indices of the samples to train on, in input order.

    Args:
        correct: per sample, whether the judge accepted it.
        group_ids: per sample, a globally unique id of its prompt within the step.
        one_pair_per_prompt: True (OREAL): one correct and one wrong sample of each mixed prompt;
            False: every sample of each mixed prompt.
    """
    if len(correct) != len(group_ids):
        raise ValueError(f"correct and group_ids differ in length: {len(correct)} vs {len(group_ids)}")
    groups: dict[int, list[int]] = {}
    for index, group in enumerate(group_ids):
        groups.setdefault(int(group), []).append(index)
    kept: list[int] = []
    for group, members in groups.items():
        right = [i for i in members if correct[i]]
        wrong = [i for i in members if not correct[i]]
        if not right or not wrong:
            continue
        if one_pair_per_prompt:
            rng = np.random.default_rng([seed, step, group])
            kept.extend([right[int(rng.integers(len(right)))], wrong[int(rng.integers(len(wrong)))]])
        else:
            kept.extend(members)
    return sorted(kept)
