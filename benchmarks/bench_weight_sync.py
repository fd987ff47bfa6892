"""Weight-sync benchmark: FSDP2 trainer ranks -> rollout engine process, on CPU over gloo.

    python -m benchmarks.bench_weight_sync --json OUT.json     # one run, JSON rows
    python -m benchmarks.bench_weight_sync --save              # also benchmarks/results/weight_sync.{json,md}

Starts `torchrun --nproc_per_node 2` (gloo, FSDP2 `fully_shard` per decoder layer and at the
root) and, from trainer rank 0, a transformers engine process. The model is laid out like
Qwen2.5-7B (28 layers, q/k/v with bias, o, gate/up/down, two norms per layer, untied
embedding and lm_head: 339 tensors) with the widths scaled down to about 100M parameters,
in bf16 on both sides. Methods, interleaved repeat by repeat so they share the machine's load:

- `ours`: WeightSyncer.sync(): shards gathered on rank 0 straight into one of two flat
  buffers of `--bucket-mib`, broadcast while the next bucket is gathered, copied in place
  into the engine's parameters by name.
- `per_tensor_rpc`: the pattern TRL and OpenRLHF use: per parameter, `full_tensor()` on all
  ranks, one engine request, one broadcast, wait for the engine's acknowledgement.
- `floor`: the same bytes broadcast from rank 0 to the engine process as plainly as
  possible (pre-allocated buffers both sides, no gathering, no engine work): one flat
  buffer or one message per tensor, whichever is faster on the machine.
- `ours_p2p` (reference row): `ours` with `gather="p2p"`, the shards sent to rank 0 over the
  trainer's gloo group as they would be between GPUs, instead of through shared memory.

`ours` keeps its two bucket buffers between syncs; its memory column is the peak of the cold
first sync, which allocates them (and of every later one).

Rows: method, seconds (median over repeats), gbps (payload / seconds), tensors, bytes,
peak_extra_mib (trainer rank 0's peak resident memory during the call above what it held
just before; Linux VmHWM after resetting it through /proc/self/clear_refs), plus ratios,
shape, dtype, versions and machine. `ratio_vs_floor` is the median over rounds of the
method's time over the floor's time in the same round (paired, because the load of a
shared machine drifts between rounds); `ratio_of_medians` is given too.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
REPO = Path(__file__).resolve().parent.parent

# Qwen2.5-7B: hidden 3584, intermediate 18944, 28 layers, 28 heads / 4 KV heads (head_dim 128),
# vocab 152064, qkv bias, untied lm_head. Same layout, widths scaled to ~100M parameters.
MODEL = dict(hidden_size=384, intermediate_size=2048, num_hidden_layers=28, num_attention_heads=12,
             num_key_value_heads=2, vocab_size=32768, tie_word_embeddings=False, max_position_embeddings=4096)


# ----- memory probe (trainer rank 0) ------------------------------------------------------------
def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


class PeakMemory:
    """Peak RSS growth during a block (VmHWM reset via clear_refs; Linux only)."""

    def __enter__(self):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        self.base = _status_kib("VmRSS")
        return self

    def __exit__(self, *exc):
        self.extra_mib = max(_status_kib("VmHWM") - self.base, 0) / 1024


# ----- the torchrun worker ------------------------------------------------------------------------
def worker(args) -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from oreal.rollout import TensorSpec, WeightSyncer, build_engine
    from oreal.rollout.types import dtype_name

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.set_num_threads(1)
    config = Qwen2Config(**MODEL)
    with torch.device("meta"):
        model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    model.to_empty(device="cpu")  # only this rank's shards are ever allocated
    gen = torch.Generator().manual_seed(rank)
    with torch.no_grad():
        for p in model.parameters():
            local = p.to_local()
            local.copy_(torch.randn(local.shape, generator=gen) * 0.02)

    engine = None
    if rank == 0:
        engine = build_engine("hf", config, dtype="bfloat16", num_threads=1, startup_timeout_s=900,
                              sync_timeout_s=600)
    bucket_bytes = int(args.bucket_mib * (1 << 20))
    syncer = WeightSyncer(model, engine, bucket_bytes=bucket_bytes)
    wire = {s.name: TensorSpec(s.name, s.shape, dtype_name(s.dtype)) for s in syncer.sources}
    sizes = [w.nbytes for w in wire.values()]
    total = sum(sizes)

    def ours():
        syncer.sync()

    def per_tensor_rpc():
        for src in syncer.sources:
            full = src.param.full_tensor()
            if rank == 0:
                rid = engine.begin_two_phase("receive_tensor", spec=wire[src.name])
                transport.broadcast(full.contiguous()).wait(engine.sync_timeout_s)
                engine.end_two_phase(rid, "receive_tensor")
            del full

    flat = per = None
    if rank == 0:
        flat = torch.ones(total, dtype=torch.uint8)
        per = [torch.ones(s, dtype=torch.uint8) for s in sizes]

    def floor(buffers):
        def run():
            if rank != 0:
                return
            rid = engine.begin_two_phase("receive_raw")
            handles = [transport.broadcast(b) for b in buffers]
            for h in handles:
                h.wait(engine.sync_timeout_s)
            engine.end_two_phase(rid, "receive_raw")
        return run

    transport = engine.open_transport() if rank == 0 else None
    # Cold sync: allocates the two bucket buffers (kept for later syncs) and moves the engine's
    # parameters into the bucket layout; its peak is the sync's real memory cost on rank 0.
    dist.barrier()
    with PeakMemory() as cold:
        t0 = time.perf_counter()
        syncer.sync()
        cold_seconds = time.perf_counter() - t0
    # The same path with point-to-point gathering (what GPUs or several hosts use), for reference.
    p2p = WeightSyncer(model, engine, bucket_bytes=bucket_bytes, gather="p2p")
    dist.barrier()
    with PeakMemory() as cold_p2p:
        p2p.sync()

    methods = {"ours": ours, "ours_p2p": p2p.sync, "per_tensor_rpc": per_tensor_rpc, "floor_flat": floor([flat]),
               "floor_per_tensor": floor(per)}
    times: dict[str, list[float]] = {m: [] for m in methods}
    peaks: dict[str, list[float]] = {m: [] for m in methods}
    for round_index in range(args.repeats):
        for name, fn in methods.items():
            if name == "per_tensor_rpc" and round_index >= args.slow_repeats:
                continue  # 50x slower than the rest: a few samples are enough
            if rank == 0 and name.startswith("floor"):
                engine._call("prepare_raw", sizes=[total] if name == "floor_flat" else sizes)
            gc.collect()  # no method pays for garbage another one left behind
            dist.barrier()
            with PeakMemory() as mem:
                t0 = time.perf_counter()
                fn()
                seconds = time.perf_counter() - t0
            dist.barrier()
            times[name].append(seconds)
            peaks[name].append(mem.extra_mib)

    if rank == 0:
        plan = syncer.last_plan
        result = {"times": times, "peaks": peaks, "tensors": len(sizes), "bytes": total,
                  "cold_seconds": cold_seconds, "cold_peak_mib": cold.extra_mib, "gather": syncer.gather,
                  "cold_p2p_peak_mib": cold_p2p.extra_mib,
                  "receive": engine.ping()["last_receive"],
                  "params": sum(w.numel for w in wire.values()), "buckets": len(plan.buckets),
                  "bucket_bytes": bucket_bytes, "engine_versions": engine.info.versions}
        Path(args.raw).write_text(json.dumps(result))
        engine.close()
    dist.barrier()
    dist.destroy_process_group()


# ----- the launcher -------------------------------------------------------------------------------
def summarise(raw: dict, args) -> list[dict]:
    import torch

    import oreal

    env = {"python": platform.python_version(), "torch": torch.__version__,
           "transformers": raw["engine_versions"].get("transformers"), "oreal": oreal.__version__,
           "machine": platform.machine(), "cpu_count": os.cpu_count(), "platform": platform.platform()}
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    shape = (f"qwen2.5-7b layout scaled: {MODEL['num_hidden_layers']} layers, hidden {MODEL['hidden_size']}, "
             f"ffn {MODEL['intermediate_size']}, vocab {MODEL['vocab_size']}, {raw['params'] / 1e6:.1f}M params")

    def stats(name):
        return statistics.median(raw["times"][name]), min(raw["times"][name]), max(raw["peaks"][name])

    floor_variant = min(("floor_flat", "floor_per_tensor"), key=lambda m: stats(m)[0])
    rows = []
    ours_note = (f"{raw['buckets']} buckets of <= {args.bucket_mib:g} MiB, gather={raw['gather']}, "
                 f"engine receive={raw['receive']}; peak from the cold sync that allocates the buffers")
    for method, key, note in [("ours", "ours", ours_note),
                              ("per_tensor_rpc", "per_tensor_rpc", "full_tensor() + 1 request + 1 broadcast per tensor"),
                              ("floor", floor_variant, f"{floor_variant.removeprefix('floor_')} broadcast, "
                                                       "buffers pre-allocated"),
                              ("ours_p2p", "ours_p2p", "for reference: ours with gather=p2p (shards to rank 0 "
                                                       "over gloo point-to-point, as on GPUs)")]:
        median, best, peak = stats(key)
        if method == "ours":
            peak = max(peak, raw["cold_peak_mib"])
        if method == "ours_p2p":
            peak = max(peak, raw["cold_p2p_peak_mib"])
        rows.append({"method": method, "seconds": round(median, 4), "gbps": round(raw["bytes"] / median / 1e9, 3),
                     "tensors": raw["tensors"], "bytes": raw["bytes"], "peak_extra_mib": round(peak, 1),
                     "min_seconds": round(best, 4), "repeats": len(raw["times"][key]), "note": note,
                     "bucket_mib": args.bucket_mib, "dtype": "bfloat16", "shape": shape,
                     "trainer": "torchrun 2 ranks, FSDP2, gloo", "engine": "transformers process, gloo",
                     "load_avg_1m": round(load, 2) if load is not None else None, **env})
    rows[0]["cold_seconds"] = round(raw["cold_seconds"], 4)
    floor_s = rows[2]["seconds"]
    floor_times = raw["times"][floor_variant]
    for row, key in zip(rows, ("ours", "per_tensor_rpc", floor_variant, "ours_p2p")):
        # Paired: each round's time over the floor's in the same round (the load on a shared
        # machine drifts between rounds much more than within one), median over rounds.
        row["ratio_vs_floor"] = round(statistics.median(t / f for t, f in zip(raw["times"][key], floor_times)), 3)
        row["ratio_of_medians"] = round(row["seconds"] / floor_s, 3)
    variants = {m: round(stats(m)[0], 4) for m in ("floor_flat", "floor_per_tensor")}
    rows[2]["floor_variants_seconds"] = variants
    return rows


def markdown(rows: list[dict]) -> str:
    r0 = rows[0]
    bound = 2 * r0["bucket_mib"] * 1.1
    lines = [
        "# Weight-sync benchmark (`python -m benchmarks.bench_weight_sync`)",
        "",
        f"Model: {r0['shape']}; {r0['tensors']} tensors, {r0['bytes'] / 2**20:.1f} MiB in {r0['dtype']}.",
        f"Trainer: {r0['trainer']}; engine: {r0['engine']}. Medians over interleaved repeats (column `repeats`).",
        f"Environment: python {r0['python']}, torch {r0['torch']}, transformers {r0['transformers']}, "
        f"oreal {r0['oreal']}, {r0['machine']}, cpu_count {r0['cpu_count']}, {r0['platform']}, "
        f"1-min load average at the end {r0['load_avg_1m']} (a shared machine).",
        "",
        "| method | seconds | min seconds | repeats | GB/s | vs floor (paired) | vs floor (medians) "
        "| peak extra MiB (rank 0) | tensors | bytes | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['method']} | {r['seconds']:.4f} | {r['min_seconds']:.4f} | {r['repeats']} | {r['gbps']:.3f} | "
                     f"{r['ratio_vs_floor']:.2f}x | {r['ratio_of_medians']:.2f}x | {r['peak_extra_mib']:.1f} | "
                     f"{r['tensors']} | {r['bytes']} | "
                     f"{r['note']} |")
    ours, rpc, floor = rows[:3]
    lines += [
        "",
        f"- `ours` / `floor` = {ours['ratio_vs_floor']:.2f} paired, {ours['ratio_of_medians']:.2f} as a ratio of "
        f"medians (target <= 1.5); "
        f"`per_tensor_rpc` / `ours` = {rpc['seconds'] / ours['seconds']:.2f} (target > 1).",
        f"- Rank 0's extra memory during `ours`: {ours['peak_extra_mib']:.1f} MiB, bound 2 x {ours['bucket_mib']:g} MiB "
        f"+ 10% = {bound:.1f} MiB; the full model is {ours['bytes'] / 2**20:.1f} MiB.",
        f"- Floor variants (seconds): {floor['floor_variants_seconds']}. First (cold) `ours` sync: "
        f"{ours['cold_seconds']:.3f} s (allocates the buffers, lays the engine's parameters out like the buckets).",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write the result rows here")
    parser.add_argument("--save", action="store_true", help="also write benchmarks/results/weight_sync.{json,md}")
    parser.add_argument("--bucket-mib", type=float, default=64.0)
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--slow-repeats", type=int, default=2, help="repeats of per_tensor_rpc (it is slow)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds before the run is killed")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--raw", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return 0

    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        raw_path = Path(tmp) / "raw.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(port), "-m", "benchmarks.bench_weight_sync", "--worker", "--raw", str(raw_path),
               "--bucket-mib", str(args.bucket_mib), "--repeats", str(args.repeats),
               "--slow-repeats", str(args.slow_repeats)]
        env = dict(os.environ, OMP_NUM_THREADS="1",
                   PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p))
        proc = subprocess.run(cmd, cwd=REPO, env=env, timeout=args.timeout)
        if proc.returncode != 0:
            print(f"benchmark workers failed with exit code {proc.returncode}", file=sys.stderr)
            return proc.returncode
        raw = json.loads(raw_path.read_text())
    rows = summarise(raw, args)
    text = json.dumps(rows, indent=1)
    md = markdown(rows)
    print(md)
    if args.json:
        Path(args.json).write_text(text + "\n")
    if args.save:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "weight_sync.json").write_text(text + "\n")
        (RESULTS / "weight_sync.md").write_text(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
