"""A dead or hung engine raises a clear error within the timeout and is never used half-updated."""

import time

import pytest
import torch
from rollout_testlib import tiny_model

from oreal.rollout import (
    EngineBrokenError,
    EngineDiedError,
    EngineStartError,
    EngineSyncError,
    EngineTimeoutError,
    SamplingParams,
    WeightSyncer,
    build_engine,
)


@pytest.fixture
def start(tmp_path):
    """Start an engine whose log (kept when it breaks) goes to the test's tmp_path."""
    def start(config, **options):
        opts = dict(startup_timeout_s=180, request_timeout_s=60, sync_timeout_s=60,
                    log_path=str(tmp_path / f"engine-{len(list(tmp_path.iterdir()))}.log"))
        opts.update(options)
        return build_engine("hf", config, seed=5, num_threads=1, **opts)
    return start


def test_engine_hang_during_generate_times_out_and_is_killed(engine_config, start):
    engine = start(engine_config, request_timeout_s=3)
    try:
        engine.set_fault("generate", "hang")
        t0 = time.monotonic()
        with pytest.raises(EngineTimeoutError, match="did not answer within 3.0s"):
            engine.generate([[1, 2, 3]], n=1)
        assert 3 <= time.monotonic() - t0 < 10
        assert not engine.process.alive()
        with pytest.raises(EngineBrokenError):
            engine.generate([[1]], n=1)
    finally:
        engine.close()


def test_engine_death_during_generate_and_mid_sync_until_restart_and_resync(engine_config, start):
    engine = start(engine_config, receive="staged")  # also covers the two-buffer unpack-by-name path
    try:
        engine.set_fault("generate", "exit")
        t0 = time.monotonic()
        with pytest.raises(EngineDiedError, match="exited with code 17"):
            engine.generate([[1, 2, 3]], n=2)
        assert time.monotonic() - t0 < 10
        assert engine.broken is not None
        with pytest.raises(EngineBrokenError, match="unusable"):
            engine.generate([[1, 2, 3]], n=1)

        engine.restart()
        model = tiny_model(engine_config, seed=31)
        syncer = WeightSyncer(model, engine, bucket_bytes=2048)
        syncer.sync()
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1.5)
        engine.set_fault("sync", "exit", after_buckets=2)  # dies with 2 buckets written
        t0 = time.monotonic()
        with pytest.raises(EngineSyncError, match="must not be used"):
            syncer.sync()
        assert time.monotonic() - t0 < 20
        with pytest.raises(EngineBrokenError, match="weight sync aborted"):
            engine.generate([[1, 2]], n=1)

        engine.restart()
        with pytest.raises(EngineBrokenError, match="restarted"):
            engine.generate([[1, 2]], n=1)  # initial weights: refuse until synced
        version = syncer.sync()
        assert version == 1  # a fresh engine process counts from its first sync
        state = engine.state_dict()
        assert all(torch.equal(state[n], p) for n, p in model.named_parameters())
        assert engine.ping()["last_receive"] == "staged"
        out = engine.generate([[1, 2]], n=1, sampling=SamplingParams(temperature=0, max_new_tokens=3))
        assert out[0].weights_version == 1
    finally:
        engine.close()


def test_engine_hang_mid_sync_times_out(engine_config, start):
    engine = start(engine_config, sync_timeout_s=3)
    try:
        model = tiny_model(engine_config, seed=32)
        syncer = WeightSyncer(model, engine, bucket_bytes=2048)
        engine.set_fault("sync", "hang", after_buckets=1)
        t0 = time.monotonic()
        with pytest.raises(EngineSyncError, match="(?i)timed out|timeout|did not answer"):
            syncer.sync()
        assert time.monotonic() - t0 < 3 + 10
        assert not engine.process.alive()
        with pytest.raises(EngineBrokenError):
            engine.generate([[1]], n=1)
    finally:
        engine.close()


def test_engine_that_cannot_start_says_why(tmp_path):
    with pytest.raises(FileNotFoundError, match="/no/such/model"):
        build_engine("hf", "/no/such/model")  # checked before a process is started
    with pytest.raises(ValueError, match="unknown engine kind"):
        build_engine("tgi", str(tmp_path))
    # A failure inside the engine process comes back with its traceback.
    from oreal.rollout.client import EngineClient

    t0 = time.monotonic()
    with pytest.raises(EngineStartError, match="(?s)unknown engine kind 'bogus'.*engine traceback"):
        EngineClient("bogus", {}, startup_timeout_s=120, log_path=str(tmp_path / "engine.log"))
    assert time.monotonic() - t0 < 120
