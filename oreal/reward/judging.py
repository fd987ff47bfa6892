"""The reward signal: `judge(response, gold)` and `judge_batch(responses, golds)`.

Pipeline per item: extract the final answer from the response (`extract.py`), take the answer out of
the reference (`reference_answer`), decide inline what string work can decide (`fastpath.py`: same
text, two letters, two plain numbers), send the rest to a killable worker process that runs
`equivalence.compare` under a hard timeout (`worker_pool.py`), then, optionally, ask an LLM verifier
where the rules said "not equal".

`judge()` never raises for any response and returns within `timeout` seconds of wall time, extraction included, plus
the few milliseconds it takes to kill a hung helper (the first call of a process also waits for its
helper process to start, about half a second). `Judgement.reason`:

- correct: `match` (same text), `equivalent`, `choice` (the letter a prose answer settles on),
  `verifier` (the LLM verifier overruled "not equal");
- wrong: `different`, `unparsed`, `no_answer`, `unfinished` (no `stop_word` at the end), `no_gold`,
  `empty`, `timeout`, `error: <type>`.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from oreal.reward.extract import (DEFAULT_THINKING_FINISH_WORDS, choice_letter, extract_answer,
                                  extract_choice, reference_answer, _words_outside_math)
from oreal.reward.fastpath import DEFAULT_DECIMAL_POLICY, check_decimal_policy, quick_verdict
from oreal.reward.normalize import sanitize
from oreal.reward.worker_pool import JudgePool, WorkerStartError, check_timeout

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 2.0
CORRECT_REASONS = ("match", "equivalent", "choice", "verifier")


@dataclass(frozen=True)
class Judgement:
    """`correct`: the reward decision; `pred`: the extracted answer (None if none); `reason`: why."""

    correct: bool
    pred: str | None
    reason: str


_single_pool: JudgePool | None = None
_batch_pools: dict[int, JudgePool] = {}
_pools_lock = threading.Lock()


def _pool_for_single() -> JudgePool:
    global _single_pool
    with _pools_lock:
        if _single_pool is None:
            _single_pool = JudgePool(num_workers=1)
        return _single_pool


def default_pool(num_workers: int | None = None) -> JudgePool:
    """The process-wide pool `judge_batch` uses (one per worker count, started on first use)."""
    with _pools_lock:
        key = num_workers or 0
        if key not in _batch_pools:
            _batch_pools[key] = JudgePool(num_workers=num_workers)
        return _batch_pools[key]


def judge(response, gold, *, stop_word: str | None = None,
          thinking_finish_words=DEFAULT_THINKING_FINISH_WORDS, timeout: float = DEFAULT_TIMEOUT,
          question=None, verifier=None, decimal_policy: str = DEFAULT_DECIMAL_POLICY) -> Judgement:
    """Judge one response against one reference answer. Never raises for any response or gold (a
    `decimal_policy` it does not know, or a `timeout` that is not a number of seconds in (0, 1 day],
    is the caller's mistake: ValueError).

    `timeout` bounds the rule-based part of the call, extraction included (seconds of wall time);
    `verifier` (an `LLMVerifier`, with its own timeouts) is asked when the rule's reason is in
    `verifier.consult_on`. `decimal_policy`: how a decimal may stand for a non-terminating value
    (`fastpath.py`; default "relative": within a relative 1e-4, the originals' rule).
    """
    check_decimal_policy(decimal_policy)
    timeout = check_timeout(timeout)  # a caller's mistake, not a bad response: it raises
    pred = None
    start = time.monotonic()
    try:
        prepared = _prepare(response, gold, stop_word, thinking_finish_words, decimal_policy)
        pred = prepared.pred
        if prepared.early is None and prepared.verdict is None:
            remaining = timeout - (time.monotonic() - start)  # extraction of a huge response counts too
            try:
                if remaining <= 0:
                    equal, reason = False, "timeout"
                else:
                    equal, reason = _pool_for_single().compare(prepared.pred, prepared.gold, remaining,
                                                               decimal_policy=decimal_policy)
            except WorkerStartError as e:
                log.error("%s", e)
                equal, reason = False, "error: no worker"
            prepared.verdict = (equal, reason)
        result = _finish(prepared)
        if verifier is not None and not result.correct and consults(verifier, result.reason):
            verdict = verifier.verify(question, prepared.gold, _for_verifier(prepared, response))
            if verdict:
                result = Judgement(True, result.pred, "verifier")
        return result
    except Exception as e:  # noqa: BLE001  judge() must never raise
        return Judgement(False, pred, f"error: {type(e).__name__}")


def judge_batch(responses, golds, *, questions=None, stop_word: str | None = None,
                thinking_finish_words=DEFAULT_THINKING_FINISH_WORDS, timeout: float = DEFAULT_TIMEOUT,
                num_workers: int | None = None, pool: JudgePool | None = None, verifier=None,
                progress=None, decimal_policy: str = DEFAULT_DECIMAL_POLICY) -> list[Judgement]:
    """Judge many responses; item i of the result belongs to `responses[i]` and `golds[i]`.

    Sympy work runs in `pool` (default: a process-wide pool of `num_workers` processes), each item under
    a hard `timeout` in seconds; a hung item is killed and judged wrong with reason `timeout`, the
    others carry on. `progress(n)` is called as items finish (for progress bars).
    Raises ValueError for mismatched lengths and WorkerStartError if no worker process can start.
    """
    responses, golds = list(responses), list(golds)
    if len(responses) != len(golds):
        raise ValueError(f"judge_batch got {len(responses)} responses but {len(golds)} golds")
    if questions is not None:
        questions = list(questions)
        if len(questions) != len(responses):
            raise ValueError(f"judge_batch got {len(questions)} questions for {len(responses)} responses")
    timeout = check_timeout(timeout)
    check_decimal_policy(decimal_policy)
    prepared = [_prepare(r, g, stop_word, thinking_finish_words, decimal_policy) for r, g in zip(responses, golds)]
    heavy = [i for i, p in enumerate(prepared) if p.early is None and p.verdict is None]
    if progress is not None and len(heavy) < len(prepared):
        progress(len(prepared) - len(heavy))
    if heavy:
        pool = pool or default_pool(num_workers)
        verdicts = pool.compare_many([(prepared[i].pred, prepared[i].gold) for i in heavy], timeout,
                                     progress=progress, decimal_policy=decimal_policy)
        for i, verdict in zip(heavy, verdicts):
            prepared[i].verdict = verdict
    results = [_finish(p) for p in prepared]
    if verifier is not None:
        asks = [i for i, r in enumerate(results) if not r.correct and consults(verifier, r.reason)]
        if asks:
            opinions = verifier.verify_many(
                [(questions[i] if questions else None, prepared[i].gold, _for_verifier(prepared[i], responses[i]))
                 for i in asks])
            for i, opinion in zip(asks, opinions):
                if opinion:
                    results[i] = Judgement(True, results[i].pred, "verifier")
    return results


def summarize(judgements, verifier=None) -> dict:
    """Counts for logs: n, correct, accuracy, and one entry per reason (plus verifier metrics)."""
    judgements = list(judgements)
    reasons: dict[str, int] = {}
    for j in judgements:
        reasons[j.reason] = reasons.get(j.reason, 0) + 1
    correct = sum(j.correct for j in judgements)
    summary = {"n": len(judgements), "correct": correct,
               "accuracy": correct / len(judgements) if judgements else 0.0,
               "timeouts": reasons.get("timeout", 0), "reasons": dict(sorted(reasons.items()))}
    if verifier is not None:
        summary["verifier"] = verifier.metrics.as_dict()
    return summary


# ------------------------------------------------------------------------------------------------


class _Prepared:
    __slots__ = ("response", "pred", "gold", "verdict", "early")

    def __init__(self, response, pred, gold, verdict=None, early=None):
        self.response, self.pred, self.gold, self.verdict, self.early = response, pred, gold, verdict, early


def consults(verifier, reason: str) -> bool:
    """Whether `verifier` is asked about a rule verdict of `reason` (an `error: <type>` reason counts as "error")."""
    return reason in verifier.consult_on or (reason.startswith("error") and "error" in verifier.consult_on)


def _prepare(response, gold, stop_word, thinking_finish_words, decimal_policy=DEFAULT_DECIMAL_POLICY) -> _Prepared:
    """Extraction and the inline verdict. `early` is a final Judgement when no comparison is needed."""
    try:
        response = sanitize(response) if isinstance(response, str) else None  # only text is a response
        gold_answer = reference_answer(gold)
        if gold_answer is None:
            return _Prepared(response, None, None, early=Judgement(False, None, "no_gold"))
        if response is None or not response.strip():
            return _Prepared(response, None, gold_answer, early=Judgement(False, None, "no_answer"))
        if stop_word and not response.rstrip().endswith(stop_word):
            return _Prepared(response, None, gold_answer, early=Judgement(False, None, "unfinished"))
        pred = extract_answer(response, stop_word=stop_word, thinking_finish_words=thinking_finish_words)
        if pred is None:
            letter = choice_letter(gold_answer)
            if letter and extract_choice(response) == letter:
                return _Prepared(response, None, gold_answer, early=Judgement(True, None, "choice"))
            return _Prepared(response, None, gold_answer, early=Judgement(False, None, "no_answer"))
        quick = quick_verdict(pred, gold_answer, decimal_policy)
        verdict = (quick.equal, quick.reason) if quick is not None else None
        return _Prepared(response, pred, gold_answer, verdict=verdict)
    except Exception as e:  # noqa: BLE001
        return _Prepared(response, None, None, early=Judgement(False, None, f"error: {type(e).__name__}"))


def _finish(p: _Prepared) -> Judgement:
    if p.early is not None:
        return p.early
    equal, reason = p.verdict
    if not equal and reason != "timeout":
        # "The answer is for sure D, it can't be A or B": a prose response to a multiple-choice question
        letter = choice_letter(p.gold)
        if letter and not choice_letter(p.pred) and _words_outside_math(p.response[-2000:]) >= 1:
            if extract_choice(p.response) == letter:
                return Judgement(True, p.pred, "choice")
    return Judgement(bool(equal), p.pred, reason)


def _for_verifier(p: _Prepared, response) -> str | None:
    if p.pred is not None:
        return p.pred
    if isinstance(response, str):
        return response[-2000:]
    return None
