"""The synthetic task: deterministic, disjoint splits, right answers (by independent arithmetic and by the judger)."""

import json
import random
import re

import pytest

from oreal.data import read_prompt_file
from oreal.demo.task import (SPLITS, Difficulty, SyntheticTask, evaluate_chain, generate_split, read_jsonl,
                                  split_of, write_jsonl)

SEED = random.randrange(1_000_000)  # fresh inputs every run; printed in failures


def fresh_difficulty(rng: random.Random) -> Difficulty:
    low = rng.randint(1, 3)
    start = rng.randint(5, 30)
    return Difficulty(min_steps=low, max_steps=rng.randint(low, 4), max_start=start, max_operand=rng.randint(3, 12),
                      max_factor=rng.choice([1, 2, 3]), max_value=rng.randint(start + 20, 150))


def answer_from_text(problem: str) -> int:
    """Re-derive the answer from the problem text alone: a reader of the wording, independent of the generator."""
    sentences = [s.strip() for s in re.split(r"(?<=[.?])\s+", problem) if s.strip()]
    value = int(re.fullmatch(r"\w+ has (\d+) \w+\.", sentences[0]).group(1))
    for sentence in sentences[1:-1]:
        number = re.search(r"\b(\d+)\b", sentence)
        if "doubles" in sentence:
            value *= 2
        elif "triples" in sentence:
            value *= 3
        elif re.search(r"\b(buys|finds)\b", sentence) or re.search(r"gives (him|her) \d+ more", sentence):
            value += int(number.group(1))
        elif re.search(r"\b(loses|sells)\b", sentence) or re.search(r"gives \d+ to", sentence):
            value -= int(number.group(1))
        else:
            raise AssertionError(f"unreadable sentence {sentence!r}")
    assert sentences[-1].startswith("How many"), sentences[-1]
    return value


def check_solution(problem) -> None:
    """Every line of the worked solution is true arithmetic, chained, ending in the boxed answer."""
    if problem.direct:
        assert problem.solution == f"\\boxed{{{problem.answer}}}"
        return
    *lines, last = problem.solution.split("\n")
    assert len(lines) == len(problem.steps)
    value = problem.start
    for line, step in zip(lines, problem.steps):
        a, op, b, c = re.fullmatch(r"(\d+) ([+*-]) (\d+) = (\d+)", line).groups()
        assert int(a) == value and op == step.op and int(b) == step.operand
        assert int(c) == evaluate_chain(int(a), [(op, int(b))])
        value = int(c)
    assert last == f"\\boxed{{{value}}}" and value == problem.answer


def test_generator_is_deterministic_and_seed_dependent():
    rng = random.Random(SEED)
    difficulty = fresh_difficulty(rng)
    size = rng.randint(20, 60)
    for split in SPLITS:
        first = generate_split(split, size, difficulty, seed=SEED)
        again = generate_split(split, size, difficulty, seed=SEED)
        assert [p.to_json() for p in first] == [p.to_json() for p in again], f"seed {SEED}"
        other = generate_split(split, size, difficulty, seed=SEED + 1)
        assert [p.problem for p in first] != [p.problem for p in other], f"seed {SEED}"
        # A bigger split extends a smaller one: sizes do not reshuffle what was drawn.
        assert [p.problem for p in generate_split(split, size + 5, difficulty, seed=SEED)[:size]] == \
            [p.problem for p in first]


def test_splits_are_disjoint_by_arithmetic_chain():
    rng = random.Random(SEED)
    difficulty = Difficulty(min_steps=1, max_steps=rng.randint(1, 3))
    keys = {}
    for split in SPLITS:
        problems = generate_split(split, 150, difficulty, seed=SEED)
        assert len({p.problem for p in problems}) == len(problems), "problems repeat inside a split"
        assert all(split_of(p.key) == split for p in problems)
        keys[split] = {p.key for p in problems}
    assert not keys["train"] & keys["rl"], f"seed {SEED}"
    assert not keys["train"] & keys["heldout"], f"seed {SEED}"
    assert not keys["rl"] & keys["heldout"], f"seed {SEED}"


def test_answers_are_right_and_difficulty_is_respected():
    rng = random.Random(SEED)
    for _ in range(3):
        difficulty = fresh_difficulty(rng)
        for problem in generate_split(rng.choice(SPLITS), 80, difficulty, seed=rng.randrange(10**6)):
            assert difficulty.min_steps <= len(problem.steps) <= difficulty.max_steps
            assert 1 <= problem.start <= difficulty.max_start
            assert all(0 <= s.result <= difficulty.max_value for s in problem.steps)
            assert problem.answer == evaluate_chain(problem.start, [(s.op, s.operand) for s in problem.steps])
            assert answer_from_text(problem.problem) == problem.answer, (SEED, problem.problem)
            check_solution(problem)
            if difficulty.max_factor == 1:
                assert all(s.op != "*" for s in problem.steps)


def test_direct_answers_change_only_the_solution_style():
    rng = random.Random(SEED)
    rate = rng.uniform(0.2, 0.8)
    difficulty = fresh_difficulty(rng)
    worked = generate_split("train", 400, difficulty, seed=SEED)
    mixed = generate_split("train", 400, difficulty, seed=SEED, direct_rate=rate)
    assert [p.problem for p in worked] == [p.problem for p in mixed]  # the same problems, whatever the rate
    assert not any(p.direct for p in worked)
    share = sum(p.direct for p in mixed) / len(mixed)
    assert abs(share - rate) < 0.1, (SEED, rate, share)
    for plain, problem in zip(worked, mixed):
        check_solution(problem)
        assert problem.solution == (f"\\boxed{{{plain.answer}}}" if problem.direct else plain.solution)
        assert problem.to_json()["style"] == ("direct" if problem.direct else "worked")
    assert all(p.direct for p in generate_split("rl", 30, difficulty, seed=SEED, direct_rate=1.0))
    with pytest.raises(ValueError, match="direct_rate"):
        generate_split("train", 3, difficulty, direct_rate=1.5)


def test_worked_solutions_pass_the_judger_and_wrong_answers_fail():
    from oreal.reward import judge_batch

    problems = generate_split("heldout", 60, Difficulty(max_steps=4), seed=SEED)
    golds = [str(p.answer) for p in problems]
    verdicts = judge_batch([p.solution for p in problems], golds)
    assert all(v.correct for v in verdicts), [(p.solution, v) for p, v in zip(problems, verdicts) if not v.correct]
    wrong = [p.solution.replace(f"\\boxed{{{p.answer}}}", f"\\boxed{{{p.answer + 1}}}") for p in problems]
    assert not any(v.correct for v in judge_batch(wrong, golds))


def test_jsonl_is_the_math_format_the_prompt_datasets_read(tmp_path):
    task = SyntheticTask(train_size=40, rl_size=30, heldout_size=20, sft=Difficulty(max_steps=2),
                         rl=Difficulty(min_steps=2, max_steps=3), sft_direct_rate=0.5)
    paths = task.write(tmp_path, seed=SEED)
    assert set(paths) == set(SPLITS)
    for split, size in (("train", 40), ("rl", 30), ("heldout", 20)):
        examples = read_prompt_file(paths[split])
        records = [json.loads(line) for line in paths[split].read_text().splitlines()]
        assert len(examples) == len(records) == size
        assert all(e.format == "math" for e in examples)
        assert [e.question for e in examples] == [r["problem"] for r in records]
        assert [e.gold_answer for e in examples] == [r["answer"] for r in records]
        assert [int(r["answer"]) for r in records] == [answer_from_text(r["problem"]) for r in records]
    assert {r["steps"] for r in read_jsonl(paths["rl"])} <= {2, 3}
    assert {r["steps"] for r in read_jsonl(paths["train"])} <= {1, 2}
    # Only SFT data mixes in bare answers; RL prompts and held-out problems keep their worked solutions.
    assert {r["style"] for r in read_jsonl(paths["train"])} == {"direct", "worked"}
    assert {r["style"] for r in read_jsonl(paths["rl"]) + read_jsonl(paths["heldout"])} == {"worked"}


def test_user_errors_name_the_input(tmp_path):
    with pytest.raises(ValueError, match="split"):
        generate_split("validation", 3)
    with pytest.raises(ValueError, match="size"):
        generate_split("train", -1)
    with pytest.raises(ValueError, match="min_steps"):
        Difficulty(min_steps=3, max_steps=2)
    with pytest.raises(ValueError, match="max_value"):
        Difficulty(max_start=20, max_value=10)
    tiny = Difficulty(min_steps=1, max_steps=1, max_start=1, max_operand=1, max_factor=1, max_value=2)
    with pytest.raises(ValueError, match="distinct"):  # only a handful of problems exist: no endless loop
        generate_split("heldout", 10_000, tiny, seed=SEED)
    bad = tmp_path / "bad.jsonl"
    write_jsonl(generate_split("train", 2, seed=SEED), bad)
    bad.write_text(bad.read_text() + '{"problem": "x"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:3: field 'solution'"):
        read_jsonl(bad)
