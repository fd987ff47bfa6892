"""Must-show: 2 torchrun ranks and the generator in both placements (placement_worker.py).

dedicated (2 transformers engine processes) and colocated (an engine inside each rank): every prompt is
answered exactly once and each rank gets its own prompts back in order, the engines hold the policy's
exact weights after every sync (tensor by tensor), and an engine that hangs or dies mid-step fails the
step on every rank within its timeout.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from torchrun_launch import free_port

WORKER = Path(__file__).resolve().parent / "placement_worker.py"
HANG_TIMEOUT_S = 4.0  # placement_worker.HANG_TIMEOUT_S
SLACK_S = 20.0  # process start-up of nothing, a few collectives, a loaded 2-core machine


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    out = tmp_path_factory.mktemp("placements")
    env = dict(os.environ, OUT_DIR=str(out), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(WORKER)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def _check_generation(gen: dict, version: int) -> None:
    assert gen["counts"] == [3] * len(gen["prompts"])  # n samples for every prompt, none lost or doubled
    assert gen["indices"] == [[i] * 3 for i in range(len(gen["prompts"]))]
    # Greedy: each prompt's samples are the trainer's own greedy continuation of that very prompt, so the
    # answers came back to the right rank, in the right order.
    assert gen["samples"] == [[ref] * 3 for ref in gen["reference"]]
    assert gen["versions"] == [version]


def _check_failure(failure: dict, *needles: str) -> None:
    assert failure["error"], "the step did not fail"
    for needle in needles:
        assert needle in failure["error"], failure["error"]
    assert failure["seconds"] < HANG_TIMEOUT_S + SLACK_S, failure


@pytest.mark.parametrize("placement", ["dedicated", "colocated"])
def test_every_prompt_answered_once_in_order(reports, placement):
    for r in reports:
        rep = r[placement]
        _check_generation(rep["gen1"], 1)
        _check_generation(rep["gen2"], 2)
    assert len(reports[0][placement]["gen1"]["prompts"]) == 3 and len(reports[1][placement]["gen1"]["prompts"]) == 5


def test_dedicated_spreads_prompts_over_both_engines_exactly_once(reports):
    served = reports[0]["dedicated"]["engine_prompts"]
    asked = [p for r in reports for p in r["dedicated"]["gen1"]["prompts"]]
    assert all(served), "an engine got no prompt: the spread did not use both engines"
    assert sorted(p for engine in served for p in engine) == sorted(asked)  # each prompt to one engine, once
    assert abs(len(served[0]) - len(served[1])) <= 1  # 8 similar prompts: 4 + 4


@pytest.mark.parametrize("placement", ["dedicated", "colocated"])
def test_engines_hold_the_policys_exact_weights_after_each_sync(reports, placement):
    if placement == "dedicated":
        rep = reports[0]["dedicated"]
        assert all(rep["before"]), "the engines started with the policy's weights: the test proves nothing"
        assert rep["after_sync1"] == [[], []] and rep["after_sync2"] == [[], []]
        assert rep["buckets"] > 5  # small buckets: many of them, each broadcast to both engines
        assert reports[0]["dedicated"]["versions"] == reports[1]["dedicated"]["versions"] == [1, 2]
        return
    for r in reports:
        rep = r["colocated"]
        assert rep["before"], "the engine started with the policy's weights: the test proves nothing"
        assert rep["after_sync1"] == [] and rep["after_sync2"] == [] and rep["after_reload"] == []
        assert rep["layers"] == 3  # two transformer layers, then embeddings, norm and lm_head
        assert rep["versions"] == [1, 2, 3]
        _check_generation_loose(rep["gen3"])
        # After generating, the engine sleeps with its weights discarded (level 2) while the policy trains.
        assert rep["asleep_after_generate"] == [True, False, 0]


def _check_generation_loose(gen: dict) -> None:
    assert gen["samples"] == [[ref] * 3 for ref in gen["reference"]] and gen["versions"] == [3]


@pytest.mark.parametrize("placement", ["dedicated", "colocated"])
def test_a_hung_or_killed_engine_fails_the_step_on_every_rank(reports, placement):
    for r in reports:
        rep = r[placement]
        if placement == "dedicated":
            _check_failure(rep["hang"], "rollout engine 1 of 2", "owned by trainer rank 0", "EngineTimeoutError")
            _check_failure(rep["killed"], "rollout engine 0 of 2", "EngineDiedError")
        else:
            _check_failure(rep["hang"], "rollout engine 1 (colocated, trainer rank 1)", "EngineTimeoutError")
            _check_failure(rep["killed"], "rollout engine 0 (colocated, trainer rank 0)", "killed")
    # Both ranks raise the same error.
    assert reports[0][placement]["hang"]["error"] == reports[1][placement]["hang"]["error"]
    assert reports[0][placement]["killed"]["error"] == reports[1][placement]["killed"]["error"]


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    """The worker as 2 nodes of 1 rank (two torchrun agents on this host): each rank owns its node's engine."""
    out = tmp_path_factory.mktemp("two_nodes")
    env = dict(os.environ, OUT_DIR=str(out), OMP_NUM_THREADS="1")
    port = str(free_port())
    agents = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node",
                                "1", "--node_rank", str(node), "--master_addr", "127.0.0.1", "--master_port", port,
                                str(WORKER)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
              for node in range(2)]
    outputs = [agent.communicate(timeout=400)[0] for agent in agents]
    for agent, output in zip(agents, outputs):
        assert agent.returncode == 0, f"torchrun failed:\n{output[-6000:]}"
    return [json.loads((out / f"rank{r}.json").read_text())["two_nodes"] for r in range(2)]


def test_two_nodes_each_owner_feeds_its_engine_through_the_relay(two_nodes):
    for r in two_nodes:
        assert r["owners"] == [0, 1]  # engine 1 belongs to node 1's local rank 0, not to rank 0
        assert r["before"], "the engine started with the policy's weights: the test proves nothing"
        # Rank 1's engine got every bucket from rank 0 through rank 1, bit for bit, after each sync.
        assert r["after_sync1"] == [] and r["after_sync2"] == [] and r["versions"] == [1, 2]
        _check_generation(r["gen1"], 1)
        _check_generation(r["gen2"], 2)
        assert r["engine_prompts"], "a node's engine got no prompt"
        # Node 1's engine dies mid-sync: both ranks raise the same EngineSyncError at once, and the next step
        # fails on both ranks naming the dead engine.
        assert r["sync_fault"]["error"].startswith("EngineSyncError") and "relay forward failed" in r["sync_fault"]["error"]
        _check_failure(r["killed"], "rollout engine 1 of 2", "owned by trainer rank 1", "EngineBrokenError")
    assert sorted(p for r in two_nodes for p in r["engine_prompts"]) == \
        sorted(p for r in two_nodes for p in r["gen1"]["prompts"])
    assert two_nodes[0]["sync_fault"]["error"] == two_nodes[1]["sync_fault"]["error"]
