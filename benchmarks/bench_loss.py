"""Fused-loss benchmark: our OREAL loss backends beside the ways people compute it today.

    python -m benchmarks.bench_loss --tokens 4096 --hidden 1024 --vocab 32000 --dtype fp32 \\
        --providers naive,liger,torch,native,floor --json OUT.json [--save]

One step = forward and backward of the loss w.r.t. `hidden [T, H]` and `weight [V, H]` on packed
sequences (8 by default, the first eighth of each a prompt, token-RM scores and reference log-probs
present, so every term of the OREAL loss is live). Providers:

- `naive`: torch autograd through materialised `[T, V]` logits and `log_softmax`;
- `liger`: Liger-Kernel's `LigerFusedLinearGRPOLoss`, the closest peer: a token-level loss
  (`loss_type="dapo"`) with the same k3 KL to reference log-probs (`beta = kl_coef`), on the same
  hidden states viewed as `(B, L, H)`; `compiled=False` (its compiled part is elementwise math on
  `[B, L]`, irrelevant here, and Inductor's C++ compile would dominate a CPU run);
- `torch`, `native`, `triton`: `oreal.fused_oreal_loss(backend=...)` (`triton` needs a GPU);
- `floor`: only the three matmuls any implementation must do, full size, with torch
  (`z = h W^T`, `h_grad = z W`, `W_grad = z^T h`): the time no implementation can beat.

Each provider runs in its own subprocesses, so none inherits another's allocator state or caches.
The timing subprocesses stay alive and the driver interleaves them step by step (`--warmup` steps
each first, then `--rounds x --repeats` timed steps each, the starting provider rotating), so that
drifting load on a shared machine hits every provider alike; `median_s` (wall clock) and
`median_cpu_s` (CPU time of the process, all threads) are over all timed steps. `--threads N` sets torch's threads in every provider: on a machine
whose cores other jobs also use, one thread per provider keeps the timings comparable (a parallel
region waits for its slowest, descheduled thread), and the CPU time then measures the work itself.

Memory, in a separate subprocess per provider (after one warm-up step, with the inputs allocated
and their gradients cleared): `peak_total_mib` is the peak resident set size during one step minus
the resident size just before it, and `peak_extra_mib` (what DESIGN.md bounds: memory beyond
inputs and gradients) is that minus the bytes of the gradients the step leaves in `hidden.grad`
and `weight.grad` (the same for every provider that makes them; `floor` makes none). The peak is
the kernel's VmHWM, reset through /proc/self/clear_refs before the step; the subprocess runs with
`MALLOC_MMAP_THRESHOLD_=65536`, so glibc maps every block of 64 KiB or more and unmaps it on free:
resident memory then follows live allocations instead of keeping freed heap pages. The timing
subprocesses run with the default allocator settings. On CUDA, torch's allocator statistics
replace the resident set size.

Accuracy (`--check`, on by default): a `reference` subprocess runs `naive` in float64 on the same
inputs; every provider that computes the OREAL loss reports its relative error (L2 norm of the
difference over L2 norm of the reference) for loss, log-probs, entropy and both gradients.
"""

from __future__ import annotations

import argparse
import csv
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
PROTOCOL = "@@bench "
PROVIDERS = ("naive", "liger", "torch", "native", "triton", "floor")
OREAL_PROVIDERS = ("naive", "torch", "native", "triton")  # compute the same loss as the reference
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "fp64": "float64"}
KL_COEF, POS_COEF, NEG_COEF = 0.01, 1.0, 0.5


# ----------------------------------------------------------------------------------------------
# Inputs and providers (run inside the worker subprocesses)
# ----------------------------------------------------------------------------------------------

def make_batch(args, device, dtype):
    """Seeded inputs shared by every provider: packed sequences of equal length."""
    import torch

    gen = torch.Generator().manual_seed(args.seed)
    T, H, V, S = args.tokens, args.hidden, args.vocab, args.seqs
    if T % S:
        raise SystemExit(f"--tokens {T} must be a multiple of --seqs {S} (liger needs equal lengths)")
    L = T // S
    hidden = torch.randn(T, H, generator=gen)
    weight = torch.randn(V, H, generator=gen) * (1.0 / H ** 0.5) * 2.0
    labels = torch.randint(0, V, (T,), generator=gen)
    prompt = max(1, L // 8)
    for i in range(S):
        labels[i * L:i * L + prompt] = -100  # prompt tokens
        labels[(i + 1) * L - 1] = -100  # the last position predicts nothing
    batch = dict(
        hidden=hidden.to(device=device, dtype=dtype),
        weight=weight.to(device=device, dtype=dtype),
        labels=labels.to(device),
        cu_seqlens=torch.arange(0, T + 1, L, dtype=torch.int32).to(device),
        advantages=torch.randn(S, generator=gen).to(device),
        is_positive=(torch.arange(S) % 2 == 0).to(device),
        rm_scores=torch.randn(T, generator=gen).to(device),
        ref_logprobs=(-torch.rand(T, generator=gen) * 4 - 0.5).to(device),
    )
    return batch


def _coefficients(batch):
    from oreal.ops.loss import oreal_token_coefficients
    from oreal.ops.token_weights import token_rm_weights

    weights = token_rm_weights(batch["rm_scores"], batch["labels"], batch["cu_seqlens"], batch["is_positive"])
    return oreal_token_coefficients(batch["labels"], batch["cu_seqlens"], batch["advantages"],
                                    batch["is_positive"], weights, kl_coef=KL_COEF, pos_coef=POS_COEF,
                                    neg_coef=NEG_COEF)


def naive_step(hidden, weight, batch):
    """Autograd through the materialised logits; float64 inputs give the reference."""
    import torch

    labels = batch["labels"]
    valid = labels != -100
    logits = (hidden @ weight.T).to(torch.promote_types(hidden.dtype, torch.float32))
    logp = torch.log_softmax(logits, dim=-1)
    lp = logp.gather(1, torch.where(valid, labels, 0)[:, None])[:, 0]
    with torch.no_grad():
        entropy = torch.where(valid, -(logp.exp() * logp).sum(-1), 0.0)
    pg_coef, kl_weight = _coefficients(batch)
    delta = batch["ref_logprobs"].to(lp.dtype) - lp
    per_token = -pg_coef.to(lp.dtype) * lp + kl_weight.to(lp.dtype) * (torch.exp(delta) - delta - 1)
    loss = torch.where(valid, per_token, 0.0).sum()
    loss.backward()
    return loss.detach(), torch.where(valid, lp, 0.0).detach(), entropy


def make_provider(name, batch):
    """A function running one step (forward + backward) and returning (loss, logprobs, entropy) or None."""
    import torch

    hidden, weight = batch["hidden"], batch["weight"]
    if name in ("naive", "reference"):
        return lambda: naive_step(hidden, weight, batch)
    if name in ("torch", "native", "triton"):
        import oreal

        def step():
            out = oreal.fused_oreal_loss(hidden, weight, batch["labels"], batch["cu_seqlens"], batch["advantages"],
                                         batch["is_positive"], batch["rm_scores"], batch["ref_logprobs"],
                                         kl_coef=KL_COEF, pos_coef=POS_COEF, neg_coef=NEG_COEF, backend=name)
            out.loss.backward()
            return out.loss.detach(), out.logprobs, out.entropy
        return step
    if name == "liger":
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

        S = batch["advantages"].numel()
        L = hidden.shape[0] // S
        module = LigerFusedLinearGRPOLoss(beta=KL_COEF, loss_type="dapo", use_ref_model=True, compiled=False,
                                          chunk_size=1, temperature=1.0)
        labels = batch["labels"].view(S, L)
        mask = (labels != -100).to(torch.float32)
        ids = labels.clamp(min=0)
        ref = batch["ref_logprobs"].view(S, L)

        def step():
            out = module(hidden.view(S, L, -1), weight, ids, mask, batch["advantages"], ref_per_token_logps=ref)
            loss = out[0] if isinstance(out, tuple) else out
            loss.backward()
            return None
        return step
    if name == "floor":
        def step():
            with torch.no_grad():
                z = hidden @ weight.T
                _grad_hidden = z @ weight
                _grad_weight = z.T @ hidden
            return None
        return step
    raise SystemExit(f"unknown provider {name!r}; choose from {', '.join(PROVIDERS)}")


def _clear_grads(batch):
    batch["hidden"].grad = None
    batch["weight"].grad = None


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _proc_status():
    text = Path("/proc/self/status").read_text()
    return {key: int(re.search(rf"{key}:\s+(\d+)", text).group(1)) for key in ("VmRSS", "VmHWM")}


def _relative_errors(outputs, batch, reference_path):
    import torch

    ref = torch.load(reference_path, weights_only=True)  # tensors only: never unpickle a results file
    ours = dict(loss=outputs[0], logprobs=outputs[1], entropy=outputs[2], grad_hidden=batch["hidden"].grad,
                grad_weight=batch["weight"].grad)
    errors = {}
    for key, value in ours.items():
        expected = ref[key]
        diff = (value.double().cpu() - expected).norm()
        errors[key] = float(diff / expected.norm().clamp(min=1e-300))
    return errors


def worker(args) -> dict:
    """Runs one provider in this process and returns its measurements."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, DTYPES[args.dtype]) if args.provider != "reference" else torch.float64
    batch = make_batch(args, device, dtype)
    needs_grad = args.provider not in ("floor",)
    batch["hidden"].requires_grad_(needs_grad)
    batch["weight"].requires_grad_(needs_grad)
    step = make_provider(args.provider, batch)
    result = dict(provider=args.provider)

    if args.provider == "reference":
        loss, logprobs, entropy = step()
        torch.save(dict(loss=loss.cpu(), logprobs=logprobs.cpu(), entropy=entropy.cpu(),
                        grad_hidden=batch["hidden"].grad.cpu(), grad_weight=batch["weight"].grad.cpu()),
                   args.reference_out)
        return result

    if args.mode == "memory":
        step()  # warm-up: lazy initialisation, thread pools, BLAS buffers
        _sync(device)
        _clear_grads(batch)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            step()
            _sync(device)
            result["peak_total_mib"] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
            result["memory_method"] = ("torch.cuda.max_memory_allocated during the step - memory_allocated "
                                       "before it - bytes of the gradients left in .grad")
        else:
            base = _proc_status()["VmRSS"]
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
            step()
            result["peak_total_mib"] = (_proc_status()["VmHWM"] - base) / 1024
            result["memory_method"] = ("VmHWM during the step - VmRSS before it - bytes of the gradients "
                                       "left in .grad (MALLOC_MMAP_THRESHOLD_=65536)")
        grads = [t.grad for t in (batch["hidden"], batch["weight"]) if t.grad is not None]
        result["grad_mib"] = sum(g.numel() * g.element_size() for g in grads) / 2**20
        result["peak_extra_mib"] = result["peak_total_mib"] - result["grad_mib"]
        return result

    # mode "serve": timed steps on request, so that the driver can interleave the providers step by step
    for _ in range(args.warmup):
        _clear_grads(batch)
        step()
        _sync(device)
    _reply({"ready": True, "threads": torch.get_num_threads()})
    outputs = None
    for line in sys.stdin:
        command = line.strip()
        if command == "step":
            _clear_grads(batch)
            _sync(device)
            start, cpu_start = time.perf_counter(), time.process_time()
            outputs = step()
            _sync(device)
            _reply({"time_s": time.perf_counter() - start, "cpu_s": time.process_time() - cpu_start})
        elif command == "check":
            ok = args.reference and outputs is not None and args.provider in OREAL_PROVIDERS
            _reply({"rel_err": _relative_errors(outputs, batch, args.reference) if ok else None})
        else:
            break
    return result


def _reply(message: dict) -> None:
    """One protocol line to the driver (other output of the libraries on stdout is ignored)."""
    print(PROTOCOL + json.dumps(message), flush=True)


# ----------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------

def versions() -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__}
    for module in ("liger_kernel", "triton", "numpy"):
        try:
            from importlib.metadata import version

            info[module] = version(module.replace("_", "-"))
        except Exception:  # noqa: BLE001 - a missing package is simply not reported
            pass
    try:
        from oreal import _C

        info["oreal._C"] = "cuda+cpu" if _C.with_cuda else "cpu"
    except ImportError:
        info["oreal._C"] = "not built"
    return info


def machine(device: str) -> dict:
    import torch

    model = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": model, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "os": platform.platform(), "device": device}
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def _worker_command(args, provider, mode, reference=None, reference_out=None) -> list[str]:
    command = [sys.executable, "-m", "benchmarks.bench_loss", "--worker", "--provider", provider, "--mode", mode,
               "--tokens", str(args.tokens), "--hidden", str(args.hidden), "--vocab", str(args.vocab),
               "--dtype", args.dtype, "--seqs", str(args.seqs), "--seed", str(args.seed), "--device", args.device,
               "--warmup", str(args.warmup), "--repeats", str(args.repeats), "--threads", str(args.threads)]
    if reference:
        command += ["--reference", reference]
    if reference_out:
        command += ["--reference-out", reference_out]
    return command


def _run_worker(args, provider, mode, reference=None, reference_out=None) -> dict:
    """Runs a one-shot worker (reference or memory) and returns its result."""
    command = _worker_command(args, provider, mode, reference, reference_out)
    env = dict(os.environ)
    if mode == "memory":
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    load = os.getloadavg()[0]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=args.timeout,
                          cwd=Path(__file__).resolve().parent.parent)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"provider": provider, "error": " | ".join(tail) or f"exit code {proc.returncode}"}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["loadavg_1m"] = load
    return result


def time_providers(args, runnable: list[str]) -> dict:
    """Timed steps of every provider, interleaved step by step (each provider in its own process;
    the starting provider rotates every round), so that drifting load on a shared machine hits all
    providers alike."""
    results = {p: {"times_s": [], "cpu_times_s": [], "loadavg_1m": []} for p in runnable}
    servers = {}
    try:
        for p in runnable:  # started (and warmed up) one after another, not concurrently
            try:
                servers[p] = Server(args, p)
                results[p]["threads"] = servers[p].info["threads"]
            except (RuntimeError, OSError, ValueError) as exc:
                results[p]["error"] = str(exc)
        live = [p for p in runnable if p in servers]
        for index in range(args.rounds * args.repeats):
            order = live[index % len(live):] + live[:index % len(live)] if live else []
            for p in order:
                load = os.getloadavg()[0]
                out = servers[p].ask("step")
                results[p]["times_s"].append(out["time_s"])
                results[p]["cpu_times_s"].append(out["cpu_s"])
                results[p]["loadavg_1m"].append(load)
            print(f"step {index + 1}/{args.rounds * args.repeats}: "
                  + ", ".join(f"{p} {results[p]['times_s'][-1]:.3f}s" for p in live), file=sys.stderr)
        if args.reference_path:
            for p in live:
                if p in OREAL_PROVIDERS:
                    results[p]["rel_err"] = servers[p].ask("check")["rel_err"]
    finally:
        for server in servers.values():
            server.close()
    return results


class Server:
    """A provider's timing subprocess, kept alive so that steps of all providers can be interleaved."""

    def __init__(self, args, provider):
        command = _worker_command(args, provider, "serve", reference=args.reference_path)
        self.provider = provider
        self.proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     cwd=Path(__file__).resolve().parent.parent)
        self.info = self._read()

    def _read(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith(PROTOCOL):
                return json.loads(line[len(PROTOCOL):])
        raise RuntimeError(f"{self.provider}: worker exited with code {self.proc.wait()}")

    def ask(self, command: str) -> dict:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.close()
                self.proc.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()


def unavailable(provider: str, device: str) -> str | None:
    import torch

    if provider == "triton" and not device.startswith("cuda"):
        return "triton kernels need a GPU"
    if provider == "liger":
        try:
            import liger_kernel  # noqa: F401
        except ImportError:
            return "liger-kernel is not installed"
    if provider in ("native", "triton", "torch"):
        from oreal.ops import backends

        return backends.unavailable_reason(provider, torch.device(device))
    return None


def run(args) -> list[dict]:
    providers = [p.strip() for p in args.providers.split(",") if p.strip()]
    for p in providers:
        if p not in PROVIDERS:
            raise SystemExit(f"--providers: unknown provider {p!r}; choose from {', '.join(PROVIDERS)}")
    skipped = {p: unavailable(p, args.device) for p in providers}
    runnable = [p for p in providers if skipped[p] is None]
    reference = None
    tmp = tempfile.TemporaryDirectory()
    if args.check and any(p in OREAL_PROVIDERS for p in runnable):
        reference = os.path.join(tmp.name, "reference.pt")
        out = _run_worker(args, "reference", "reference", reference_out=reference)
        if "error" in out:
            print(f"reference failed, no accuracy check: {out['error']}", file=sys.stderr)
            reference = None
    args.reference_path = reference
    results = time_providers(args, runnable)
    for p in runnable:
        out = _run_worker(args, p, "memory")
        if "error" in out:
            results[p].setdefault("error", out["error"])
        else:
            for key in ("peak_extra_mib", "peak_total_mib", "grad_mib", "memory_method"):
                results[p][key] = out[key]
    tmp.cleanup()

    common = dict(tokens=args.tokens, hidden=args.hidden, vocab=args.vocab, dtype=args.dtype, device=args.device)
    ver, mach = versions(), machine(args.device)
    rows = []
    for p in providers:
        row = dict(provider=p, **common)
        if skipped[p] is not None:
            row.update(status="skipped", reason=skipped[p])
        else:
            r = results[p]
            times = r["times_s"]
            row.update(status="error" if "error" in r and not times else "ok",
                       median_s=statistics.median(times) if times else None,
                       min_s=min(times) if times else None, times_s=times,
                       median_cpu_s=statistics.median(r["cpu_times_s"]) if times else None,
                       threads=r.get("threads"),
                       peak_extra_mib=r.get("peak_extra_mib"), peak_total_mib=r.get("peak_total_mib"),
                       grad_mib=r.get("grad_mib"), memory_method=r.get("memory_method"),
                       loadavg_1m=r["loadavg_1m"])
            if "rel_err" in r:
                row["rel_err_vs_fp64"] = r["rel_err"]
            if "error" in r:
                row["error"] = r["error"]
        row.update(versions=ver, machine=mach, timestamp=time.strftime("%Y-%m-%dT%H:%M:%S"))
        rows.append(row)
    by_name = {row["provider"]: row for row in rows}
    for row in rows:
        for base in ("floor", "liger", "naive"):
            other = by_name.get(base)
            for key, metric in (("time", "median_s"), ("cpu", "median_cpu_s"), ("mem", "peak_extra_mib")):
                if other and row.get(metric) is not None and other.get(metric):
                    row[f"{key}_vs_{base}"] = row[metric] / other[metric]
    return rows


def _fmt(value, spec):
    return "-" if value is None else format(value, spec)


def _load_range(rows: list[dict]) -> str:
    loads = [load for row in rows for load in row.get("loadavg_1m") or []]
    return f"{min(loads):.1f}-{max(loads):.1f}" if loads else "-"


def markdown(rows: list[dict]) -> str:
    first = rows[0]
    mach, ver = first["machine"], first["versions"]
    lines = [
        f"T={first['tokens']} H={first['hidden']} V={first['vocab']} {first['dtype']} on {first['device']} "
        f"({mach['cpu']}, {mach['cores']} cores, {first.get('threads') or mach['torch_threads']} torch threads "
        f"per provider, load average {_load_range(rows)}); "
        + ", ".join(f"{k} {v}" for k, v in ver.items()) + f"; {first['timestamp']}",
        "",
        "| provider | median s | min s | x floor | x liger | median CPU s | CPU x floor | CPU x liger "
        "| peak extra MiB | mem x liger | mem x naive | peak incl. grads MiB | rel err loss | rel err logprobs "
        "| rel err grad H | rel err grad W | status |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        err = row.get("rel_err_vs_fp64", {})
        lines.append(
            f"| {row['provider']} | {_fmt(row.get('median_s'), '.3f')} | {_fmt(row.get('min_s'), '.3f')} "
            f"| {_fmt(row.get('time_vs_floor'), '.2f')} | {_fmt(row.get('time_vs_liger'), '.2f')} "
            f"| {_fmt(row.get('median_cpu_s'), '.3f')} | {_fmt(row.get('cpu_vs_floor'), '.2f')} "
            f"| {_fmt(row.get('cpu_vs_liger'), '.2f')} "
            f"| {_fmt(row.get('peak_extra_mib'), '.0f')} | {_fmt(row.get('mem_vs_liger'), '.2f')} "
            f"| {_fmt(row.get('mem_vs_naive'), '.2f')} | {_fmt(row.get('peak_total_mib'), '.0f')} "
            f"| {_fmt(err.get('loss'), '.1e')} | {_fmt(err.get('logprobs'), '.1e')} "
            f"| {_fmt(err.get('grad_hidden'), '.1e')} | {_fmt(err.get('grad_weight'), '.1e')} | {row['status']}"
            + (f": {row.get('reason') or row.get('error')}" if row["status"] != "ok" else "") + " |")
    return "\n".join(lines) + "\n"


def write_csv(rows: list[dict], path: Path) -> None:
    fields = ["provider", "tokens", "hidden", "vocab", "dtype", "device", "threads", "median_s", "min_s",
              "time_vs_floor", "time_vs_liger", "median_cpu_s", "cpu_vs_floor", "cpu_vs_liger", "peak_extra_mib",
              "mem_vs_liger", "mem_vs_naive", "peak_total_mib", "status", "timestamp"]
    new = not path.exists()
    with path.open("a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields + ["versions", "machine"], extrasaction="ignore")
        if new:
            writer.writeheader()
        for row in rows:
            writer.writerow({**row, "versions": json.dumps(row["versions"]), "machine": json.dumps(row["machine"])})


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--providers", default="naive,liger,torch,native,floor")
    parser.add_argument("--seqs", type=int, default=8, help="packed sequences (liger sees them as the batch)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per provider (times --rounds)")
    parser.add_argument("--rounds", type=int, default=1, help="multiplies --repeats (kept for old command lines)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads per provider (0: torch's default, one per core)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per worker subprocess")
    parser.add_argument("--no-check", dest="check", action="store_false", help="skip the float64 accuracy check")
    parser.add_argument("--json", type=Path, help="write the rows here")
    parser.add_argument("--markdown", type=Path, help="write the markdown table here")
    parser.add_argument("--save", action="store_true",
                        help="also write benchmarks/results/loss_<device>_T_H_V_dtype.{json,md} and append to loss.csv")
    # worker-only arguments
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--provider", help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="serve", help=argparse.SUPPRESS)
    parser.add_argument("--reference", help=argparse.SUPPRESS)
    parser.add_argument("--reference-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in ("tokens", "hidden", "vocab", "seqs", "repeats", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    for name in ("warmup", "threads"):
        if getattr(args, name) < 0:
            parser.error(f"--{name} must be >= 0")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return
    rows = run(args)
    table = markdown(rows)
    print(table)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    if args.markdown:
        args.markdown.write_text(table)
    if args.save:
        RESULTS.mkdir(exist_ok=True)
        stem = f"loss_{args.device.replace(':', '')}_T{args.tokens}_H{args.hidden}_V{args.vocab}_{args.dtype}"
        stem += f"_threads{args.threads}" if args.threads else ""
        (RESULTS / f"{stem}.json").write_text(json.dumps(rows, indent=1) + "\n")
        (RESULTS / f"{stem}.md").write_text(table)
        write_csv(rows, RESULTS / "loss.csv")


if __name__ == "__main__":
    main()
