"""A rollout engine killed from outside (SIGKILL to its process group) in the middle of a
generate and in the middle of a weight sync: the trainer gets a clear error at once (not after
its timeout), the engine is never sampled from half-updated, the trainer's weights are intact,
and a restarted engine serves exactly them after one sync."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import torch

from oreal.rollout import EngineBrokenError, EngineDiedError, EngineSyncError, SamplingParams, WeightSyncer, build_engine
from oreal.rollout.transport import GlooTransport
from rollout.rollout_testlib import greedy_reference, tiny_config, tiny_model

GREEDY = SamplingParams(temperature=0, max_new_tokens=4)


def _kill_when(engine, condition, timeout_s=60):
    """SIGKILL the engine's process group once `condition()` holds (from a helper thread)."""
    def run():
        deadline = time.monotonic() + timeout_s
        while not condition() and time.monotonic() < deadline:
            time.sleep(0.05)
        os.killpg(engine.process.pid, signal.SIGKILL)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


@pytest.fixture
def engine(tmp_path):
    config = tiny_config(tie_word_embeddings=True)
    made = build_engine("hf", config, seed=5, num_threads=1, startup_timeout_s=180, request_timeout_s=120,
                        sync_timeout_s=120, log_path=str(tmp_path / "engine.log"))
    yield config, made
    made.close()


def test_engine_killed_mid_sync_and_mid_generate(engine, monkeypatch):
    config, engine = engine
    model = tiny_model(config, seed=41)
    syncer = WeightSyncer(model, engine, bucket_bytes=2048)
    syncer.sync()

    # mid-sync: the engine takes new weights bucket by bucket and is killed with one bucket in
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.25)
    updated = {n: p.detach().clone() for n, p in model.named_parameters()}
    engine.set_fault("sync", "hang", after_buckets=1)
    broadcasts = []
    real_broadcast = GlooTransport.broadcast
    monkeypatch.setattr(GlooTransport, "broadcast", lambda self, t: broadcasts.append(1) or real_broadcast(self, t))
    # bucket 2 on its way: the engine holds bucket 1 of the new weights and the rest of the old ones
    killer = _kill_when(engine, lambda: len(broadcasts) >= 2)
    t0 = time.monotonic()
    with pytest.raises(EngineSyncError, match="must not be used"):
        syncer.sync()
    assert time.monotonic() - t0 < 30  # not the 120 s sync timeout
    killer.join(10)
    monkeypatch.undo()
    with pytest.raises(EngineBrokenError):
        engine.generate([[1, 2]], n=1)
    # nothing the trainer holds was lost or changed by the failed sync
    assert all(torch.equal(p, updated[n]) for n, p in model.named_parameters())

    engine.restart()
    with pytest.raises(EngineBrokenError, match="restarted"):
        engine.generate([[1, 2]], n=1)  # initial weights: refused until a sync
    syncer.sync()
    state = engine.state_dict()
    assert all(torch.equal(state[n], p) for n, p in model.named_parameters())
    prompts = [[1, 2, 3], [7, 5]]
    out = engine.generate(prompts, n=1, sampling=GREEDY)
    expected, _ = greedy_reference(model, prompts, GREEDY.max_new_tokens)
    assert [r.token_ids for r in out] == expected

    # mid-generate: the engine is parked inside generate (a hang fault), then killed from outside
    engine.set_fault("generate", "hang")
    sent = time.monotonic()
    killer = _kill_when(engine, lambda: time.monotonic() > sent + 1.0)  # the request is in flight (hung)
    with pytest.raises(EngineDiedError, match="exited with code -9"):
        engine.generate([[1, 2, 3]], n=2)
    assert time.monotonic() - sent < 15  # well before request_timeout_s (120 s)
    killer.join(10)
    with pytest.raises(EngineBrokenError):
        engine.generate([[1, 2, 3]], n=1)
    assert all(torch.equal(p, updated[n]) for n, p in model.named_parameters())
