"""EngineClient: the trainer's handle on an engine process (RolloutEngine implementation).

It starts the process, sends it requests over the control channel with a deadline on every
answer, and keeps one rule: once anything went wrong after weights started to change (or
the process died or hung), the client is broken. A broken client kills its process and
raises EngineBrokenError on every later call, so no rollout ever comes from half-updated
weights. `restart()` starts a fresh process; it refuses to generate until a weight sync
has succeeded, for the same reason.
"""

from __future__ import annotations

import io
import secrets
import socket
import weakref
from collections.abc import Sequence
from typing import Any

import torch

from oreal.rollout.channel import EngineProcess
from oreal.rollout.errors import (
    EngineBrokenError,
    EngineError,
    EngineStartError,
    EngineSyncError,
    RemoteEngineError,
    WeightMismatchError,
)
from oreal.rollout.plan import SyncPlan
from oreal.rollout.transport import GlooTransport, Transport
from oreal.rollout.types import EngineInfo, Rollout, SamplingParams, TensorSpec

_REMOTE_TYPES = {"EngineBrokenError": EngineBrokenError, "EngineSyncError": EngineSyncError}


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (for servers that must be told their port up front)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class EngineClient:
    """A rollout engine in its own process. Build it with `oreal.rollout.build_engine`.

    Timeouts (seconds): `startup_timeout_s` to load the model, `request_timeout_s` for one
    `generate` call, `sync_timeout_s` for each wait of a weight sync (engine accepting a
    plan, each bucket broadcast, the final acknowledgement), `control_timeout_s` for small
    requests. `sync_host` is the address trainer rank 0 listens on for the data plane.
    """

    def __init__(self, kind: str, options: dict[str, Any], *, startup_timeout_s: float = 600.0,
                 request_timeout_s: float = 3600.0, sync_timeout_s: float = 600.0,
                 control_timeout_s: float = 120.0, sync_host: str = "127.0.0.1",
                 env: dict[str, str] | None = None, log_path: str | None = None):
        self.kind = kind
        self._options = options
        self.startup_timeout_s = startup_timeout_s
        self.request_timeout_s = request_timeout_s
        self.sync_timeout_s = sync_timeout_s
        self.control_timeout_s = control_timeout_s
        self.sync_host = sync_host
        self._env = env
        self._log_path = log_path
        self.process: EngineProcess | None = None
        self._start()
        self._finalizer = weakref.finalize(self, EngineClient._kill_quietly, self.process)

    # ----- lifecycle ------------------------------------------------------------------------
    def _start(self) -> None:
        self.incarnation = getattr(self, "incarnation", 0) + 1  # changes with every (re)start
        self._plan_on_engine: tuple | None = None  # (plan, allow_missing) the engine holds, checked
        self._broken: str | None = None
        self._needs_sync: str | None = None
        self._transport: Transport | None = None
        self._sync_rid: int | None = None
        self._sync_accepted = False
        self._next_rid = 1
        self.process = EngineProcess(env=self._env, startup_timeout_s=self.startup_timeout_s,
                                     log_path=self._log_path)
        try:
            self.process.send((self.kind, self._options))
            _, status, payload = self.process.recv(self.startup_timeout_s, "while loading the model")
        except EngineError as e:
            self.process.kill()
            raise EngineStartError(f"{self.kind} engine failed to start: {e}") from e
        if status != "ok":
            self.process.kill()
            raise EngineStartError(
                f"{self.kind} engine failed to start: {payload['type']}: {payload['message']}\n"
                f"--- engine traceback ---\n{payload['traceback']}"
            )
        self.info: EngineInfo = payload

    @staticmethod
    def _kill_quietly(process: EngineProcess | None) -> None:
        if process is not None:
            process.kill()

    def close(self) -> None:
        """Stop the engine process (politely, then by force). Safe to call twice."""
        if self._transport is not None:
            self._transport.close()
            self._transport = None
        if self.process is not None:
            self.process.shutdown()
            if self._broken is None:
                self.process.discard_log()
        self._broken = self._broken or "closed"

    def restart(self) -> None:
        """Replace the engine process with a fresh one; generation needs a weight sync first."""
        if self._transport is not None:
            self._transport.close()
        if self.process is not None:
            self.process.kill()
        self._start()
        self._finalizer.detach()
        self._finalizer = weakref.finalize(self, EngineClient._kill_quietly, self.process)
        self._needs_sync = "the engine was restarted and holds its initial weights"

    def __enter__(self) -> "EngineClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def broken(self) -> str | None:
        """Why this engine may not be used any more, or None."""
        return self._broken

    def _mark_broken(self, reason: str) -> None:
        if self._broken is None:
            self._broken = reason
        if self._transport is not None:
            self._transport.close()
            self._transport = None
        self.process.kill()

    def _check_usable(self) -> None:
        if self._broken is not None:
            raise EngineBrokenError(
                f"{self.kind} engine (pid {self.process.pid}) is unusable: {self._broken}. "
                "Call restart() and sync the weights again."
            )

    # ----- requests -------------------------------------------------------------------------
    def _send(self, command: str, **kwargs) -> int:
        self._check_usable()
        rid = self._next_rid
        self._next_rid += 1
        try:
            self.process.send((command, rid, kwargs))
        except EngineError as e:
            self._mark_broken(str(e))
            raise
        return rid

    def _reply(self, rid: int, timeout_s: float, doing: str, expect: str = "ok") -> Any:
        try:
            got_rid, status, payload = self.process.recv(timeout_s, doing)
        except EngineError as e:  # died or hung: nothing it holds can be trusted
            self._mark_broken(str(e).splitlines()[0])
            raise
        if got_rid != rid:
            self._mark_broken(f"protocol error: reply {got_rid} to request {rid}")
            raise EngineError(f"engine answered request {got_rid} while the trainer waited for {rid}")
        if status == "error":
            if payload["type"] == "WeightMismatchError":
                raise WeightMismatchError(payload["problems"])
            cls = _REMOTE_TYPES.get(payload["type"], RemoteEngineError)
            raise cls(f"{payload['type']} in the {self.kind} engine {doing}: {payload['message']}\n"
                      f"--- engine traceback ---\n{payload['traceback']}")
        if status != expect:
            self._mark_broken(f"protocol error: {status!r} instead of {expect!r}")
            raise EngineError(f"engine answered {status!r} while the trainer expected {expect!r}")
        return payload

    def _call(self, command: str, timeout_s: float | None = None, **kwargs) -> Any:
        rid = self._send(command, **kwargs)
        return self._reply(rid, timeout_s or self.control_timeout_s, f"during {command}")

    def begin_two_phase(self, command: str, **kwargs) -> int:
        """Send a command that answers "accepted" before moving bytes; return its id."""
        rid = self._send(command, timeout_s=self.sync_timeout_s, **kwargs)
        self._reply(rid, self.sync_timeout_s, f"before {command}", expect="accepted")
        return rid

    def end_two_phase(self, rid: int, command: str) -> Any:
        try:
            return self._reply(rid, self.sync_timeout_s, f"during {command}")
        except EngineError as e:
            if not isinstance(e, WeightMismatchError):
                self._mark_broken(f"{command} failed after it started: {str(e).splitlines()[0]}")
            raise

    # ----- generation -----------------------------------------------------------------------
    def generate(self, prompt_token_ids: Sequence[Sequence[int]], n: int = 1,
                 sampling: SamplingParams | None = None) -> list[Rollout]:
        """n samples per prompt (prompt-major order); see Rollout for the fields."""
        sampling = sampling or SamplingParams()
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive int, got {n!r}")
        prompts = []
        for i, p in enumerate(prompt_token_ids):
            ids = [int(t) for t in p]
            if not ids:
                raise ValueError(f"prompt_token_ids[{i}] is empty")
            prompts.append(ids)
        self._check_usable()
        if self._needs_sync:
            raise EngineBrokenError(f"refusing to generate: {self._needs_sync}; run WeightSyncer.sync() first")
        return self._call("generate", self.request_timeout_s, prompts=prompts, n=n, sampling=sampling)

    # ----- weight update (driven by WeightSyncer on trainer rank 0) ----------------------------
    def weight_specs(self) -> dict[str, TensorSpec]:
        return dict(self.info.specs)

    def open_transport(self) -> Transport:
        """The data plane to the engine, created on first use (both ends join, bounded wait)."""
        self._check_usable()
        if self._transport is not None:
            return self._transport
        prefix = f"oreal-sync-{secrets.token_hex(4)}"
        if self.info.transport == "gloo":
            store = GlooTransport.host_store(self.sync_host, self.sync_timeout_s)
            rid = self._send("init_transport", host=self.sync_host, port=store.port, world_size=2,
                             timeout_s=self.sync_timeout_s, prefix=prefix)
            try:
                transport = GlooTransport.join(store, 0, self.sync_host, self.sync_timeout_s, prefix)
            except RuntimeError as e:
                self._mark_broken(f"data plane setup failed: {e}")
                raise EngineSyncError(f"could not join the gloo group with the engine: {e}") from e
        elif self.info.transport == "nccl":
            from oreal.rollout.vllm import NcclTransport, nccl_settings, require_same_nccl

            require_same_nccl(nccl_settings(), self.info.nccl)  # before any rendezvous: a mismatch hangs it
            port = free_port(self.sync_host)
            world_size = 1 + self.info.receivers
            rid = self._send("init_transport", host=self.sync_host, port=port, world_size=world_size,
                             timeout_s=self.sync_timeout_s, prefix=prefix)
            try:
                transport = NcclTransport(self.sync_host, port, world_size, torch.cuda.current_device(),
                                          self.sync_timeout_s)
            except Exception as e:  # noqa: BLE001
                self._mark_broken(f"data plane setup failed: {e}")
                raise EngineSyncError(f"could not join the NCCL group with the vLLM workers: {e}") from e
        else:
            raise EngineError(f"unknown transport {self.info.transport!r}")
        self._reply(rid, self.sync_timeout_s, "while joining the data plane")
        self._transport = transport
        return transport

    def begin_weight_update(self, plan: SyncPlan, allow_missing: bool = False, *, wait: bool = True) -> None:
        """The engine checks `plan` (WeightMismatchError, nothing written) and awaits buckets.

        A plan the engine already checked (the same object, as WeightSyncer reuses it) is
        not sent again: the engine keeps the last one. With `wait=False` the engine's
        acceptance is collected by `wait_weight_update_accepted` (before the first bucket).
        """
        if self._sync_rid is not None:
            raise EngineError("a weight update is already in progress")
        known = self._plan_on_engine is not None and self._plan_on_engine[0] is plan \
            and self._plan_on_engine[1] == allow_missing
        self._sync_rid = self._send("sync", timeout_s=self.sync_timeout_s, plan=None if known else plan,
                                    allow_missing=allow_missing)
        self._sync_accepted = False
        if wait:
            self.wait_weight_update_accepted()
        self._plan_on_engine = (plan, allow_missing)

    def wait_weight_update_accepted(self) -> None:
        """Block until the engine accepted the plan of the update in progress."""
        if self._sync_rid is None or self._sync_accepted:
            return
        try:
            self._reply(self._sync_rid, self.sync_timeout_s, "before sync", expect="accepted")
        except BaseException:
            self._sync_rid = None
            self._plan_on_engine = None
            raise
        self._sync_accepted = True

    def finish_weight_update(self) -> int:
        """Wait until every bucket is in place; returns the engine's new weights version."""
        self.wait_weight_update_accepted()
        rid, self._sync_rid = self._sync_rid, None
        if rid is None:
            raise EngineError("finish_weight_update without begin_weight_update")
        version = self.end_two_phase(rid, "sync")
        self._needs_sync = None
        return version

    def abort_weight_update(self, reason: str) -> str:
        """Give up on a sync that failed half-way: the engine is killed and marked broken.

        Returns what became of the engine process (for the error every rank raises).
        """
        self._sync_rid = None
        code = self.process.proc.poll()
        state = (f"the engine process had exited with code {code}" if code is not None
                 else "the engine process was still running (hung or too slow); it was killed")
        self._mark_broken(f"weight sync aborted: {reason} ({state})")
        return f"{state}; log: {self.process.log_path}"

    # ----- inspection and testing hooks ------------------------------------------------------
    def ping(self) -> dict:
        return self._call("ping")

    def state_dict(self) -> dict[str, torch.Tensor]:
        """A copy of every engine parameter by name (transformers engine only; for tests)."""
        data = self._call("state_dict", self.request_timeout_s)
        return torch.load(io.BytesIO(data), weights_only=True)

    def set_fault(self, stage: str, kind: str, after_buckets: int = 0) -> None:
        """Test hook: make the engine exit or hang during its next generate or sync."""
        self._call("set_fault", stage=stage, kind=kind, after_buckets=after_buckets)
