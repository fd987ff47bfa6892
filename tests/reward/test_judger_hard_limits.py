"""No input can hang the judge: adversarial inputs, hard timeouts in killable workers, batch integrity."""

import os
import random
import signal
import time

import pytest

from oreal.reward import JudgePool, judge, judge_batch
from oreal.reward.judging import Judgement

# sympy's solveset spins for minutes on this inequality (measured: > 300 s), in code no signal stops
HANGS = r"\boxed{x^{100}+x^{37}-3x^{5}+1 > 0}", "(0, 1)"

ADVERSARIAL = [
    ("tower of exponents", r"\boxed{2^{2^{2^{2^{2^{2^{2^{2}}}}}}}}", "2"),
    ("tower against itself plus one", r"\boxed{9^{9^{9^{9}}}+1}", r"9^{9^{9^{9}}}"),
    ("huge power of a polynomial", r"\boxed{(x+1)^{100000}}", "(x+1)^{99999}"),
    ("huge power against a number", r"\boxed{(x+1)^{100000}}", "1"),
    ("10,000 nested braces", r"\boxed{" + "{" * 10_000 + "1" + "}" * 10_000 + "}", "2"),
    ("10,000 nested fractions", r"\boxed{" + r"\frac{1}{" * 10_000 + "2" + "}" * 10_000 + "}", "2"),
    ("a megabyte of words", "lorem ipsum dolor " * 58_000 + " 3", "7"),
    ("a megabyte of boxes", r"\boxed{1}" * 110_000, "2"),
    ("a megabyte inside one box", r"\boxed{" + "x+" * 500_000 + "1}", "1"),
    ("invalid unicode", "\ud800\udfff \udc80 answer \\boxed{\ud800}", "5"),
    ("surrogate-escaped bytes", b"\xff\xfe\\boxed{\xff}".decode("utf-8", "surrogateescape"), "5"),
    ("unbalanced braces", r"so \boxed{\frac{1}{2}", "7"),
    ("closing braces only", "}}}}}}" * 1000 + r"\boxed{}}}", "1"),
    ("empty box", r"the answer is \boxed{}", "1"),
    ("blank box", r"\boxed{ }", "0"),
    ("box in a box, empty", r"\boxed{\boxed{}}", "1"),
    ("huge factorial", r"\boxed{100000000!}", "1"),
    ("huge integer literal", r"\boxed{" + "9" * 5000 + "}", "1"),
    ("sympy hang", *HANGS),
    ("a megabyte, then a sympy hang", "lorem ipsum " * 90_000 + HANGS[0], HANGS[1]),
    ("not a string", None, "1"),
    ("a number", 12345, "12344"),
    ("bytes", b"\\boxed{1}", "1"),
    ("a list", [r"\boxed{1}"], "1"),
    ("gold is None", r"\boxed{1}", None),
]


@pytest.fixture(scope="module", autouse=True)
def warm_single_judge():
    judge(r"\boxed{\sqrt{2}}", r"\frac{2}{\sqrt 2}")  # the first call of a process starts the helper


@pytest.mark.parametrize("name,response,gold", ADVERSARIAL, ids=[a[0] for a in ADVERSARIAL])
def test_adversarial_input_returns_quickly_and_wrong(name, response, gold):
    start = time.perf_counter()
    result = judge(response, gold)
    elapsed = time.perf_counter() - start
    assert isinstance(result, Judgement)
    assert result.correct is False, result
    assert elapsed < 2.5, f"{name}: {elapsed:.2f} s"


def test_hung_sympy_call_is_killed_with_reason_timeout():
    start = time.perf_counter()
    result = judge(*HANGS, timeout=1.0)
    assert result.reason == "timeout" and not result.correct
    assert time.perf_counter() - start < 1.5
    # the helper was replaced: the next call works
    assert judge(r"\boxed{\frac{\sqrt{3}}{3}}", r"\frac{1}{\sqrt3}", timeout=30).correct


def _random_items(rng, count):
    """Items that need the worker (radicals, not decidable as text), half of them wrong."""
    items = []
    for _ in range(count):
        k, m = rng.randint(2, 40), rng.choice([2, 3, 5, 6, 7])
        right = rng.random() < 0.5
        radicand = k * k * m + (0 if right else 1)
        items.append((rf"so the length is $\boxed{{{k}\sqrt{{{m}}}}}$.", rf"\sqrt{{{radicand}}}", right,
                      rf"{k}\sqrt{{{m}}}"))
    return items


def test_batch_loses_nothing_and_keeps_order_around_timeouts():
    rng = random.Random(int(time.time()))
    items = _random_items(rng, 60)
    hang_at = sorted(rng.sample(range(len(items)), 3))
    for i in hang_at:
        items[i] = (HANGS[0], HANGS[1], None, HANGS[0][7:-1])
    pool = JudgePool(num_workers=2)
    try:
        start = time.perf_counter()
        results = judge_batch([r for r, *_ in items], [g for _, g, *_ in items], timeout=1.0, pool=pool)
        elapsed = time.perf_counter() - start
    finally:
        pool.close()
    assert len(results) == len(items)
    for i, ((_, _, right, pred), result) in enumerate(zip(items, results)):
        assert result.pred == pred, i  # each verdict belongs to its own item
        if right is None:
            assert result.reason == "timeout" and not result.correct
        else:
            assert result.correct == right, (i, result)
    assert pool.timeouts == 3 and pool.restarts == 3
    assert elapsed < 30


def test_pool_retries_an_item_whose_worker_crashed():
    pool = JudgePool(num_workers=1)
    try:
        assert pool.compare_many([(r"\sqrt{4}", "2")], timeout=30) == [(True, "equivalent")]
        os.kill(pool._workers[0].proc.pid, signal.SIGKILL)  # a crash, not a timeout
        time.sleep(0.2)
        out = pool.compare_many([(r"\sqrt{9}", "3"), (r"\sqrt{9}", "4")], timeout=30)
        assert out == [(True, "equivalent"), (False, "different")]
        assert pool.restarts >= 1
    finally:
        pool.close()


def test_bad_arguments_are_reported():
    with pytest.raises(ValueError, match="2 responses but 1 golds"):
        judge_batch(["1", "2"], ["1"])
    with pytest.raises(ValueError, match="timeout"):
        judge_batch(["1"], ["1"], timeout=0)
    with pytest.raises(ValueError, match="num_workers"):
        JudgePool(num_workers=0)
    assert judge_batch([], []) == []


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 1e12, -1.0, 0, True, "2"])
def test_a_bad_timeout_is_refused_and_leaves_every_later_call_working(bad):
    with pytest.raises(ValueError, match="timeout must be a number of seconds"):
        judge(r"\boxed{\sqrt{4}}", "2", timeout=bad)
    with pytest.raises(ValueError, match="timeout must be a number of seconds"):
        judge_batch([r"\boxed{\sqrt{4}}"], ["2"], timeout=bad)
    # the process-wide workers are untouched: sympy still answers (not a fast-path verdict)
    assert judge(r"\boxed{\sqrt{4}}", "2") == Judgement(True, r"\sqrt{4}", "equivalent")
    assert judge_batch([r"\boxed{\sqrt{9}}", r"\boxed{\sqrt{9}}"], ["3", "4"]) == [
        Judgement(True, r"\sqrt{9}", "equivalent"), Judgement(False, r"\sqrt{9}", "different")]


def test_a_call_that_fails_half_way_leaves_no_worker_busy():
    pool = JudgePool(num_workers=2)
    seen = []

    def progress_that_fails(n):
        seen.append(n)
        raise KeyboardInterrupt  # Ctrl-C while the other worker still holds its item

    try:
        pairs = [(r"\sqrt{4}", "2"), (HANGS[0][7:-1], HANGS[1])]
        with pytest.raises(KeyboardInterrupt):
            pool.compare_many(pairs, timeout=30, progress=progress_that_fails)
        assert seen == [1] and all(w.task is None for w in pool._workers)
        assert pool.compare(r"\sqrt{16}", "4", timeout=30) == (True, "equivalent")
        assert pool.compare_many([(r"\sqrt{9}", "3"), (r"\sqrt{9}", "4")], timeout=30) == [
            (True, "equivalent"), (False, "different")]
    finally:
        pool.close()
