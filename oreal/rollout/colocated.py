"""The colocated placement: the rollout engine lives inside every trainer process, on the training devices.

Two pieces, both used by every trainer rank:

- `InProcessEngine`: the transformers engine (oreal/rollout/hf.py's HFBackend) run in the trainer's own
  process, for CPU runs and tests. `sleep(2)` frees its weights while the policy trains (what vLLM's
  sleep mode does on GPUs), `wake_up()` re-allocates them, and the next `load_weights` fills them; a
  sleeping engine or one whose weights were discarded refuses to generate. The GPU twin is
  `oreal.rollout.vllm_colocated.VllmColocatedEngine` (vLLM's external-launcher executor).
- `LayerwiseLoader`: the weight hand-over, in process and without any broadcast. For each transformer
  layer in turn every rank gathers that layer's full tensors from the FSDP2 shards (the same all-gathers
  a forward does), hands them to its engine's `load_weights`, and frees them; peak extra memory is one
  layer. Names and shapes are checked against the engine before anything is gathered, and every rank
  learns every other rank's outcome, so all ranks return the same new version or raise the same error.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from collections.abc import Sequence

import torch
import torch.distributed as dist

from oreal.cpu_threads import use_threads
from oreal.rollout.errors import (
    EngineBrokenError,
    EngineSyncError,
    EngineTimeoutError,
    WeightMismatchError,
)
from oreal.rollout.gc_pause import gc_paused
from oreal.rollout.plan import check_specs
from oreal.rollout.sources import describe_parameters
from oreal.rollout.types import Rollout, SamplingParams, TensorSpec, dtype_name

_LAYER = re.compile(r"^(.*?\.layers\.\d+)\.")


# The signal a watchdog sends to interrupt an overdue call on the main thread (a real-time signal: no library
# or user handler is expected on it). None where the platform has none: calls then run in a worker thread.
_WATCHDOG_SIGNAL = getattr(signal, "SIGRTMIN", None)
_overdue: list = []  # the call the watchdog interrupts: [what, timeout_s] while it is overdue, else empty


def _raise_if_overdue(signum, frame) -> None:
    if _overdue:
        what, timeout_s = _overdue.pop()
        raise EngineTimeoutError(f"the colocated engine's {what} did not finish within {timeout_s:.0f}s")


def call_with_timeout(fn, timeout_s: float, what: str):
    """`fn()`, bounded by `timeout_s` (0: no limit): its result or its exception, or EngineTimeoutError past the
    deadline.

    On the main thread (the trainer's loop) `fn` runs right there and a watchdog thread interrupts it when the
    deadline passes, with a signal whose handler raises EngineTimeoutError: a sleep or Python-level loop is
    interrupted at once (PEP 475), a call stuck inside C code when it returns. It runs there, not in a worker
    thread, because the main thread holds the process's one OpenMP team (`oreal.cpu_threads`): a second
    team makes libgomp throttle both (measured: the demo's step of generation, 2 threads, 0.34 s on the main
    thread against 0.50-0.65 s in another thread). Elsewhere
    (another thread, or no real-time signals) `fn` runs in a daemon thread that is waited for at most
    `timeout_s` and left behind past it.
    """
    limit = timeout_s if timeout_s and timeout_s > 0 else None
    if _WATCHDOG_SIGNAL is not None and threading.current_thread() is threading.main_thread():
        return _call_on_main_thread(fn, limit, what)
    box: dict = {}
    threads = torch.get_num_threads()

    def run() -> None:
        try:
            use_threads(threads)  # other threads compute on one (oreal.cpu_threads): this one stands in for the caller
            box["result"] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            box["error"] = exc

    worker = threading.Thread(target=run, daemon=True, name="oreal-colocated-call")
    worker.start()
    worker.join(limit)
    if worker.is_alive():
        raise EngineTimeoutError(f"the colocated engine's {what} did not finish within {timeout_s:.0f}s")
    if "error" in box:
        raise box["error"]
    return box["result"]


def _call_on_main_thread(fn, limit: float | None, what: str):
    if limit is None:
        return fn()
    # Installed once and left installed: a no-op unless a watchdog marked a call overdue, so a signal that
    # arrives after the call returned finds nothing to do (restoring the default action, termination,
    # could let it kill the process).
    if signal.getsignal(_WATCHDOG_SIGNAL) is not _raise_if_overdue:
        signal.signal(_WATCHDOG_SIGNAL, _raise_if_overdue)
    finished = threading.Event()
    main_id = threading.main_thread().ident

    def watch() -> None:
        if not finished.wait(limit):
            _overdue.append((what, limit))
            signal.pthread_kill(main_id, _WATCHDOG_SIGNAL)

    watchdog = threading.Thread(target=watch, daemon=True, name="oreal-colocated-watchdog")
    watchdog.start()
    try:
        return fn()
    finally:
        finished.set()
        watchdog.join()
        _overdue.clear()  # it fired as fn returned: the result stands


class InProcessEngine:
    """A transformers engine inside the trainer process (the colocated placement on CPU).

    Same calls as a dedicated engine's client for generation (`generate`, `weight_specs`, `state_dict`,
    `set_fault`, `close`), plus the colocated life cycle: `sleep`, `wake_up`, `load_weights`.
    `request_timeout_s` bounds one `generate`: past it the call raises EngineTimeoutError and the engine
    is marked broken (a hung generation cannot be interrupted in process; its thread is left behind).
    """

    kind = "hf"

    def __init__(self, model, *, dtype: str = "float32", device: str = "cpu", seed: int = 0,
                 num_threads: int | None = None, max_batch_rows: int = 256, request_timeout_s: float = 3600.0):
        from oreal.rollout.hf import HFBackend

        # The backend seeds torch's global generator (at start and per sampling seed): in the trainer's process
        # that generator is the trainer's, so every engine call runs on a forked copy of it.
        with torch.random.fork_rng(devices=[]):
            self.backend = HFBackend(model=model, dtype=dtype, device=device, seed=seed, num_threads=num_threads,
                                     max_batch_rows=max_batch_rows)
        self.request_timeout_s = request_timeout_s
        self.sync_timeout_s = request_timeout_s
        self.version = 0
        self.asleep = False
        self.weights_valid = True  # False once sleep(2) discarded them, until the next load
        self._broken: str | None = None
        self._fault: str | None = None

    # ----- description ------------------------------------------------------------------------
    def weight_specs(self) -> dict[str, TensorSpec]:
        return self.backend.specs()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.backend.state_dict()

    @property
    def pid(self) -> int:
        return os.getpid()

    @property
    def broken(self) -> str | None:
        return self._broken

    # ----- generation --------------------------------------------------------------------------
    def generate(self, prompt_token_ids: Sequence[Sequence[int]], n: int = 1,
                 sampling: SamplingParams | None = None) -> list[Rollout]:
        if self._broken:
            raise EngineBrokenError(f"colocated engine of trainer pid {os.getpid()} is unusable: {self._broken}")
        if self.asleep or not self.weights_valid:
            raise EngineBrokenError("refusing to generate: the colocated engine is asleep or its weights were "
                                    "discarded; sync the weights first")
        prompts = [[int(t) for t in p] for p in prompt_token_ids]

        def run() -> list[Rollout]:
            if self._fault == "hang":
                while True:
                    time.sleep(3600)
            if self._fault == "exit":
                raise EngineBrokenError("the engine was killed (test fault)")
            with torch.random.fork_rng(devices=[]), gc_paused():
                return self.backend.generate(prompts, n, sampling or SamplingParams())

        try:
            rollouts = call_with_timeout(run, self.request_timeout_s, "generate")
        except EngineTimeoutError as exc:
            self._broken = str(exc)
            raise
        except BaseException as exc:
            self._broken = f"generate failed: {type(exc).__name__}: {exc}"
            raise
        for r in rollouts:
            r.weights_version = self.version
        return rollouts

    def set_fault(self, stage: str, kind: str, after_buckets: int = 0) -> None:
        """Test hook: the next generate hangs ("hang") or fails as a killed engine would ("exit")."""
        if stage != "generate" or kind not in ("exit", "hang"):
            raise ValueError(f"the colocated engine fakes generate faults only, got {stage=} {kind=}")
        self._fault = kind

    # ----- sleep / wake -------------------------------------------------------------------------
    def sleep(self, level: int) -> None:
        """Level 1: nothing to offload on CPU (generate keeps no cache between calls); level 2: free the
        weights' memory (the next `load_weights` after `wake_up` restores them)."""
        if level == 2 and self.weights_valid:
            for param in self.backend.params.values():
                param.data = torch.empty(0, dtype=param.dtype, device=param.device)
            self.backend._layout = None  # the flat storage of the in-place receive path went with them
            self.weights_valid = False
        self.asleep = True

    def wake_up(self) -> None:
        if not self.weights_valid:
            specs = self.weight_specs_cache
            for name, param in self.backend.params.items():
                param.data = torch.empty(specs[name].shape, dtype=param.dtype, device=param.device)
        self.asleep = False

    @property
    def weight_specs_cache(self) -> dict[str, TensorSpec]:
        if not hasattr(self, "_specs"):
            self._specs = self.backend.specs()
        return self._specs

    def remember_specs(self) -> None:
        self.weight_specs_cache  # noqa: B018 - shapes must be known before sleep(2) frees the weights

    # ----- weights --------------------------------------------------------------------------------
    @torch.no_grad()
    def load_weights(self, weights: Sequence[tuple[str, torch.Tensor]]) -> None:
        for name, tensor in weights:
            self.backend.params[name].data.copy_(tensor)

    def finish_load(self) -> int:
        self.weights_valid = True
        self.version += 1
        return self.version

    def close(self) -> None:
        self._broken = self._broken or "closed"


def layer_groups(names: Sequence[str]) -> list[list[str]]:
    """Parameter names grouped by transformer layer (`...layers.<i>.`), in first-seen order; the rest
    (embeddings, final norm, lm_head) form one group of its own, loaded last."""
    groups: dict[str, list[str]] = {}
    rest: list[str] = []
    for name in names:
        match = _LAYER.match(name)
        if match:
            groups.setdefault(match.group(1), []).append(name)
        else:
            rest.append(name)
    return [*groups.values(), *([rest] if rest else [])]


class LayerwiseLoader:
    """Every rank's colocated engine gets the policy's current weights, one layer at a time (collective)."""

    def __init__(self, model: torch.nn.Module, engine, *, group=None, allow_missing: bool = False):
        self.distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.distributed else 0
        self.world_size = dist.get_world_size() if self.distributed else 1
        self.engine = engine
        self.group = group
        self.allow_missing = allow_missing
        self.sources = describe_parameters(model, rank=self.rank, world_size=self.world_size)
        self.by_name = {s.name: s for s in self.sources}
        self.groups = layer_groups([s.name for s in self.sources])
        self.last_layers = 0
        if hasattr(engine, "remember_specs"):
            engine.remember_specs()

    def _agree(self, failure: BaseException | None) -> BaseException | None:
        """The first failure of any rank (None if none), on every rank."""
        if not self.distributed or self.world_size == 1:
            return failure
        everyone: list = [None] * self.world_size
        dist.all_gather_object(everyone, None if failure is None else (self.rank, failure), group=self.group)
        for item in everyone:
            if item is not None:
                return item[1]
        return None

    def _check(self) -> None:
        engine_specs = self.engine.weight_specs_cache if hasattr(self.engine, "weight_specs_cache") \
            else self.engine.weight_specs()
        sent = [TensorSpec(s.name, s.shape, engine_specs[s.name].dtype if s.name in engine_specs else dtype_name(s.dtype))
                for s in self.sources]
        problems = check_specs(sent, engine_specs, allow_missing=self.allow_missing)
        if problems:
            raise WeightMismatchError(problems)

    def sync(self) -> int:
        """Load the current weights into this rank's engine (every rank calls it); returns the new version."""
        with gc_paused(), torch.no_grad():
            failure = None
            try:
                self._check()
                if self.engine.broken:
                    raise EngineBrokenError(f"the colocated engine is unusable: {self.engine.broken}")
                self.engine.wake_up()
            except BaseException as exc:  # noqa: BLE001 - every rank must hear of it before any gather
                failure = exc
            failure = self._agree(failure)
            if failure is not None:
                raise failure
            version = -1
            for names in self.groups:
                # full_tensor() is collective: every rank gathers every layer, in the same order, even after
                # its own engine failed (leaving would strand the others in the all-gather).
                full = [(n, self._full(n)) for n in names]
                if failure is None:
                    try:
                        self.engine.load_weights(full)
                    except BaseException as exc:  # noqa: BLE001 - reported to every rank below
                        failure = exc
                del full
            if failure is None:
                version = self.engine.finish_load()
            failure = self._agree(failure)
            if failure is not None:
                if isinstance(failure, WeightMismatchError):
                    raise failure
                raise EngineSyncError(f"colocated weight load failed: {type(failure).__name__}: {failure}") from failure
            self.last_layers = len(self.groups)
            return version

    def _full(self, name: str) -> torch.Tensor:
        param = self.by_name[name].param
        full_tensor = getattr(param, "full_tensor", None)
        return (full_tensor() if full_tensor is not None else param).detach()
