"""The engine process: `python -m oreal.rollout.server`, started by EngineClient.

It dials back to the trainer (oreal/rollout/channel.py), builds its backend (transformers or
vLLM) from the first message, reports an EngineInfo, then serves one request at a time:

    request  (command, request_id, kwargs)
    reply    (request_id, "ok" | "accepted" | "error", payload)

Commands that move weights answer twice: "accepted" once the plan is checked (and before
any byte moves), then "ok" when every byte is in place. A sync that fails after "accepted"
leaves the engine dirty: it refuses to generate until a later sync completes, so a
half-updated engine is never sampled from. The process exits if the trainer disappears.
"""

from __future__ import annotations

import io
import os
import sys
import threading
import time
import traceback

import torch

from oreal.rollout.channel import Channel, ChannelClosed, connect_from_child
from oreal.rollout.gc_pause import gc_paused
from oreal.rollout.errors import EngineBrokenError, WeightMismatchError
from oreal.rollout.plan import SyncPlan, check_specs
from oreal.rollout.types import Rollout


def make_backend(kind: str, options: dict):
    if kind == "hf":
        from oreal.rollout.hf import HFBackend

        return HFBackend(**options)
    if kind == "vllm":
        from oreal.rollout.vllm import VllmBackend

        return VllmBackend(**options)
    raise ValueError(f"unknown engine kind {kind!r}")


def _error_payload(exc: BaseException) -> dict:
    payload = {"type": type(exc).__name__, "message": str(exc), "traceback": traceback.format_exc()}
    if isinstance(exc, WeightMismatchError):
        payload["problems"] = exc.problems
    return payload


class Server:
    def __init__(self, channel: Channel, backend):
        self.channel = channel
        self.backend = backend
        self.version = 0
        self.dirty: str | None = None  # why the weights cannot be trusted, or None
        self.fault: dict | None = None  # test hook: see cmd_set_fault
        self.last_plan: SyncPlan | None = None

    # ----- faults (test hook) ---------------------------------------------------------------
    def cmd_set_fault(self, stage: str, kind: str, after_buckets: int = 0) -> None:
        """Make the engine die ("exit") or stop answering ("hang") during `stage`.

        stage "generate": at the next generate; stage "sync": after `after_buckets` buckets
        of the next sync are applied. Used by the failure-handling tests and nowhere else.
        """
        if stage not in ("generate", "sync") or kind not in ("exit", "hang"):
            raise ValueError(f"bad fault {stage=} {kind=}")
        self.fault = {"stage": stage, "kind": kind, "after_buckets": after_buckets}

    def _maybe_fault(self, stage: str, buckets_done: int = 0) -> None:
        f = self.fault
        if f and f["stage"] == stage and buckets_done >= f["after_buckets"]:
            if f["kind"] == "exit":
                os._exit(17)
            while True:
                time.sleep(3600)

    # ----- commands ---------------------------------------------------------------------------
    def cmd_ping(self) -> dict:
        return {"version": self.version, "dirty": self.dirty,
                "last_receive": getattr(self.backend, "last_receive", None)}

    def cmd_weight_specs(self):
        return self.backend.specs()

    def cmd_generate(self, prompts, n: int, sampling) -> list[Rollout]:
        if self.dirty:
            raise EngineBrokenError(f"refusing to generate with half-updated weights: {self.dirty}")
        self._maybe_fault("generate")
        rollouts = self.backend.generate(prompts, n, sampling)
        for r in rollouts:
            r.weights_version = self.version
        return rollouts

    def cmd_init_transport(self, **kwargs) -> None:
        self.backend.init_transport(**kwargs)

    def cmd_state_dict(self) -> bytes:
        buf = io.BytesIO()
        torch.save(self.backend.state_dict(), buf)
        return buf.getvalue()

    def cmd_prepare_raw(self, sizes) -> None:
        self.backend.prepare_raw(list(sizes))

    def two_phase(self, rid: int, command: str, kwargs: dict) -> None:
        """Commands that answer "accepted", then move bytes, then answer "ok"."""
        timeout_s = kwargs.pop("timeout_s")
        if command == "sync":
            plan: SyncPlan | None = kwargs["plan"]
            if plan is None:  # the trainer reuses the plan this engine checked last time
                if self.last_plan is None:
                    raise ValueError("sync without a plan, and no earlier plan to reuse")
                plan = self.last_plan
            else:
                self.last_plan = None
                problems = check_specs(plan.specs, self.backend.specs(),
                                       allow_missing=kwargs.get("allow_missing", False))
                if problems:
                    raise WeightMismatchError(problems)
                self.last_plan = plan
            self.channel.send((rid, "accepted", None))
            self.dirty = f"weight sync {self.version + 1} started but did not finish"
            self.backend.receive_weights(plan, timeout_s, lambda i: self._maybe_fault("sync", i + 1))
            self.version += 1
            self.dirty = None
            result = self.version
        elif command == "receive_tensor":
            spec = kwargs["spec"]
            problems = check_specs([spec], self.backend.specs(), allow_missing=True)
            if problems:
                raise WeightMismatchError(problems)
            self.channel.send((rid, "accepted", None))
            self.dirty = "a per-tensor update started but did not finish"
            self.backend.receive_tensor(spec, timeout_s)
            self.dirty = None
            result = None
        elif command == "receive_raw":
            self.channel.send((rid, "accepted", None))
            result = self.backend.receive_raw(timeout_s)
        else:
            raise ValueError(f"unknown command {command!r}")
        self.channel.send((rid, "ok", result))

    def serve(self) -> None:
        while True:
            try:
                command, rid, kwargs = self.channel.recv()
            except (ChannelClosed, OSError, EOFError):
                return
            if command == "shutdown":
                return
            try:
                if command in ("sync", "receive_tensor", "receive_raw"):
                    with gc_paused():  # a full collection here would stall the data plane
                        self.two_phase(rid, command, dict(kwargs))
                    continue
                handler = getattr(self, f"cmd_{command}", None)
                if handler is None:
                    raise ValueError(f"unknown command {command!r}")
                result = handler(**kwargs)
                self.channel.send((rid, "ok", result))
            except (ChannelClosed, BrokenPipeError, ConnectionResetError):
                return
            except Exception as exc:  # noqa: BLE001 - every failure goes back to the trainer
                try:
                    self.channel.send((rid, "error", _error_payload(exc)))
                except OSError:
                    return


def _exit_when_orphaned(parent: int) -> None:
    # The trainer may die without closing the channel (SIGKILL): do not outlive it.
    while True:
        time.sleep(1.0)
        if os.getppid() != parent:
            os._exit(1)


def main() -> None:
    threading.Thread(target=_exit_when_orphaned, args=(os.getppid(),), daemon=True).start()
    channel = connect_from_child()
    kind, options = channel.recv()
    try:
        backend = make_backend(kind, options)
        info = backend.info()
    except Exception as exc:  # noqa: BLE001
        traceback.print_exc()
        channel.send((0, "error", _error_payload(exc)))
        sys.exit(1)
    channel.send((0, "ok", info))
    Server(channel, backend).serve()
    channel.close()
    # vLLM and gloo threads can keep the interpreter alive; the trainer already said goodbye.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
