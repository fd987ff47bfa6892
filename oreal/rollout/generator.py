"""Generation for every trainer rank, whatever the engines' placement.

`DistributedGenerator` is what a recipe's step calls: `generate` (every rank, its own prompts, back in
prompt order), `sync` (every rank, after the optimizer step), `close`. Behind it, one of two placements
(`rollout.placement`):

- `DedicatedEngines`: `rollout.num_engines` engine processes on GPUs of their own, each owned by its
  node's local rank 0 (oreal/rollout/placement.py). Every rank learns every rank's prompts (one small
  all-gather of token ids), all compute the same spread over the engines (by expected tokens, a prompt's
  n samples on one engine), each owner drives its engines concurrently, then scatters every rank the
  samples of its own prompts. Weights reach the engines through `WeightSyncer` (one FSDP2 gather per
  bucket, the bucket broadcast to every engine).
- `ColocatedEngines`: an engine inside every trainer process (oreal/rollout/colocated.py); each engine
  group (`tensor_parallel_size` ranks) samples its own ranks' prompts, sleeps while the policy trains,
  and gets the weights in process, layer by layer (`LayerwiseLoader`).

An engine failure anywhere (process died, hung past `rollout.timeout_s`, refused) reaches every rank as
the same `GenerationError` within that timeout: every collective here is one that every rank enters
whatever happened, and failures travel inside them.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Sequence

import torch.distributed as dist

from oreal.rollout.placement import DedicatedLayout, colocated_groups, spread_prompts

SEED_STRIDE = 1_000_003  # engine e samples with seed + e * stride: engines never share a random stream


class GenerationError(RuntimeError):
    """A rollout engine failed; raised on every rank with the failing engine's explanation."""


def _engine_sampling(sampling, index: int):
    """`sampling` for engine `index`: its own seed, so that engines do not draw the same random numbers."""
    if sampling is None or sampling.seed is None or index == 0:
        return sampling
    return dataclasses.replace(sampling, seed=sampling.seed + index * SEED_STRIDE)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"


class DistributedGenerator:
    """The one generator of a run: `generate`, `sync`, `close` on every rank; see the module docstring."""

    def __init__(self, placement, syncer):
        self.placement = placement
        self.syncer = syncer

    @property
    def engines(self) -> list:
        """The engines this rank drives (owners and colocated ranks; empty elsewhere)."""
        return self.placement.local_engines()

    @property
    def engine(self):
        """This rank's first engine, or None (kept for code written against one engine)."""
        engines = self.engines
        return engines[0] if engines else None

    def generate(self, prompt_ids: Sequence[Sequence[int]], n: int, sampling) -> list[list]:
        """n samples (engine `Rollout`s) for each of this rank's prompts, in prompt order; every rank calls it."""
        local = [list(map(int, p)) for p in prompt_ids]
        return self.placement.generate(local, n, sampling, self.syncer)

    def sync(self) -> float:
        """Push the policy's current weights into every engine (every rank); returns seconds taken."""
        start = time.perf_counter()
        self.syncer.sync()
        return time.perf_counter() - start

    def close(self) -> None:
        self.placement.close()


class DedicatedEngines:
    """Engines in processes of their own; this rank owns `engines` ({engine index: client}, maybe empty)."""

    def __init__(self, engines: dict, layout: DedicatedLayout, *, rank: int, world_size: int, group=None):
        self.engines = dict(engines)
        self.layout = layout
        self.rank, self.world_size = rank, world_size
        self.group = group  # gloo group for Python objects; its timeout must exceed rollout.timeout_s

    def local_engines(self) -> list:
        return [self.engines[e] for e in sorted(self.engines)]

    def generate(self, local: list[list[int]], n: int, sampling, syncer=None) -> list[list]:
        if self.world_size == 1:
            per_rank = [local]
        else:
            per_rank = [None] * self.world_size
            dist.all_gather_object(per_rank, local, group=self.group)
        flat = [(r, i) for r, prompts in enumerate(per_rank) for i in range(len(prompts))]
        lengths = [len(per_rank[r][i]) for r, i in flat]
        max_new = sampling.max_new_tokens if sampling is not None else 0
        engine_of = spread_prompts(lengths, n, self.layout.num_engines, max_new)

        # Every owner runs its engines at once; a failure becomes a message for every rank.
        answers: dict[tuple[int, int], list] = {}
        failure = None
        if self.engines:
            answers, failure = self._run_engines(per_rank, flat, engine_of, n, sampling)

        mine: dict[int, list] = {}
        errors: list[str] = []
        for owner in self.layout.owner_ranks:
            outputs = None
            if self.rank == owner:
                if failure is not None:
                    outputs = [("error", failure)] * self.world_size
                else:
                    outputs = [{i: samples for (r, i), samples in answers.items() if r == dest}
                               for dest in range(self.world_size)]
            if self.world_size == 1:
                received = outputs[0]
            else:
                box = [None]
                dist.scatter_object_list(box, outputs, src=owner, group=self.group)
                received = box[0]
            if isinstance(received, tuple) and received and received[0] == "error":
                errors.append(received[1])
            else:
                mine.update(received)
        if errors:
            raise GenerationError("; ".join(errors))
        if sorted(mine) != list(range(len(local))):
            raise GenerationError(f"trainer rank {self.rank} got samples for prompts {sorted(mine)} of "
                                  f"{len(local)}: the engines' answers were lost")
        out = []
        for i in range(len(local)):
            for r in mine[i]:
                r.prompt_index = i  # this rank's prompt order, whichever engine answered
            out.append(mine[i])
        return out

    def _run_engines(self, per_rank, flat, engine_of, n, sampling):
        jobs = {e: [k for k, owner in enumerate(engine_of) if owner == e] for e in self.engines}
        results: dict[int, object] = {}

        def run(e: int) -> None:
            prompts = [per_rank[flat[k][0]][flat[k][1]] for k in jobs[e]]
            try:
                rollouts = self.engines[e].generate(prompts, n=n, sampling=_engine_sampling(sampling, e)) \
                    if prompts else []
                if len(rollouts) != len(prompts) * n:
                    raise GenerationError(f"returned {len(rollouts)} samples for {len(prompts)} prompts x {n}")
                results[e] = rollouts
            except BaseException as exc:  # noqa: BLE001 - every rank must hear about it
                results[e] = exc

        threads = [threading.Thread(target=run, args=(e,), name=f"oreal-engine-{e}", daemon=True)
                   for e in sorted(jobs)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()  # each engine client bounds its own wait (request_timeout_s)
        answers: dict[tuple[int, int], list] = {}
        problems = []
        for e in sorted(jobs):
            got = results.get(e)
            if isinstance(got, BaseException) or got is None:
                engine = self.engines[e]
                pid = getattr(engine, "pid", "?")
                problems.append(f"rollout engine {e} of {self.layout.num_engines} (pid {pid}, owned by trainer rank "
                                f"{self.rank}) failed: {_describe(got) if got is not None else 'no answer'}")
                continue
            for j, k in enumerate(jobs[e]):
                answers[flat[k]] = got[j * n:(j + 1) * n]
        return answers, ("; ".join(problems) if problems else None)

    def close(self) -> None:
        for engine in self.engines.values():
            engine.close()
        self.engines = {}


class ColocatedEngines:
    """An engine in every trainer process; ranks [g*tp, (g+1)*tp) form engine g (the same prompts on each)."""

    def __init__(self, engine, *, rank: int, world_size: int, tensor_parallel_size: int = 1, sleep_level: int = 2,
                 group=None):
        self.engine = engine
        self.rank, self.world_size = rank, world_size
        self.sleep_level = sleep_level
        self.group = group
        self.groups = colocated_groups(world_size, tensor_parallel_size)
        self.index = rank // tensor_parallel_size  # this rank's engine
        self.tp_group = None
        if tensor_parallel_size > 1:  # every rank creates every subgroup (new_group is collective)
            for ranks in self.groups:
                sub = dist.new_group(ranks, backend="gloo")
                if rank in ranks:
                    self.tp_group = sub

    def local_engines(self) -> list:
        return [self.engine] if self.engine is not None else []

    def generate(self, local: list[list[int]], n: int, sampling, syncer=None) -> list[list]:
        failure = None
        try:
            self._wake(syncer)
        except BaseException as exc:  # noqa: BLE001
            failure = f"rollout engine {self.index} (colocated, trainer rank {self.rank}) could not wake: {_describe(exc)}"
        members = self.groups[self.index]
        share = [local]
        if self.tp_group is not None:  # a tensor-parallel engine samples its ranks' prompts together
            share = [None] * len(members)
            dist.all_gather_object(share, local, group=self.tp_group)
        prompts = [p for part in share for p in part]
        samples: list = []
        if failure is None:
            try:
                rollouts = self.engine.generate(prompts, n=n, sampling=_engine_sampling(sampling, self.index)) \
                    if prompts else []
                if len(rollouts) != len(prompts) * n:
                    raise GenerationError(f"returned {len(rollouts)} samples for {len(prompts)} prompts x {n}")
                first = sum(len(part) for part in share[:members.index(self.rank)])
                samples = [rollouts[(first + i) * n:(first + i + 1) * n] for i in range(len(local))]
                for i, group in enumerate(samples):
                    for r in group:
                        r.prompt_index = i
            except BaseException as exc:  # noqa: BLE001
                failure = (f"rollout engine {self.index} (colocated, trainer rank {self.rank}) failed: "
                           f"{_describe(exc)}")
        errors = [failure] if failure else []
        if self.world_size > 1:
            everyone = [None] * self.world_size
            dist.all_gather_object(everyone, failure, group=self.group)
            errors = list(dict.fromkeys(e for e in everyone if e))
        if errors:
            raise GenerationError("; ".join(errors))
        self.engine.sleep(self.sleep_level)  # the policy trains next: give the memory back
        return samples

    def _wake(self, syncer) -> None:
        """Before generating: wake the engine, reloading the weights if sleep discarded them (collective)."""
        if not self.engine.asleep:
            return
        if self.engine.weights_valid:
            self.engine.wake_up()
        else:
            syncer.sync()  # every rank is here: they all slept at the same level after the same generate

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
            self.engine = None
