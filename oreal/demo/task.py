"""A synthetic math task: multi-step arithmetic word problems with worked solutions ending in `\\boxed{}`.

    problems = generate_split("train", 4000, Difficulty(min_steps=1, max_steps=3), seed=0)
    write_jsonl(problems, "data/train.jsonl")     # MATH format: problem / answer / solution (+ steps, key)

A problem starts from a quantity and applies 1..n operations, one sentence each:

    Mia has 7 shells. She finds 5 more. She gives 3 to Leo. How many shells does Mia have now?

and its worked solution writes one equation per operation, then the boxed answer:

    7 + 5 = 12
    12 - 3 = 9
    \\boxed{9}

Difficulty is the number of operations (`min_steps`..`max_steps`) and the operand sizes; every
intermediate result stays in [0, max_value], so a small model can learn the arithmetic.

Splits are disjoint by construction: a problem's arithmetic chain (start value, operations,
operands; the wording aside) is hashed with SHA-256, and the hash alone decides whether that chain
may appear in "train", "rl" or "heldout". So no held-out chain is ever seen in SFT data or RL
prompts, whatever the sizes or seeds asked for, and each split is a deterministic function of
(split, size, difficulty, seed).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable, Sequence

from oreal.data.sft_records import read_sft_rows as read_jsonl  # noqa: F401 (the demo's SFT files, as dicts)

SPLITS = ("train", "rl", "heldout")
# Share of the chain space each split owns (by hash): enough held-out chains for a few hundred
# problems even at the smallest difficulty, most of the rest for SFT.
SPLIT_SHARES = {"train": 0.7, "rl": 0.2, "heldout": 0.1}

NAMES = (("Mia", "She", "her"), ("Leo", "He", "him"), ("Ava", "She", "her"), ("Sam", "He", "him"),
         ("Zoe", "She", "her"), ("Max", "He", "him"), ("Lily", "She", "her"), ("Ben", "He", "him"),
         ("Emma", "She", "her"), ("Noah", "He", "him"), ("Ruby", "She", "her"), ("Tom", "He", "him"))
ITEMS = ("apples", "pens", "shells", "coins", "cards", "books", "stamps", "marbles", "stickers", "beads")
ADD_TEMPLATES = ("{He} buys {b} more.", "{He} finds {b} more.", "{friend} gives {him} {b} more.")
SUB_TEMPLATES = ("{He} gives {b} to {friend}.", "{He} loses {b}.", "{He} sells {b}.")
MUL_WORDS = {2: "doubles", 3: "triples"}


@dataclass(frozen=True)
class Difficulty:
    """How hard problems are.

    min_steps, max_steps: number of operations, drawn uniformly in this range.
    max_start: the starting quantity is drawn in [1, max_start].
    max_operand: amounts added or removed are drawn in [1, max_operand].
    max_factor: multiplications by 2..max_factor ("doubles", "triples"); 1 turns them off.
    max_value: every intermediate result stays in [0, max_value].
    """

    min_steps: int = 1
    max_steps: int = 3
    max_start: int = 20
    max_operand: int = 9
    max_factor: int = 3
    max_value: int = 99

    def __post_init__(self):
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(f"Difficulty: {message}")

        need(1 <= self.min_steps <= self.max_steps, f"need 1 <= min_steps <= max_steps, got "
             f"min_steps={self.min_steps}, max_steps={self.max_steps}")
        need(self.max_start >= 1, f"max_start must be >= 1, got {self.max_start}")
        need(self.max_operand >= 1, f"max_operand must be >= 1, got {self.max_operand}")
        need(1 <= self.max_factor <= max(MUL_WORDS), f"max_factor must be in [1, {max(MUL_WORDS)}], "
             f"got {self.max_factor}")
        need(self.max_value >= self.max_start + 1, f"max_value must exceed max_start={self.max_start}, "
             f"got {self.max_value}")


@dataclass(frozen=True)
class Step:
    op: str  # "+", "-" or "*"
    operand: int
    result: int


@dataclass(frozen=True)
class Problem:
    """One generated problem: text, solution, integer answer and its arithmetic chain.

    `solution` is the worked solution, or only `\\boxed{answer}` when `direct` (a bare answer, as
    terse answers sit among worked ones in real SFT data).
    """

    problem: str
    solution: str
    answer: int
    start: int
    steps: tuple[Step, ...]
    direct: bool = False

    @property
    def key(self) -> str:
        """The arithmetic chain, wording aside (e.g. "7+5-3"): what splits are kept disjoint on."""
        return str(self.start) + "".join(f"{s.op}{s.operand}" for s in self.steps)

    def to_json(self) -> dict:
        """A MATH-format record (`problem`, `answer`, `solution`) plus `steps` and the chain `key`."""
        return {"problem": self.problem, "answer": str(self.answer), "solution": self.solution,
                "steps": len(self.steps), "key": self.key, "style": "direct" if self.direct else "worked"}


def split_of(key: str) -> str:
    """The split that owns arithmetic chain `key` (a stable SHA-256 bucket, the same on every machine)."""
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    edge = 0.0
    for split in SPLITS:
        edge += SPLIT_SHARES[split]
        if u < edge:
            return split
    return SPLITS[-1]


def evaluate_chain(start: int, steps: Iterable[tuple[str, int]]) -> int:
    """The value of an arithmetic chain, computed independently of the text (used by tests and checks)."""
    value = start
    for op, operand in steps:
        if op == "+":
            value += operand
        elif op == "-":
            value -= operand
        elif op == "*":
            value *= operand
        else:
            raise ValueError(f"op: unknown operation {op!r}")
    return value


def _draw_chain(rng: random.Random, difficulty: Difficulty) -> tuple[int, list[Step]]:
    value = rng.randint(1, difficulty.max_start)
    start, steps = value, []
    for _ in range(rng.randint(difficulty.min_steps, difficulty.max_steps)):
        ops = []
        if value + 1 <= difficulty.max_value:
            ops.append("+")
        if value >= 1:
            ops.append("-")
        if difficulty.max_factor >= 2 and 1 <= value and value * 2 <= difficulty.max_value:
            ops.append("*")
        op = rng.choice(ops)
        if op == "+":
            operand = rng.randint(1, min(difficulty.max_operand, difficulty.max_value - value))
            result = value + operand
        elif op == "-":
            operand = rng.randint(1, min(difficulty.max_operand, value))
            result = value - operand
        else:
            operand = rng.randint(2, min(difficulty.max_factor, difficulty.max_value // value))
            result = value * operand
        steps.append(Step(op, operand, result))
        value = result
    return start, steps


def _render(rng: random.Random, start: int, steps: Sequence[Step]) -> tuple[str, str]:
    """(problem text, worked solution) of one chain, with a random name, item and wording."""
    (name, he, him), item = rng.choice(NAMES), rng.choice(ITEMS)
    friend = rng.choice([n for n, _, _ in NAMES if n != name])
    sentences = [f"{name} has {start} {item}."]
    lines, value = [], start
    for step in steps:
        if step.op == "+":
            template = rng.choice(ADD_TEMPLATES)
        elif step.op == "-":
            template = rng.choice(SUB_TEMPLATES)
        else:
            template = f"The number of {item} {MUL_WORDS[step.operand]}."
        sentences.append(template.format(He=he, him=him, friend=friend, b=step.operand))
        lines.append(f"{value} {step.op} {step.operand} = {step.result}")
        value = step.result
    sentences.append(f"How many {item} does {name} have now?")
    lines.append(f"\\boxed{{{value}}}")
    return " ".join(sentences), "\n".join(lines)


def generate_problem(rng: random.Random, difficulty: Difficulty) -> Problem:
    """One problem drawn with `rng` (any split)."""
    start, steps = _draw_chain(rng, difficulty)
    text, solution = _render(rng, start, steps)
    return Problem(problem=text, solution=solution, answer=steps[-1].result, start=start, steps=tuple(steps))


def _split_seed(split: str, seed: int) -> int:
    return int.from_bytes(hashlib.sha256(f"oreal-synthetic/{split}/{seed}".encode()).digest()[:8], "big")


def generate_split(split: str, size: int, difficulty: Difficulty = Difficulty(), *, seed: int = 0,
                   direct_rate: float = 0.0, patience: int = 20_000) -> list[Problem]:
    """`size` distinct problems of `split` ("train", "rl" or "heldout"), deterministic in (split, difficulty, seed).

    Problems are distinct by text; chains outside the split's hash bucket are rejected, so splits
    never share a chain. A larger `size` extends a smaller one (the first problems are the same).
    A share `direct_rate` of the solutions is a bare `\\boxed{answer}` instead of the worked
    solution; the problems themselves do not depend on it (the choice has its own random stream).
    Raises ValueError when `patience` draws in a row find no new problem: the difficulty leaves too
    few distinct problems for `size`.
    """
    if not 0.0 <= direct_rate <= 1.0:
        raise ValueError(f"direct_rate: expected a share in [0, 1], got {direct_rate!r}")
    if split not in SPLITS:
        raise ValueError(f"split: expected one of {', '.join(SPLITS)}, got {split!r}")
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise ValueError(f"size: expected an int >= 0, got {size!r}")
    rng = random.Random(_split_seed(split, seed))
    style_rng = random.Random(_split_seed(split + "/style", seed))
    seen: set[str] = set()
    problems: list[Problem] = []
    misses = 0
    while len(problems) < size:
        problem = generate_problem(rng, difficulty)
        if problem.problem in seen or split_of(problem.key) != split:
            misses += 1
            if misses > patience:
                raise ValueError(f"size: found only {len(problems)} distinct {split!r} problems of the {size} asked "
                                 f"for ({patience} draws in a row found no new one); ask for fewer or widen the "
                                 f"difficulty ({difficulty})")
            continue
        misses = 0
        seen.add(problem.problem)
        if style_rng.random() < direct_rate:
            problem = replace(problem, solution=f"\\boxed{{{problem.answer}}}", direct=True)
        problems.append(problem)
    return problems


def write_jsonl(problems: Iterable[Problem], path: str | os.PathLike) -> Path:
    """Write problems as MATH-format JSONL (readable by `oreal.data.read_prompt_file`), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        for problem in problems:
            handle.write(json.dumps(problem.to_json()) + "\n")
    os.replace(tmp, path)
    return path


@dataclass(frozen=True)
class SyntheticTask:
    """The three files a demo run needs: SFT data, RL prompts and held-out problems.

    `sft` sets the SFT problems' difficulty and `rl` that of the RL prompts and the held-out set
    (RL prompts and held-out problems come from one distribution, so held-out pass@1 measures
    what RL trained for, on chains it never saw). `sft_direct_rate` is the share of SFT solutions
    that are a bare boxed answer instead of worked steps.
    """

    train_size: int = 4000
    rl_size: int = 2000
    heldout_size: int = 300
    sft: Difficulty = Difficulty()
    rl: Difficulty = Difficulty()
    sft_direct_rate: float = 0.0

    def write(self, directory: str | os.PathLike, seed: int = 0) -> dict[str, Path]:
        """Write train.jsonl, rl.jsonl and heldout.jsonl under `directory`; returns their paths by split."""
        directory = Path(directory)
        plan = {"train": (self.train_size, self.sft, self.sft_direct_rate), "rl": (self.rl_size, self.rl, 0.0),
                "heldout": (self.heldout_size, self.rl, 0.0)}
        return {split: write_jsonl(generate_split(split, size, difficulty, seed=seed, direct_rate=direct),
                                   directory / f"{split}.jsonl")
                for split, (size, difficulty, direct) in plan.items()}
