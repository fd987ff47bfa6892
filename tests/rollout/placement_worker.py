"""torchrun worker for test_placements.py: 2 FSDP2 trainer ranks on gloo, the generator in both placements.

dedicated: 2 transformers engine processes owned by rank 0, fed by one WeightSyncer through EngineFanOut.
colocated: a transformers engine inside each rank, fed layer by layer by LayerwiseLoader.
two_nodes (when launched as 2 nodes of 1 rank): an engine per node, rank 1's fed through the relay.
Each rank writes what it observed to OUT_DIR/rank<r>.json; the test asserts on it.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
)
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rollout_testlib import greedy_reference, tiny_config, tiny_model

from oreal.rollout import SamplingParams, WeightSyncer, build_engine
from oreal.rollout.colocated import InProcessEngine, LayerwiseLoader
from oreal.rollout.fanout import EngineFanOut
from oreal.rollout.generator import (
    ColocatedEngines,
    DedicatedEngines,
    DistributedGenerator,
    GenerationError,
)
from oreal.rollout.placement import dedicated_layout

HANG_TIMEOUT_S = 4.0
GREEDY = SamplingParams(temperature=0, max_new_tokens=6)


class Recording:
    """An engine client that remembers every prompt it was asked for (rank 0's view of the spread)."""

    def __init__(self, engine):
        self.engine, self.prompts = engine, []

    def generate(self, prompts, n=1, sampling=None):
        self.prompts.extend([list(p) for p in prompts])
        return self.engine.generate(prompts, n=n, sampling=sampling)

    def __getattr__(self, name):
        return getattr(self.engine, name)


def train_step(model, optimizer, seed: int) -> None:
    g = torch.Generator().manual_seed(seed + dist.get_rank())
    ids = torch.randint(0, model.config.vocab_size, (2, 10), generator=g)
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def full_state(model) -> dict:
    """The policy's full weights on every rank (collective)."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))


def mismatches(engine_state: dict, trainer_state: dict) -> list[str]:
    """Names whose engine tensor is not bit-equal to the trainer's (or that only one side has)."""
    bad = sorted(set(engine_state) ^ set(trainer_state))
    bad += [n for n in engine_state if n in trainer_state and not torch.equal(engine_state[n], trainer_state[n])]
    return bad


def my_prompts(rank: int, count: int, seed: int) -> list[list[int]]:
    """Distinct prompts of varied length per rank (first token says whose, second which)."""
    g = torch.Generator().manual_seed(seed * 10 + rank)
    return [[10 + rank, 20 + i] + torch.randint(30, 90, (int(torch.randint(1, 6, (1,), generator=g)),),
                                                  generator=g).tolist() for i in range(count)]


def check_generation(generator, model, rank: int, seed: int, count: int) -> dict:
    """Greedy samples of this rank's prompts, in order, against the trainer's own greedy decoding."""
    prompts = my_prompts(rank, count, seed)
    plain = tiny_model(model.config, seed=0)
    plain.load_state_dict(full_state(model))  # collective; the decoding below is not (ranks differ in count)
    reference, _ = greedy_reference(plain, prompts, max_new_tokens=GREEDY.max_new_tokens)
    out = generator.generate(prompts, 3, GREEDY)
    return {"prompts": prompts, "counts": [len(g) for g in out],
            "indices": [[r.prompt_index for r in g] for g in out],
            "samples": [[r.token_ids[:len(ref)] for r in g] for g, ref in zip(out, reference)],
            "reference": reference, "versions": sorted({r.weights_version for g in out for r in g})}


def expect_failure(generator, rank: int, count: int) -> dict:
    start = time.perf_counter()
    try:
        generator.generate(my_prompts(rank, count, 99), 2, SamplingParams(temperature=1.0, max_new_tokens=4, seed=1))
        return {"error": "", "seconds": time.perf_counter() - start}
    except GenerationError as exc:
        return {"error": str(exc), "seconds": time.perf_counter() - start}


def dedicated(model, optimizer, rank: int, out_dir: Path, group) -> dict:
    report: dict = {}
    engines = {}
    if rank == 0:
        for e in range(2):
            engines[e] = Recording(build_engine("hf", model.config, seed=50 + e, num_threads=1, startup_timeout_s=300,
                                                request_timeout_s=HANG_TIMEOUT_S, sync_timeout_s=60,
                                                log_path=str(out_dir / f"engine-{e}.log")))
    layout = dedicated_layout(2, dist.get_world_size(), dist.get_world_size())
    syncer = WeightSyncer(model, EngineFanOut(list(engines.values())) if engines else None, bucket_bytes=2048)
    generator = DistributedGenerator(DedicatedEngines(engines, layout, rank=rank, world_size=2, group=group), syncer)

    def compare() -> list:
        state = full_state(model)
        return [mismatches(engines[e].state_dict(), state) for e in sorted(engines)] if rank == 0 else []

    report["before"] = compare()  # the engines start from their own random weights
    report["versions"] = [syncer.sync()]
    report["after_sync1"] = compare()
    report["buckets"] = len(syncer.last_plan.buckets)
    report["gen1"] = check_generation(generator, model, rank, seed=1, count=3 + 2 * rank)
    if rank == 0:
        report["engine_prompts"] = [list(engines[e].prompts) for e in sorted(engines)]
    train_step(model, optimizer, seed=1)
    report["versions"].append(syncer.sync())
    report["after_sync2"] = compare()
    report["gen2"] = check_generation(generator, model, rank, seed=2, count=4)

    # Engine 1 hangs: every rank fails within the engine's timeout. Then engine 0 dies mid-request.
    if rank == 0:
        engines[1].set_fault("generate", "hang")
    report["hang"] = expect_failure(generator, rank, 4)
    if rank == 0:
        engines[0].set_fault("generate", "exit")
    report["killed"] = expect_failure(generator, rank, 4)
    generator.close()
    return report


def colocated(model, optimizer, rank: int, group) -> dict:
    report: dict = {}
    engine = InProcessEngine(model.config, seed=70 + rank, request_timeout_s=HANG_TIMEOUT_S)
    loader = LayerwiseLoader(model, engine, group=group)
    generator = DistributedGenerator(ColocatedEngines(engine, rank=rank, world_size=2, sleep_level=2, group=group),
                                     loader)

    def compare() -> list:
        return mismatches(engine.state_dict(), full_state(model))

    report["before"] = compare()
    report["versions"] = [generator.syncer.sync()]
    report["layers"] = loader.last_layers
    report["after_sync1"] = compare()
    report["gen1"] = check_generation(generator, model, rank, seed=1, count=3 + 2 * rank)
    report["asleep_after_generate"] = [engine.asleep, engine.weights_valid,
                                       sum(p.numel() for p in engine.backend.params.values())]
    train_step(model, optimizer, seed=1)
    report["versions"].append(generator.syncer.sync())
    report["after_sync2"] = compare()
    report["gen2"] = check_generation(generator, model, rank, seed=2, count=4)
    # No sync since the last generate (a frozen step): the next generate reloads the discarded weights itself.
    loaded = []
    finish_load = engine.finish_load
    engine.finish_load = lambda: (loaded.append(engine.state_dict()), finish_load())[1]  # what it generated with
    train_step(model, optimizer, seed=2)
    report["gen3"] = check_generation(generator, model, rank, seed=3, count=2)
    report["versions"].append(engine.version)
    report["after_reload"] = mismatches(loaded[-1], full_state(model)) if len(loaded) == 1 else ["no reload"]

    if rank == 1:
        engine.set_fault("generate", "hang")
    report["hang"] = expect_failure(generator, rank, 3)
    engine2 = InProcessEngine(model.config, seed=80 + rank, request_timeout_s=HANG_TIMEOUT_S)
    generator2 = DistributedGenerator(ColocatedEngines(engine2, rank=rank, world_size=2, group=group),
                                      LayerwiseLoader(model, engine2, group=group))
    generator2.sync()
    if rank == 0:
        engine2.set_fault("generate", "exit")
    report["killed"] = expect_failure(generator2, rank, 3)
    return report


def two_nodes(model, optimizer, rank: int, out_dir: Path, group) -> dict:
    """Each rank is its node's local rank 0 (torchrun --nnodes 2 --nproc_per_node 1): it owns one engine, and
    rank 0 relays every bucket of the sync to rank 1's engine through rank 1."""
    from oreal.rollout.errors import EngineSyncError
    from oreal.rollout.relay import RelayedSyncer, RelayServer, RemoteNode, pair_groups

    report: dict = {}
    layout = dedicated_layout(2, 2, int(os.environ["LOCAL_WORLD_SIZE"]))
    report["owners"] = list(layout.owners)
    engine = Recording(build_engine("hf", model.config, seed=50 + rank, num_threads=1, startup_timeout_s=300,
                                    request_timeout_s=HANG_TIMEOUT_S, sync_timeout_s=30,
                                    log_path=str(out_dir / f"node{rank}-engine.log")))
    pairs = pair_groups(list(layout.owner_ranks), torch.device("cpu"), timeout_s=60)
    if rank == 0:
        remotes = [RemoteNode(1, pairs[1], torch.device("cpu"), 30)]
        syncer = RelayedSyncer(WeightSyncer(model, EngineFanOut([engine, *remotes]), bucket_bytes=2048),
                               remotes=remotes)
    else:
        syncer = RelayedSyncer(WeightSyncer(model, None, bucket_bytes=2048),
                               server=RelayServer([engine], pairs[1], torch.device("cpu")), timeout_s=60)
    generator = DistributedGenerator(DedicatedEngines({rank: engine}, layout, rank=rank, world_size=2, group=group),
                                     syncer)

    def compare() -> list:
        return mismatches(engine.state_dict(), full_state(model))

    report["before"] = compare()
    report["versions"] = [generator.syncer.sync()]
    report["after_sync1"] = compare()
    report["gen1"] = check_generation(generator, model, rank, seed=1, count=3 + 2 * rank)
    report["engine_prompts"] = list(engine.prompts)
    train_step(model, optimizer, seed=1)
    report["versions"].append(generator.syncer.sync())
    report["after_sync2"] = compare()
    report["gen2"] = check_generation(generator, model, rank, seed=2, count=4)
    # The remote node's engine dies half-way through a sync: every rank raises, nobody waits for the rest.
    if rank == 1:
        engine.set_fault("sync", "exit", after_buckets=3)
    train_step(model, optimizer, seed=2)
    start = time.perf_counter()
    try:
        generator.syncer.sync()
        report["sync_fault"] = {"error": "", "seconds": time.perf_counter() - start}
    except EngineSyncError as exc:
        report["sync_fault"] = {"error": f"EngineSyncError: {exc}", "seconds": time.perf_counter() - start}
    # And the remote node's engine is refused from then on: the next step fails on both ranks at once.
    report["killed"] = expect_failure(generator, rank, 3)
    generator.close()
    return report


def main() -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    out_dir = Path(os.environ["OUT_DIR"])
    torch.set_num_threads(1)
    group = dist.new_group(backend="gloo")
    report = {"rank": rank}
    scenarios = ("two_nodes",) if os.environ.get("LOCAL_WORLD_SIZE") == "1" else ("dedicated", "colocated")
    for name in scenarios:
        config = tiny_config(vocab_size=101)  # 101 rows: uneven shards (51 + 50) on 2 ranks
        model = tiny_model(config, seed=1234).train()
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        if name == "dedicated":
            report[name] = dedicated(model, optimizer, rank, out_dir, group)
        elif name == "colocated":
            report[name] = colocated(model, optimizer, rank, group)
        else:
            report[name] = two_nodes(model, optimizer, rank, out_dir, group)
    (out_dir / f"rank{rank}.json").write_text(json.dumps(report, indent=1))
    dist.barrier(group=group)
    os._exit(0)  # the hung generate threads (daemons, by design) must not hold the process


if __name__ == "__main__":
    main()
