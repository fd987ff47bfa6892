"""Rollout benchmark: dedicated engines (1, 2, 4) vs colocated, the engine's samplers, and a paper model of the GPU case.

    python -m benchmarks.bench_rollout --json OUT.json     # all four parts, JSON rows
    python -m benchmarks.bench_rollout --save              # also benchmarks/results/rollout.{json,md}
    python -m benchmarks.bench_rollout --only model        # the paper model alone (instant)
    python -m benchmarks.bench_rollout --only decode --save  # the engine's two samplers (~1 minute)

Four parts, each a list of rows:

- `steps` (measured): `torchrun --nproc_per_node 2 -m oreal.train --config configs/tiny_cpu.py` with a
  larger tiny model and longer responses (`STEP_OPTIONS`), in each placement: dedicated with 1, 2 and 4
  transformers engines (one thread each), and colocated (an engine inside each of the 2 ranks). Rows: the
  median over steps 2.. of time/rollout, time/sync, time/train and time/step (step 1 warms up).
- `transport` (measured): the choice behind `EngineFanOut` (oreal/rollout/fanout.py). A root process
  broadcasts `--transport-mib` MiB in 8 buckets to E receiver processes over gloo, either through one
  two-party group per receiver with the E broadcasts of a bucket in flight together ("per_engine"), or
  through one group of 1 + E ranks ("one_group"). Rows: seconds (median of 3), GB/s of payload.
- `decode` (measured): the transformers engine's two samplers on the demo's model shape (Qwen2, vocab 512,
  hidden 128, 4 layers, 4/2 heads, intermediate 256, random weights, fp32) and the demo's step (16 prompts
  of 45 tokens x 8 samples x 48 new tokens at temperature 1, no stop token, so every row runs to the end):
  `HFBackend(decoder="oreal")` (oreal/rollout/decode.py) against `decoder="transformers"`
  (`model.generate`), alternating in one process. Rows: seconds (median of `--decode-repeats`), tokens/s.
- `model` (computed, no measurement): the expected rollout time of one OREAL-7B step on the paper's
  cluster (4 nodes x 8 H100) in each placement, from a decode roofline calibrated on vLLM's published
  throughput; every assumption is printed with the result and stored in the rows.

The machine is the project's 2-core CPU box, shared with other work: 4 engines on 2 cores measure
oversubscription, not scaling; the rows say so through `cpu_count` and the load average.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
REPO = Path(__file__).resolve().parent.parent

# A tiny model that generates for a measurable share of the step: 4 layers of width 128, 48-token
# responses, 16 prompts x 8 samples per step.
STEP_OPTIONS = ("--model.tiny.hidden_size", "128", "--model.tiny.num_layers", "4", "--model.tiny.intermediate_size",
                "256", "--rollout.max_new_tokens", "48", "--rollout.max_total_tokens", "112",
                "--train.micro_batch_tokens", "448", "--data.prompts_per_step", "16", "--data.samples_per_prompt", "8",
                "--eval.interval", "0", "--checkpoint.interval", "0", "--checkpoint.export_hf", "false",
                "--train.freeze_policy_steps", "0")
PLACEMENTS = [("dedicated", 1), ("dedicated", 2), ("dedicated", 4), ("colocated", 2)]


def _environment() -> dict:
    import torch
    import transformers

    import oreal

    return {"torch": torch.__version__, "transformers": transformers.__version__, "oreal": oreal.__version__,
            "machine": platform.machine(), "cpu_count": os.cpu_count(), "platform": platform.platform(),
            "load_avg_1m": round(os.getloadavg()[0], 2),
            "measured_at": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ----- part 1: measured step split -------------------------------------------------------------------
def run_steps(steps: int, out_root: Path) -> list[dict]:
    rows = []
    for placement, engines in PLACEMENTS:
        out = out_root / f"{placement}_{engines}"
        option = ("--rollout.num_engines", str(engines)) if placement == "dedicated" else \
            ("--rollout.placement", "colocated")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(_free_port()), "-m", "oreal.train", "--config", str(REPO / "configs" / "tiny_cpu.py"),
               "--output-dir", str(out), "--steps", str(steps), "--log.progress_bar", "false",
               "--log.tensorboard", "false", *STEP_OPTIONS, *option]
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1200,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        if proc.returncode != 0:
            raise RuntimeError(f"{placement} x{engines} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
        records = [json.loads(line) for line in open(out / "metrics.jsonl") if line.strip()][1:]
        row = {"part": "steps", "placement": placement, "engines": engines, "steps_timed": len(records),
               "wall_s": round(time.perf_counter() - start, 1)}
        for phase in ("rollout", "sync", "train", "step"):
            row[f"{phase}_s"] = round(statistics.median(r[f"time/{phase}"] for r in records), 4)
        row["rollout_share"] = round(row["rollout_s"] / row["step_s"], 3)
        row["generated_tokens_per_s"] = round(statistics.median(r["throughput/rollout_tokens_per_s"]
                                                                for r in records), 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
    base = next(r for r in rows if r["placement"] == "dedicated" and r["engines"] == 1)
    for r in rows:
        r["rollout_vs_1_engine"] = round(r["rollout_s"] / base["rollout_s"], 3)
        r["step_vs_1_engine"] = round(r["step_s"] / base["step_s"], 3)
    return rows


# ----- part 2: measured transport choice -------------------------------------------------------------
def _group(host: str, port: int, rank: int, world: int, prefix: str):
    import torch.distributed as dist

    store = dist.TCPStore(host, port, world, rank == 0 and prefix == "", timeout=datetime.timedelta(seconds=120))
    opts = dist.ProcessGroupGloo._Options()
    opts._devices = [dist.ProcessGroupGloo.create_device(hostname=host)]
    opts._timeout = datetime.timedelta(seconds=120)
    return dist.ProcessGroupGloo(dist.PrefixStore(prefix or "g", store), rank, world, opts), store


def transport_receiver(argv: list[str]) -> None:
    """A receiver process: joins its group(s) and receives every bucket of every repeat."""
    import torch

    torch.set_num_threads(1)
    host, port, mode, index, engines, nbytes, buckets, repeats = argv
    index, engines, nbytes, buckets, repeats = int(index), int(engines), int(nbytes), int(buckets), int(repeats)
    if mode == "per_engine":
        pg, _ = _group(host, int(port), 1, 2, f"e{index}")
    else:
        pg, _ = _group(host, int(port), 1 + index, 1 + engines, "all")
    buf = torch.empty(nbytes, dtype=torch.uint8)
    for _ in range(repeats * buckets):
        pg.broadcast(buf, 0).wait()


DECODE_SHAPE = {"prompts": 16, "prompt_tokens": 45, "samples": 8, "new_tokens": 48}


def run_decode(repeats: int = 5, threads: int = 0) -> list[dict]:
    """Both samplers of the transformers engine on the same weights and prompts, alternating (see the docstring),
    with `threads` torch threads (0: every usable core; the row records the load average beside it)."""
    import torch

    from oreal.model.tiny import tiny_qwen2_config
    from oreal.rollout.hf import HFBackend
    from oreal.rollout.types import SamplingParams
    from oreal.runtime.budget import usable_cpus

    config = tiny_qwen2_config(512, hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2,
                               intermediate_size=256).to_dict()
    threads = threads or usable_cpus()
    backends = {name: HFBackend(model=config, seed=0, num_threads=threads, decoder=name)
                for name in ("oreal", "transformers")}
    shape = DECODE_SHAPE
    rng = random.Random(0)
    prompts = [[rng.randrange(1, 512) for _ in range(shape["prompt_tokens"])] for _ in range(shape["prompts"])]
    sampling = SamplingParams(temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=shape["new_tokens"], seed=0)
    times: dict[str, list[float]] = {name: [] for name in backends}
    for _ in range(repeats + 1):  # the first round warms up
        for name, backend in backends.items():
            start = time.perf_counter()
            rollouts = backend.generate(prompts, shape["samples"], sampling)
            times[name].append(time.perf_counter() - start)
            tokens = sum(len(r.token_ids) for r in rollouts)
    rows = []
    for name in backends:
        seconds = statistics.median(times[name][1:])
        rows.append({"part": "decode", "decoder": name, "seconds": round(seconds, 3),
                     "tokens_per_s": round(tokens / seconds), "new_tokens": tokens, "threads": threads,
                     "repeats": repeats, **shape, "torch_threads_after": torch.get_num_threads()})
    base = rows[1]["seconds"]
    for row in rows:
        row["vs_transformers"] = round(row["seconds"] / base, 2)
        print(f"  decode[{row['decoder']}]: {row['seconds']} s ({row['tokens_per_s']:,} tok/s, "
              f"{row['vs_transformers']}x model.generate)")
    return rows


def run_transport(total_mib: int, repeats: int = 5) -> list[dict]:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    buckets = 8
    nbytes = (total_mib << 20) // buckets
    rows = []
    for engines in (1, 2, 4):
        for mode in ("per_engine", "one_group"):
            port = _free_port()
            server = dist.TCPStore("127.0.0.1", port, None, True, timeout=datetime.timedelta(seconds=120),
                                   wait_for_workers=False)
            procs = [subprocess.Popen([sys.executable, "-m", "benchmarks.bench_rollout", "--receiver", "127.0.0.1",
                                       str(port), mode, str(i), str(engines), str(nbytes), str(buckets), str(repeats)],
                                      cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})
                     for i in range(engines)]
            opts = dist.ProcessGroupGloo._Options()
            opts._devices = [dist.ProcessGroupGloo.create_device(hostname="127.0.0.1")]
            opts._timeout = datetime.timedelta(seconds=120)
            if mode == "per_engine":
                groups = [dist.ProcessGroupGloo(dist.PrefixStore(f"e{i}", server), 0, 2, opts) for i in range(engines)]
            else:
                groups = [dist.ProcessGroupGloo(dist.PrefixStore("all", server), 0, 1 + engines, opts)]
            data = [torch.randint(0, 255, (nbytes,), dtype=torch.uint8) for _ in range(2)]
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                pending = []
                for b in range(buckets):
                    works = [g.broadcast(data[b % 2], 0) for g in groups]  # all receivers at once
                    pending.append(works)
                    if len(pending) > 1:  # two buckets in flight, as the syncer keeps them
                        for w in pending.pop(0):
                            w.wait()
                for works in pending:
                    for w in works:
                        w.wait()
                times.append(time.perf_counter() - start)
            for p in procs:
                p.wait(timeout=120)
            seconds = statistics.median(times)
            row = {"part": "transport", "mode": mode, "engines": engines, "payload_mib": total_mib,
                   "buckets": buckets, "repeats": repeats, "seconds": round(seconds, 4),
                   "gbps_per_engine": round(total_mib * (1 << 20) / seconds / 1e9, 3)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    for r in rows:
        other = next(o for o in rows if o["engines"] == r["engines"] and o["mode"] == "per_engine")
        r["vs_per_engine"] = round(r["seconds"] / other["seconds"], 3)
    return rows


# ----- part 3: the paper model -------------------------------------------------------------------------
# Every number the model uses, with where it comes from. Printed with the result and stored in the rows.
ASSUMPTIONS = {
    "cluster": "OREAL-7B's: 4 nodes x 8 H100-80GB SXM (32 GPUs)",
    "prompts_per_step": 64, "samples_per_prompt": 16, "max_new_tokens": 14000, "prompt_tokens": 600,
    "response_tokens": "lognormal, median 3000, sigma 0.8, cut at max_new_tokens (an assumption: long-CoT "
                       "math responses have a heavy tail; OREAL does not publish its length distribution)",
    "model": "Qwen2.5-7B: 15.2 GB of bf16 weights; KV cache 28 layers x 4 KV heads x 128 x 2 (K, V) x 2 B = "
             "57,344 B per token",
    "hbm_bandwidth_gbps": 3350, "hbm_source": "NVIDIA H100 SXM datasheet (3.35 TB/s)",
    "decode_roofline": "one decode step of an engine reads its weights once and every running sequence's KV "
                       "cache: t = (weights / tp + sum(context) x kv_bytes / tp) / (bandwidth x efficiency) "
                       "+ tp_allreduce_ms x (tp > 1)",
    "efficiency": "0.72, calibrated so that the roofline gives the ~12,500 output tokens/s published for vLLM "
                  "serving Llama-3.1-8B bf16 on one H100 (third-party benchmarks collected at "
                  "morphllm.com/vllm-benchmarks), taken as 256 running sequences of ~1k tokens, 131,072 KV "
                  "bytes per token and 16 GB of weights (our reading of that workload, an assumption)",
    "compute_bound": "a step also needs 2 x 7.6e9 FLOPs per running sequence plus attention, 4 x 28 layers x "
                     "3,584 x context FLOPs; H100 bf16 dense 989 TFLOP/s (datasheet) at 50% utilisation "
                     "(assumption): the step takes the longer of memory and compute time",
    "max_num_seqs": "1024 (vLLM's default for the LLM class on H100-class GPUs)",
    "tp_allreduce_ms": 0.05,
    "kv_budget": "0.85 x 80 GB - weights - 6 GB activations/graphs per GPU (dedicated); colocated the same while "
                 "the trainer's sharded states stay resident: (4 + 4 + 8 B) x 7.6e9 / 32 GPUs = 3.8 GB more",
    "scheduling": "continuous batching; a sample waits when the KV budget is full; prompts spread over engines by "
                  "expected tokens, the 16 samples of a prompt on one engine",
    "colocated_overheads_s": {"wake_up": 1.0, "layerwise_reload": 0.6, "sleep": 0.5},
    "dedicated_sync_s": 2.0,
}


def _engine_time(lengths: list[int], tp: int, prompt_tokens: int, kv_budget_tokens: float) -> float:
    """Seconds for one engine to decode all its samples (continuous batching, simulated step by step)."""
    a = ASSUMPTIONS
    weights, kv_bytes, bw = 15.2e9, 57344, a["hbm_bandwidth_gbps"] * 1e9 * 0.72
    waiting = sorted(lengths, reverse=True)  # longest first: a real scheduler is FIFO; the tail is the same
    running: list[list[int]] = []  # [tokens done, length]
    t = 0.0
    while waiting or running:
        used = sum(prompt_tokens + done for done, _ in running)
        while waiting and len(running) < 1024 and used + prompt_tokens + waiting[-1] <= kv_budget_tokens * tp:
            length = waiting.pop()
            running.append([0, length])
            used += prompt_tokens
        if not running:  # one sample larger than the budget: admitted alone
            running.append([0, waiting.pop()])
        # Advance in chunks of 16 steps (the batch changes slowly): cheaper to simulate, same answer.
        steps = min(16, min(length - done for done, length in running))
        context = sum(prompt_tokens + done for done, _ in running)
        memory = (weights / tp + context * kv_bytes / tp) / bw
        compute = (len(running) * 2 * 7.6e9 + 4 * 28 * 3584 * context) / (tp * 989e12 * 0.5)
        per_step = max(memory, compute) + (a["tp_allreduce_ms"] / 1e3 if tp > 1 else 0.0)
        t += steps * per_step
        for item in running:
            item[0] += steps
        running = [item for item in running if item[0] < item[1]]
    return t


def paper_model(seed: int = 0) -> list[dict]:
    from oreal.rollout.placement import spread_prompts

    a = ASSUMPTIONS
    rng = random.Random(seed)
    lengths = [[min(a["max_new_tokens"], max(16, int(rng.lognormvariate(math.log(3000), 0.8))))
                for _ in range(a["samples_per_prompt"])] for _ in range(a["prompts_per_step"])]
    decode_tokens = sum(map(sum, lengths))
    free_per_gpu = 0.85 * 80e9 - 15.2e9 - 6e9
    cases = [
        ("dedicated, 1 engine (before: one TP group)", "dedicated", 1, 4, 28, free_per_gpu),
        ("dedicated, 16 engines TP1 (4 per node on GPUs 4-7; 16 GPUs train)", "dedicated", 16, 1, 16, free_per_gpu),
        ("dedicated, 8 engines TP2 (2 per node on GPUs 4-7; 16 GPUs train)", "dedicated", 8, 2, 16, free_per_gpu),
        ("colocated, 32 engines TP1 (every GPU trains and generates)", "colocated", 32, 1, 32, free_per_gpu - 3.8e9),
        ("colocated, 16 engines TP2", "colocated", 16, 2, 32, free_per_gpu - 3.8e9),
    ]
    rows = []
    for label, placement, engines, tp, train_gpus, free in cases:
        kv_budget_tokens = free / 57344
        owner = spread_prompts([a["prompt_tokens"]] * len(lengths), a["samples_per_prompt"], engines,
                               a["max_new_tokens"])
        per_engine = [[n for p, e in enumerate(owner) if e == k for n in lengths[p]] for k in range(engines)]
        times = [_engine_time(ls, tp, a["prompt_tokens"], kv_budget_tokens) for ls in per_engine if ls]
        generate = max(times)
        overhead = sum(a["colocated_overheads_s"].values()) if placement == "colocated" else a["dedicated_sync_s"]
        rows.append({"part": "model", "case": label, "placement": placement, "engines": engines, "tp": tp,
                     "rollout_gpus": engines * tp, "train_gpus": train_gpus, "decode_tokens": decode_tokens,
                     "longest_response": max(map(max, lengths)), "generate_s": round(generate, 1),
                     "sync_or_wake_s": overhead, "rollout_plus_sync_s": round(generate + overhead, 1),
                     "decode_tokens_per_s": round(decode_tokens / generate)})
    return rows


def print_model(rows: list[dict]) -> None:
    print("Paper model: one OREAL-7B step's rollout on 32 H100s. Assumptions:")
    for key, value in ASSUMPTIONS.items():
        print(f"  {key}: {value}")
    print(f"  -> {rows[0]['decode_tokens']:,} decode tokens per step, longest response {rows[0]['longest_response']:,}")
    for r in rows:
        print(f"  {r['case']}: generate {r['generate_s']} s + sync/wake {r['sync_or_wake_s']} s "
              f"({r['decode_tokens_per_s']:,} tok/s; trains on {r['train_gpus']} GPUs)")


# ----- output --------------------------------------------------------------------------------------------
def markdown(rows: list[dict], env: dict) -> str:
    out = ["# Rollout placements (`python -m benchmarks.bench_rollout --save`)", "",
           f"torch {env['torch']}, transformers {env['transformers']}, oreal {env['oreal']}, {env['machine']}, "
           f"cpu_count {env['cpu_count']}, {env['platform']}; a shared machine: each part says when it was measured "
           "and the 1-minute load average then.", ""]

    def when(part: list[dict]) -> str:
        return f"Measured {part[0]['measured_at']}, load average {part[0]['load_avg_1m']}."

    steps = [r for r in rows if r["part"] == "steps"]
    if steps:
        out += ["## Step time split, tiny model on 2 CPU cores (median of steps 2..)", "", when(steps), "",
                "`configs/tiny_cpu.py` with " + " ".join(STEP_OPTIONS), "",
                "| placement | engines | rollout s | sync s | train s | step s | rollout share | rollout × 1 engine |",
                "|---|---|---|---|---|---|---|---|"]
        out += [f"| {r['placement']} | {r['engines']} | {r['rollout_s']} | {r['sync_s']} | {r['train_s']} | "
                f"{r['step_s']} | {r['rollout_share']} | {r['rollout_vs_1_engine']} |" for r in steps]
        out.append("")
    transport = [r for r in rows if r["part"] == "transport"]
    if transport:
        out += [f"## Weight-sync fan-out: {transport[0]['payload_mib']} MiB in {transport[0]['buckets']} buckets to "
                f"E receivers over gloo (median of {transport[0].get('repeats', 3)})", "", when(transport), "",
                "| receivers | mode | seconds | GB/s per receiver | × per_engine |", "|---|---|---|---|---|"]
        out += [f"| {r['engines']} | {r['mode']} | {r['seconds']} | {r['gbps_per_engine']} | {r['vs_per_engine']} |"
                for r in transport]
        out.append("")
    decode = [r for r in rows if r["part"] == "decode"]
    if decode:
        d = decode[0]
        out += [f"## The transformers engine's samplers: {d['prompts']} prompts of {d['prompt_tokens']} tokens x "
                f"{d['samples']} samples x {d['new_tokens']} new tokens (median of {d['repeats']}, {d['threads']} "
                "threads)", "", when(decode), "",
                "| decoder | seconds | new tokens/s | x model.generate |", "|---|---|---|---|"]
        out += [f"| {r['decoder']} | {r['seconds']} | {r['tokens_per_s']:,} | {r['vs_transformers']} |" for r in decode]
        out.append("")
    model = [r for r in rows if r["part"] == "model"]
    if model:
        out += ["## Paper model: one OREAL-7B step on 4 nodes × 8 H100 (computed, not measured)", "",
                f"{model[0]['decode_tokens']:,} decode tokens per step; longest response "
                f"{model[0]['longest_response']:,} tokens.", "",
                "| case | rollout GPUs | train GPUs | generate s | sync/wake s | decode tok/s |", "|---|---|---|---|---|---|"]
        out += [f"| {r['case']} | {r['rollout_gpus']} | {r['train_gpus']} | {r['generate_s']} | {r['sync_or_wake_s']} "
                f"| {r['decode_tokens_per_s']:,} |" for r in model]
        out += ["", "Assumptions:", ""] + [f"- {k}: {v}" for k, v in ASSUMPTIONS.items()]
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "--receiver":
        transport_receiver(argv[1:])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--save", action="store_true", help="also write benchmarks/results/rollout.{json,md}")
    parser.add_argument("--only", choices=("steps", "transport", "decode", "model"), action="append",
                        help="run only these parts (repeatable)")
    parser.add_argument("--steps", type=int, default=5, help="training steps per placement (the first is untimed)")
    parser.add_argument("--transport-mib", type=int, default=256)
    parser.add_argument("--decode-repeats", type=int, default=5)
    parser.add_argument("--decode-threads", type=int, default=0, help="torch threads for the decode part (0: all cores)")
    args = parser.parse_args(argv)
    parts = args.only or ["steps", "transport", "decode", "model"]
    env = _environment()
    rows: list[dict] = []
    if "steps" in parts:
        with tempfile.TemporaryDirectory(prefix="bench_rollout_") as tmp:
            rows += run_steps(args.steps, Path(tmp))
    if "transport" in parts:
        rows += run_transport(args.transport_mib)
    if "decode" in parts:
        rows += run_decode(args.decode_repeats, args.decode_threads)
    if "model" in parts:
        model = paper_model()
        print_model(model)
        rows += model
    rows = [{**r, **env} for r in rows]
    if args.save and args.only and (RESULTS / "rollout.json").exists():  # keep the parts not re-run
        kept = [r for r in json.loads((RESULTS / "rollout.json").read_text()) if r["part"] not in parts]
        rows = kept + rows
        rows.sort(key=lambda r: ["steps", "transport", "decode", "model"].index(r["part"]))
    text = json.dumps(rows, indent=1)
    if args.json:
        Path(args.json).write_text(text)
    if args.save:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "rollout.json").write_text(text)
        (RESULTS / "rollout.md").write_text(markdown(rows, env))
    return 0


if __name__ == "__main__":
    sys.exit(main())
