"""`OverlappedGenerator` (rollout.max_staleness 1): submit/collect, version stamps, and a weight sync that
never overlaps a generation, over a stand-in generator that records when each of its calls ran."""

from __future__ import annotations

import threading
import time

import pytest

from oreal.rollout.generator import GenerationError
from oreal.rollout.overlap import OverlapError, OverlappedGenerator
from oreal.rollout.types import Rollout


class RecordingGenerator:
    """`generate` takes `seconds` and answers prompt p's sample j with token p[0] * 10 + j; every call's
    (kind, start, end) is recorded, and overlapping calls are counted."""

    def __init__(self, seconds: float = 0.2, fail: bool = False):
        self.seconds, self.fail = seconds, fail
        self.calls: list[tuple[str, float, float]] = []
        self.active = 0
        self.overlaps = 0
        self.lock = threading.Lock()
        self.engines = ["stand-in"]
        self.engine = "stand-in"
        self.closed = False

    def _enter(self):
        with self.lock:
            self.active += 1
            self.overlaps += self.active > 1
        return time.perf_counter()

    def _leave(self, kind, start):
        with self.lock:
            self.active -= 1
            self.calls.append((kind, start, time.perf_counter()))

    def generate(self, prompts, n, sampling):
        start = self._enter()
        try:
            time.sleep(self.seconds)
            if self.fail:
                raise GenerationError("rollout engine 0 failed: stand-in")
            return [[Rollout(prompt_index=i, sample_index=j, token_ids=[p[0] * 10 + j], logprobs=[-0.5],
                             finish_reason="stop") for j in range(n)] for i, p in enumerate(prompts)]
        finally:
            self._leave("generate", start)

    def sync(self):
        start = self._enter()
        time.sleep(0.01)
        self._leave("sync", start)
        return 0.01

    def close(self):
        self.closed = True


def test_submit_returns_at_once_and_collect_gets_the_samples_in_order():
    inner = RecordingGenerator(seconds=0.3)
    gen = OverlappedGenerator(inner, max_staleness=1)
    start = time.perf_counter()
    gen.submit([[1, 2], [3], [5, 6, 7]], 2, None)
    assert time.perf_counter() - start < 0.2 and gen.pending and gen.in_flight
    samples = gen.collect()
    assert [[r.token_ids[0] for r in group] for group in samples] == [[10, 11], [30, 31], [50, 51]]
    assert not gen.pending and not gen.in_flight


def test_sync_waits_for_the_generation_in_flight():
    """A sync never overlaps a generation: it starts after the submitted generation has ended."""
    inner = RecordingGenerator(seconds=0.3)
    gen = OverlappedGenerator(inner, max_staleness=1)
    for _ in range(3):
        gen.submit([[4]], 3, None)
        gen.sync()  # issued while the generation runs
        gen.collect()
    assert inner.overlaps == 0
    generations = [c for c in inner.calls if c[0] == "generate"]
    syncs = [c for c in inner.calls if c[0] == "sync"]
    assert len(generations) == len(syncs) == 3
    for (_, _, gen_end), (_, sync_start, _) in zip(generations, syncs):
        assert sync_start >= gen_end


def test_versions_are_those_of_the_weights_at_submission():
    """The trainer at version v gets samples of version v (synchronous) or v - 1 (one step of overlap)."""
    gen = OverlappedGenerator(RecordingGenerator(seconds=0.05), max_staleness=1)
    gen.sync(policy_version=4)
    assert {r.policy_version for g in gen.generate([[1]], 2, None) for r in g} == {4}
    assert gen.last_version == 4
    gen.submit([[2]], 2, None)  # step k+1's prompts, sent while step k (from version 4) trains
    gen.sync()  # step k's update: version 5
    samples = gen.collect()
    assert gen.policy_version == 5 and gen.last_version == 4
    assert {r.policy_version for g in samples for r in g} == {4}


def test_a_failed_generation_is_raised_in_the_trainer_thread():
    gen = OverlappedGenerator(RecordingGenerator(seconds=0.05, fail=True), max_staleness=1)
    gen.submit([[1]], 1, None)
    with pytest.raises(GenerationError, match="stand-in"):
        gen.collect()
    assert not gen.pending


def test_misuse_is_refused():
    with pytest.raises(OverlapError, match="max_staleness"):
        OverlappedGenerator(RecordingGenerator(), max_staleness=0).submit([[1]], 1, None)
    gen = OverlappedGenerator(RecordingGenerator(seconds=0.05), max_staleness=1)
    with pytest.raises(OverlapError, match="submit first"):
        gen.collect()
    gen.submit([[1]], 1, None)
    with pytest.raises(OverlapError, match="already pending"):
        gen.submit([[1]], 1, None)


def test_evaluation_generate_waits_and_keeps_the_pending_samples():
    inner = RecordingGenerator(seconds=0.2)
    gen = OverlappedGenerator(inner, max_staleness=1)
    gen.submit([[7]], 1, None)
    gen.generate([[8]], 1, None)  # evaluation between steps
    assert inner.overlaps == 0
    assert gen.collect()[0][0].token_ids == [70]


def test_restored_pending_is_collected_as_generated():
    gen = OverlappedGenerator(RecordingGenerator(), max_staleness=1)
    samples = [[Rollout(prompt_index=0, sample_index=0, token_ids=[9], logprobs=[-1.0], finish_reason="length")]]
    gen.restore_pending(samples, 3)
    assert gen.finished_pending()[1] == 3
    out = gen.collect()
    assert out[0][0].token_ids == [9] and out[0][0].policy_version == 3 and gen.last_version == 3
