"""The pure parts of the placements: engine layout, the spread of prompts, layer groups, vLLM's arguments, and
EngineFanOut's rules (fake engines, no process)."""

from __future__ import annotations

import random

import pytest

from oreal.rollout.colocated import layer_groups
from oreal.rollout.errors import EngineSyncError, WeightMismatchError
from oreal.rollout.fanout import EngineFanOut
from oreal.rollout.placement import (
    PlacementError,
    colocated_groups,
    dedicated_layout,
    expected_tokens,
    spread_prompts,
)
from oreal.rollout.types import TensorSpec
from oreal.rollout.vllm_colocated import external_launcher_kwargs


def test_each_node_owns_its_engines_and_gpus():
    layout = dedicated_layout(8, world_size=16, ranks_per_node=4, tensor_parallel_size=2, gpus="4,5,6,7")
    assert layout.nodes == 4 and layout.per_node == 2
    assert layout.owners == (0, 0, 4, 4, 8, 8, 12, 12)  # every node's local rank 0, never another node's
    assert layout.gpus == ("4,5", "6,7") * 4
    assert layout.engines_of(4) == [2, 3] and layout.engines_of(1) == []
    assert layout.owner_ranks == (0, 4, 8, 12)
    single = dedicated_layout(1, world_size=2, ranks_per_node=2)
    assert single.owners == (0,) and single.gpus == (None,)


@pytest.mark.parametrize("kwargs, option", [
    (dict(num_engines=3, world_size=8, ranks_per_node=4), "num_engines"),  # 3 engines over 2 nodes
    (dict(num_engines=2, world_size=8, ranks_per_node=4, tensor_parallel_size=2, gpus="4,5,6"), "gpus"),
    (dict(num_engines=0, world_size=2, ranks_per_node=2), "num_engines"),
])
def test_layout_errors_name_the_option(kwargs, option):
    with pytest.raises(PlacementError, match=option):
        dedicated_layout(**kwargs)


def test_colocated_groups_are_consecutive_ranks():
    assert colocated_groups(8, 2) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert colocated_groups(3, 1) == [[0], [1], [2]]
    with pytest.raises(PlacementError, match="tensor_parallel_size"):
        colocated_groups(6, 4)


@pytest.mark.parametrize("trial", range(5))
def test_spread_is_deterministic_complete_and_balanced(trial):
    rng = random.Random()  # fresh draws every run
    engines = rng.randint(1, 9)
    n = rng.randint(1, 16)
    response = rng.randint(1, 4000)
    lengths = [rng.randint(1, 3000) for _ in range(rng.randint(0, 70))]
    owner = spread_prompts(lengths, n, engines, response)
    assert owner == spread_prompts(list(lengths), n, engines, response)  # every rank computes the same
    assert len(owner) == len(lengths) and all(0 <= e < engines for e in owner)
    load = [0] * engines
    for length, e in zip(lengths, owner):
        load[e] += expected_tokens(length, n, response)
    if lengths:
        # Longest-first greedy: no engine exceeds the mean load by more than one prompt's cost.
        biggest = max(expected_tokens(length, n, response) for length in lengths)
        assert max(load) <= sum(load) / engines + biggest


def test_spread_uses_every_engine_for_equal_prompts():
    assert sorted(spread_prompts([10] * 8, 4, 4, 100)) == [0, 0, 1, 1, 2, 2, 3, 3]


def test_layer_groups_load_each_layer_then_the_rest():
    names = ["model.embed_tokens.weight", "model.layers.0.a", "model.layers.0.b", "model.layers.1.a",
             "model.layers.10.a", "model.norm.weight", "lm_head.weight"]
    assert layer_groups(names) == [["model.layers.0.a", "model.layers.0.b"], ["model.layers.1.a"],
                                   ["model.layers.10.a"], ["model.embed_tokens.weight", "model.norm.weight",
                                                           "lm_head.weight"]]


def test_external_launcher_arguments():
    kwargs = external_launcher_kwargs(model="/m", dtype="bfloat16", seed=3, world_size=32, tensor_parallel_size=2,
                                      gpu_memory_utilization=0.7, max_model_len=None, sleep_mode=True,
                                      engine_fields=("logprobs_mode",))
    assert kwargs["distributed_executor_backend"] == "external_launcher"
    assert (kwargs["tensor_parallel_size"], kwargs["data_parallel_size"]) == (2, 16)
    assert kwargs["enable_sleep_mode"] and kwargs["logprobs_mode"] == "processed_logprobs"
    assert "max_model_len" not in kwargs
    with pytest.raises(ValueError):
        external_launcher_kwargs(model="/m", dtype="bfloat16", seed=0, world_size=6, tensor_parallel_size=4,
                                 gpu_memory_utilization=0.5, max_model_len=None, sleep_mode=False)


class FakeEngine:
    sync_timeout_s = 5.0

    def __init__(self, specs, version=1, refuse=False):
        self.specs, self.version, self.refuse = specs, version, refuse
        self.begun = self.aborted = False

    def weight_specs(self):
        return dict(self.specs)

    def begin_weight_update(self, plan, allow_missing=False, *, wait=True):
        if self.refuse:
            raise WeightMismatchError(["refused"])
        self.begun = True

    def wait_weight_update_accepted(self):
        pass

    def finish_weight_update(self):
        return self.version

    def abort_weight_update(self, reason):
        self.aborted = True
        return "killed"


SPECS = {"w": TensorSpec("w", (2, 3), "float32")}


def test_fanout_refuses_engines_that_hold_different_weights():
    with pytest.raises(WeightMismatchError, match="engine 1 holds other weights"):
        EngineFanOut([FakeEngine(SPECS), FakeEngine({"w": TensorSpec("w", (3, 2), "float32")})]).weight_specs()
    assert EngineFanOut([FakeEngine(SPECS), FakeEngine(SPECS)]).weight_specs() == SPECS


def test_fanout_aborts_the_engines_that_accepted_when_one_refuses():
    first, second = FakeEngine(SPECS), FakeEngine(SPECS, refuse=True)
    with pytest.raises(WeightMismatchError):
        EngineFanOut([first, second]).begin_weight_update(object())
    assert first.begun and first.aborted  # it waited for buckets that will never come


def test_fanout_versions_must_agree():
    assert EngineFanOut([FakeEngine(SPECS, 4), FakeEngine(SPECS, 4)]).finish_weight_update() == 4
    with pytest.raises(EngineSyncError, match="disagree"):
        EngineFanOut([FakeEngine(SPECS, 4), FakeEngine(SPECS, 5)]).finish_weight_update()


@pytest.mark.parametrize("name, nodes, ranks_per_node, engines, tp", [
    ("oreal_7b.py", 4, 4, 8, 2), ("oreal_32b.py", 16, 4, 16, 4),  # GPUs 0-3 train, 4-7 generate
    ("oreal_7b_colocated.py", 4, 8, 16, 2), ("oreal_32b_colocated.py", 16, 8, 32, 4),  # every GPU does both
])
def test_the_paper_clusters_in_both_placements(name, nodes, ranks_per_node, engines, tp):
    from pathlib import Path

    from oreal.runtime.config import load_config_file

    cfg = load_config_file(Path(__file__).resolve().parents[2] / "configs" / name).validate()
    r = cfg.rollout
    world = nodes * ranks_per_node
    assert r.tensor_parallel_size == tp
    if r.placement == "dedicated":
        layout = dedicated_layout(r.num_engines, world, ranks_per_node, r.tensor_parallel_size, r.gpus)
        assert layout.num_engines == engines and layout.nodes == nodes
        used = {gpu for g in layout.gpus for gpu in g.split(",")}
        assert used == {"4", "5", "6", "7"}  # each node's engine GPUs, none shared with its trainer ranks (0-3)
    else:
        assert len(colocated_groups(world, r.tensor_parallel_size)) == engines
        assert r.gpu_memory_utilization <= 0.8  # room for what the trainer keeps resident while vLLM generates


def test_colocated_calls_on_the_main_thread_are_bounded_and_leave_no_trap():
    """`call_with_timeout` runs the call on the main thread (torch is faster there) with a watchdog: a hung call
    ends in EngineTimeoutError near its deadline, results and errors pass through, and a deadline that expires
    as a call returns neither changes its result nor leaves a signal that could kill the process later."""
    import os
    import signal
    import threading
    import time

    from oreal.rollout import colocated
    from oreal.rollout.errors import EngineTimeoutError

    assert threading.current_thread() is threading.main_thread()
    seen = []
    assert colocated.call_with_timeout(lambda: seen.append(threading.get_ident()) or 7, 5.0, "generate") == 7
    assert seen == [threading.get_ident()], "the call ran on the caller's (main) thread"
    start = time.monotonic()
    with pytest.raises(EngineTimeoutError, match="generate did not finish within 1s"):
        colocated.call_with_timeout(lambda: time.sleep(60), 1.0, "generate")
    assert time.monotonic() - start < 10
    with pytest.raises(ZeroDivisionError):
        colocated.call_with_timeout(lambda: 1 / 0, 5.0, "generate")
    for _ in range(20):  # deadlines that expire around the moment the call returns
        value = None
        try:
            value = colocated.call_with_timeout(lambda: time.sleep(0.01) or "done", 0.01, "generate")
        except EngineTimeoutError:
            pass
        assert value in (None, "done")
    if colocated._WATCHDOG_SIGNAL is not None:  # a stray watchdog signal now is harmless
        signal.pthread_kill(threading.main_thread().ident, colocated._WATCHDOG_SIGNAL)
        time.sleep(0.05)
        assert os.getpid() > 0
    # off the main thread: the worker-thread form
    box = {}
    worker = threading.Thread(target=lambda: box.update(v=colocated.call_with_timeout(lambda: 3, 5.0, "generate")))
    worker.start()
    worker.join()
    assert box == {"v": 3}
