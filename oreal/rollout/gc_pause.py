"""Keep Python's cyclic garbage collector out of latency-critical sections.

In a process holding a model, torch and transformers, a full (generation 2) collection walks
millions of objects and can take most of a second; if it fires in the middle of a weight
sync, every rank and the engine wait for it. Reference counting still frees memory inside
the section; the collector simply runs afterwards.
"""

from __future__ import annotations

import gc
from contextlib import contextmanager


@contextmanager
def gc_paused():
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
