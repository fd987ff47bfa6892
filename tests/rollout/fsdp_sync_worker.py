"""torchrun worker for test_weight_sync_fsdp.py: 2 FSDP2 trainer ranks on gloo + the engine process.

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
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rollout_testlib import greedy_reference, tiny_config, tiny_model  # noqa: E402

from oreal.rollout import EngineBrokenError, EngineSyncError, SamplingParams, WeightSyncer, build_engine  # noqa: E402


def train_step(model, optimizer, seed: int) -> float:
    g = torch.Generator().manual_seed(seed + dist.get_rank())
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=g)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return float(loss.detach())


def compare_engine(engine, model) -> dict:
    """Collective: the trainer's full state dict vs the engine's parameters (rank 0 compares)."""
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() != 0:
        return {}
    state = engine.state_dict()
    return {
        "names_equal": sorted(state) == sorted(full),
        "bit_equal": {n: bool(torch.equal(state[n], full[n])) for n in state if n in full},
        "max_abs_diff": max(float((state[n] - full[n]).abs().max()) for n in state if n in full),
    }


def main() -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    out_dir = Path(os.environ["OUT_DIR"])
    torch.set_num_threads(1)
    config = tiny_config(vocab_size=101)  # 101 rows: uneven shards (51 + 50) on 2 ranks
    model = tiny_model(config, seed=1234).train()
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)

    engine = None
    if rank == 0:
        engine = build_engine("hf", config, seed=99, num_threads=1, startup_timeout_s=300,
                              request_timeout_s=120, sync_timeout_s=60, log_path=str(out_dir / "engine.log"))
    # Small buckets: many buckets, and the embedding (101x32 fp32 = 12.9 KB) split across them.
    syncer = WeightSyncer(model, engine, bucket_bytes=4096)
    report: dict = {"rank": rank, "modes": sorted({s.mode for s in syncer.sources})}

    report["before"] = compare_engine(engine, model)  # engine starts from other random weights
    report["loss0"] = train_step(model, optimizer, seed=1)
    t0 = time.perf_counter()
    report["version1"] = syncer.sync()
    report["sync_seconds"] = time.perf_counter() - t0
    report["buckets"] = len(syncer.last_plan.buckets)
    report["split"] = sorted({p.name for b in syncer.last_plan.buckets for p in b.pieces if not p.whole})
    report["after1"] = compare_engine(engine, model)
    report["gather"] = syncer.gather
    if rank == 0:
        report["receive"] = engine.ping()["last_receive"]

    prompts = [[3, 14, 15, 92, 65], [35, 89, 79, 32, 38], [46, 26, 43, 38, 32, 79, 50]]
    model.eval()
    ref_tokens, ref_logprobs = greedy_reference(model, prompts, max_new_tokens=8)  # all ranks (FSDP)
    if rank == 0:
        out = engine.generate(prompts, n=2, sampling=SamplingParams(temperature=0, max_new_tokens=8))
        report["greedy_engine"] = [r.token_ids for r in out if r.sample_index == 0]
        report["greedy_trainer"] = ref_tokens
        report["greedy_logprob_diff"] = max(
            abs(a - b) for r in out for a, b in zip(r.logprobs, ref_logprobs[r.prompt_index]))
        report["versions_seen"] = sorted({r.weights_version for r in out})
    model.train()

    # Second step, synced the other way: point-to-point gather, another bucket size (so the
    # engine re-lays its parameters out for the new bucket layout).
    report["loss1"] = train_step(model, optimizer, seed=2)
    p2p = WeightSyncer(model, engine, bucket_bytes=3000, gather="p2p")
    report["version2"] = p2p.sync()
    report["gather2"] = p2p.gather
    report["after2"] = compare_engine(engine, model)

    # A failure mid-sync reaches every rank as the same error, and the engine is then refused.
    if rank == 0:
        engine.set_fault("sync", "exit", after_buckets=3)
    train_step(model, optimizer, seed=3)
    try:
        syncer.sync()
        report["fault"] = "no error"
    except EngineSyncError as e:
        report["fault"] = f"EngineSyncError: {e}"
    if rank == 0:
        try:
            engine.generate(prompts, n=1)
            report["after_fault_generate"] = "generated"
        except EngineBrokenError as e:
            report["after_fault_generate"] = f"EngineBrokenError: {e}"
        engine.close()

    (out_dir / f"rank{rank}.json").write_text(json.dumps(report, indent=1))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
