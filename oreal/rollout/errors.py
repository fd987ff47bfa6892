"""Exceptions the trainer sees from a rollout engine.

All derive from EngineError so a trainer can catch one type. The names say what to do:
a WeightMismatchError is a configuration problem (nothing was written); the others mean the
engine process is gone or its weights can no longer be trusted, and it must be restarted.
"""

from __future__ import annotations


class EngineError(RuntimeError):
    """Base class of every error raised by oreal.rollout."""


class EngineStartError(EngineError):
    """The engine process could not start (bad model path, import error, timeout)."""


class EngineDiedError(EngineError):
    """The engine process exited while the trainer waited for it."""


class EngineTimeoutError(EngineError):
    """The engine did not answer within the configured timeout; it has been killed."""


class EngineSyncError(EngineError):
    """A weight sync failed after bytes may have been written: the engine is unusable."""


class EngineBrokenError(EngineError):
    """The engine was left unusable by an earlier failure (or restarted without a sync)."""


class RemoteEngineError(EngineError):
    """The engine raised an exception while serving a request; its traceback is included."""


class WeightMismatchError(EngineError, ValueError):
    """The trainer's weights do not match the engine's names or shapes; nothing was written."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        shown = "\n  ".join(self.problems[:40])
        more = f"\n  ... and {len(self.problems) - 40} more" if len(self.problems) > 40 else ""
        super().__init__(
            f"weight sync refused before any byte was written: {len(self.problems)} problem(s):\n  {shown}{more}\n"
            "Check that the trainer and the engine load the same architecture (names, tied embeddings, vocab size)."
        )

    def __reduce__(self):
        return (WeightMismatchError, (self.problems,))
