"""One step of overlap between generation and training (`rollout.max_staleness` 1), and the policy version
every rollout records.

`OverlappedGenerator` wraps the run's `DistributedGenerator` (same `generate`, `sync`, `close`) and adds
`submit` / `collect`: `submit` starts a generation on every rank and returns at once, so step k trains
while the engines generate step k+1 with the weights step k started from; `collect` (next step) waits for
it. The trainer tells it the policy version at every sync, and it stamps each `Rollout.policy_version`
with the version of the weights the engines held when the request was sent.

DESIGN: the weight sync *waits* for the generation in flight (it does not interrupt it between requests).
A submission is one request per engine (all of a step's prompts), so "between requests" is "after it":
interrupting would mean aborting and resubmitting the unfinished prompts under the new weights, which
mixes two policy versions in one step's data (and, mid-request, in one rollout) and makes a resumed run's
samples depend on timing. Waiting keeps every step's data from exactly one version, at most one update
old, and reproducible from (seed, step, weights). The cost is the part of a generation longer than the
training step it overlaps, which is idle trainer time either way.

Threading: the generation runs in a background thread of every rank. Its collectives use the generator's
own gloo group (`oreal.runtime.build.generator_group`), which nothing else touches while a generation is
in flight: `sync`, `generate` (evaluation) and `close` wait for it first, and the trainer's own
collectives (FSDP2, all-reduces, sample gathering) are on other groups. Colocated engines share the
trainer's process and devices, so the overlap is refused there (`rollout.max_staleness` is validated).
"""

from __future__ import annotations

import threading
import time
from typing import Sequence


class OverlapError(RuntimeError):
    """`submit` / `collect` used out of order (a programming error in a trainer, not a user's)."""


def stamp_policy_version(samples: list[list], version: int) -> list[list]:
    """Set `policy_version` on every rollout of `samples` (one list per prompt); returns `samples`."""
    for group in samples:
        for rollout in group:
            rollout.policy_version = version
    return samples


class OverlappedGenerator:
    """The run's generator with one generation allowed in flight; see the module docstring."""

    def __init__(self, generator, *, max_staleness: int = 0):
        self.generator = generator
        self.max_staleness = max_staleness
        self.policy_version = 0  # of the weights the engines hold (set by the trainer at every sync)
        self.last_version = 0  # of the samples the last generate / collect returned
        self._thread: threading.Thread | None = None
        self._pending = False
        self._result: list[list] | None = None
        self._error: BaseException | None = None
        self._pending_version = -1

    # -- what DistributedGenerator offers --------------------------------------------------------
    def __getattr__(self, name: str):  # placement, syncer, ...: the wrapped generator's
        if name == "generator":
            raise AttributeError(name)
        return getattr(self.generator, name)

    @property
    def engines(self) -> list:
        return self.generator.engines

    @property
    def engine(self):
        return self.generator.engine

    def generate(self, prompt_ids: Sequence[Sequence[int]], n: int, sampling) -> list[list]:
        """Synchronous generation (after any generation in flight has finished), stamped with the version."""
        self.wait()
        samples = self.generator.generate(prompt_ids, n, sampling)
        self.last_version = self.policy_version
        return stamp_policy_version(samples, self.policy_version)

    def sync(self, policy_version: int | None = None) -> float:
        """Push the trainer's weights into the engines once the generation in flight has finished; they are
        now `policy_version` (default: one more than before). Returns the seconds the sync itself took."""
        self.wait()
        seconds = self.generator.sync()
        self.policy_version = self.policy_version + 1 if policy_version is None else int(policy_version)
        return seconds

    def close(self) -> None:
        # A generation still in flight (the run failed mid-step) is not waited for: closing the engines
        # ends it, and its daemon thread ends with the process.
        self.generator.close()

    # -- the overlap -------------------------------------------------------------------------------
    @property
    def pending(self) -> bool:
        """A submitted generation has not been collected yet (it may have finished)."""
        return self._pending

    @property
    def in_flight(self) -> bool:
        """A submitted generation is still running."""
        return self._thread is not None and self._thread.is_alive()

    def submit(self, prompt_ids: Sequence[Sequence[int]], n: int, sampling) -> None:
        """Start generating on every rank (collective, like `generate`) and return at once."""
        if self.max_staleness < 1:
            raise OverlapError("submit needs rollout.max_staleness >= 1; generate synchronously instead")
        if self._pending:
            raise OverlapError("a generation is already pending: collect it before submitting another")
        prompts = [list(map(int, p)) for p in prompt_ids]
        self._pending, self._result, self._error = True, None, None
        self._pending_version = self.policy_version

        def run() -> None:
            try:
                self._result = self.generator.generate(prompts, n, sampling)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the trainer's thread by wait()
                self._error = exc

        self._thread = threading.Thread(target=run, name="oreal-overlapped-generation", daemon=True)
        self._thread.start()

    def wait(self) -> float:
        """Block until the generation in flight (if any) has finished; returns the seconds waited. A failed
        generation's error (the same `GenerationError` on every rank) is raised here."""
        start = time.perf_counter()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error, self._pending = self._error, None, False
            raise error
        return time.perf_counter() - start

    def collect(self) -> list[list]:
        """The pending generation's samples (waiting for them), stamped with the version that generated them."""
        if not self._pending:
            raise OverlapError("collect without a pending generation: submit first")
        self.wait()
        samples, self._result, self._pending = self._result, None, False
        self.last_version = self._pending_version
        return stamp_policy_version(samples, self._pending_version)

    def finished_pending(self) -> tuple[list[list], int] | None:
        """For a checkpoint: the pending generation's samples once finished, and their version (not consumed);
        None when nothing is pending."""
        if not self._pending:
            return None
        self.wait()
        return stamp_policy_version(self._result, self._pending_version), self._pending_version

    def restore_pending(self, samples: list[list], version: int) -> None:
        """On resume: samples a checkpoint recorded become the pending generation, as if just finished."""
        if self._pending:
            raise OverlapError("restore_pending with a generation already pending")
        self._pending, self._result, self._error = True, stamp_policy_version(samples, version), None
        self._pending_version = version
