"""The first thing to run on a GPU: every GPU path of the fused losses checked in one command.

    python -m benchmarks.gpu_acceptance --json OUT.json [--budget-s 420] [--only SUBSTRING ...] [--list]

On one CUDA device, in under 8 minutes on an H100/H200, it runs (each a named check, cheapest and
most telling first):

- `cases/...`: the shared case tables of tests/loss_cases.py and tests/policy_cases.py on CUDA
  tensors, compiled (no interpreter), for `triton` and `native`: fp32 against the float64
  reference, bf16/fp16 within 2x of plain torch in that dtype (confident-token cases included), the
  fp16 large-token-count case (7e6 action tokens under a 2^16 loss scale) and grad_output = 1/3;
- `full/...`: Qwen2.5 shapes (T=16384, H=3584 and 5120, V=152064, bf16), OREAL and clipped-surrogate
  modes, against the chunked fp32 torch backend on the same bf16 inputs; `chunk_size=T` (T V > 2^31
  elements in one chunk), odd T, T <= 64; bitwise-repeatable gradients; no-grad log-probs equal to
  grad-mode ones; inputs on cuda:1 when there are two devices; a non-default stream;
- `native/opcheck`, `native/compile`: torch.library.opcheck and torch.compile(fullgraph=True) of the
  native ops on CUDA tensors;
- `bench/...`: `benchmarks.bench_loss --device cuda --providers floor,native,triton,liger` at full
  size (time, peak memory), and per-kernel CUDA times from torch.profiler beside the kernel report's
  roofline lines (benchmarks/kernel_report.py).

Every check is guarded (an exception is a FAIL with its message, the next check still runs) and
time-boxed: a check whose estimated cost exceeds what is left of `--budget-s` is skipped, and the
benchmark subprocess gets the time that is left. One line per check is printed
(`PASS|FAIL|SKIP name seconds detail`) and the JSON is rewritten after every check, so a run cut
short keeps what it measured. Exit code 0 when nothing failed. Without CUDA it prints that it
skipped and exits 0.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"
FULL_MODELS = {"qwen2.5-7b": 3584, "qwen2.5-32b": 5120}
FULL_TOKENS, FULL_VOCAB = 16384, 152064
# Bounds of the full-size checks (bf16 fused vs the fp32 torch backend on the same bf16 inputs): the
# loss and log-probs come from fp32 statistics in both; gradients carry one bf16 rounding of dz and
# of the stored hidden gradient (~2^-9 per element).
FULL_LOSS_RTOL, FULL_LOGPROB_ATOL, FULL_GRAD_RTOL = 1e-3, 2e-2, 3e-2


@dataclass
class Check:
    name: str
    run: Callable[[], dict]  # returns details; raises AssertionError (FAIL) or Skip
    cost_s: float  # estimated seconds on an H100, for the time box


class Skip(Exception):
    """Raised by a check that cannot run here (e.g. one device only)."""


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------

def _torch():
    import torch

    return torch


def _rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double().to(a.device)
    denom = b.norm().item()
    return (a - b).norm().item() / denom if denom > 0 else (a - b).norm().item()


def full_batch(hidden_size: int, tokens: int, *, seed: int, device, dtype=None, vocab: int = FULL_VOCAB,
               num_seqs: int = 16):
    """A packed batch at model scale, built on the device: 16 sequences, the first eighth of each a prompt."""
    torch = _torch()
    dtype = dtype or torch.bfloat16
    g = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.randn(tokens, hidden_size, device=device, generator=g, dtype=torch.float32).to(dtype)
    weight = (torch.randn(vocab, hidden_size, device=device, generator=g, dtype=torch.float32)
              * hidden_size ** -0.5).to(dtype)
    labels = torch.randint(0, vocab, (tokens,), device=device, generator=g)
    num_seqs = max(1, min(num_seqs, tokens))
    bounds = torch.linspace(0, tokens, num_seqs + 1, device=device).round().to(torch.int32)
    for i in range(num_seqs):
        start, end = int(bounds[i]), int(bounds[i + 1])
        labels[start:start + (end - start) // 8] = -100
        if end - start > 1:
            labels[end - 1] = -100
    is_positive = torch.rand(num_seqs, device=device, generator=g) < 0.5
    advantages = torch.where(is_positive, 1.0, -1.0) * (0.25 + torch.rand(num_seqs, device=device, generator=g))
    rm_scores = torch.randn(tokens, device=device, generator=g) * 2
    # random logits are ~N(0, 1): log-probs near -log V - 0.5; old and reference log-probs scattered
    # around that put ratios on both sides of the clip range and keep the KL terms live
    typical = -math.log(vocab) - 0.5
    old = typical + 0.6 * (torch.rand(tokens, device=device, generator=g) - 0.5)
    ref = typical + 2.0 * (torch.rand(tokens, device=device, generator=g) - 0.5)
    return dict(hidden=hidden, weight=weight, labels=labels, cu_seqlens=bounds, advantages=advantages,
                is_positive=is_positive, rm_scores=rm_scores, ref=ref, old=old)


def run_loss(batch: dict, backend: str, *, mode: str = "oreal", chunk_size=None, grad: bool = True,
             dtype=None) -> dict:
    """One forward + backward of the OREAL loss (`mode="oreal"`) or the clipped surrogate (`"policy"`).

    With `chunk_size`, the backend's internal OREAL op runs directly (the public API picks the chunk
    itself), on per-token coefficients of the same magnitude."""
    torch = _torch()
    import oreal
    from oreal.ops import backends

    hidden, weight = batch["hidden"], batch["weight"]
    if dtype is not None:
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    hidden = hidden.detach().clone().requires_grad_(grad)
    weight = weight.detach().clone().requires_grad_(grad)
    context = torch.enable_grad() if grad else torch.no_grad()
    with context:
        if chunk_size is not None:
            labels = batch["labels"]
            pg_coef = torch.where(labels >= 0, batch["rm_scores"] / labels.numel(), 0.0)
            op = backends.resolve(backend, hidden.device).linear_logprob_loss
            loss, logprobs, _ = op(hidden, weight, labels, pg_coef, batch["ref"],
                                   torch.tensor(0.05 / labels.numel(), device=hidden.device), 1.0, chunk_size)
        elif mode == "oreal":
            out = oreal.fused_oreal_loss(hidden, weight, batch["labels"], batch["cu_seqlens"], batch["advantages"],
                                         batch["is_positive"], batch["rm_scores"], batch["ref"], kl_coef=0.05,
                                         backend=backend)
            loss, logprobs = out.loss, out.logprobs
        else:
            out = oreal.fused_policy_loss(hidden, weight, batch["labels"], batch["cu_seqlens"], batch["advantages"],
                                          batch["old"], batch["ref"], kl_coef=0.05, backend=backend)
            loss, logprobs = out.loss, out.logprobs
        result = {"loss": loss.detach(), "logprobs": logprobs}
        if grad:
            loss.backward()
            result.update(grad_hidden=hidden.grad, grad_weight=weight.grad)
    return result


def compare(ours: dict, ref: dict) -> dict:
    """Errors of `ours` against `ref` (the fp32 torch backend), and whether they are within bounds."""
    torch = _torch()
    action = ref["logprobs"] != 0
    # relative to max(|loss|, 1): positive and negative sequences' terms can cancel the loss towards 0
    errors = {"loss_rel": abs(float(ours["loss"]) - float(ref["loss"])) / max(abs(float(ref["loss"])), 1.0),
              "logprobs_max_abs": float((ours["logprobs"] - ref["logprobs"])[action].abs().max())
              if action.any() else 0.0}
    for key in ("grad_hidden", "grad_weight"):
        if key in ours:
            errors[key + "_rel"] = _rel(ours[key].float(), ref[key].float())
    finite = all(bool(torch.isfinite(v).all()) for v in ours.values())
    ok = (finite and errors["loss_rel"] < FULL_LOSS_RTOL and errors["logprobs_max_abs"] < FULL_LOGPROB_ATOL
          and all(errors.get(k + "_rel", 0.0) < FULL_GRAD_RTOL for k in ("grad_hidden", "grad_weight")))
    assert ok, f"outside bounds (finite={finite}): {errors}"
    return errors


# ----------------------------------------------------------------------------------------------
# checks
# ----------------------------------------------------------------------------------------------

def case_checks(backends) -> list[Check]:
    """The shared case tables (tests/loss_cases.py, tests/policy_cases.py) on CUDA, per backend."""
    checks = []
    for backend in backends:
        def fp32_loss(backend=backend):
            import loss_cases

            seed = int(time.time()) % 100_000
            for name, options in loss_cases.FP32_CASES.items():
                loss_cases.assert_matches_reference_fp32(loss_cases.make_case(seed=seed, **options), backend,
                                                         device="cuda")
            return {"cases": len(loss_cases.FP32_CASES), "seed": seed}

        def fp32_policy(backend=backend):
            import policy_cases

            seed = int(time.time()) % 100_000
            for name, options in policy_cases.CASES.items():
                policy_cases.assert_matches_reference(policy_cases.make_policy_case(seed=seed, **dict(options)),
                                                      backend, device="cuda")
            return {"cases": len(policy_cases.CASES), "seed": seed}

        def low_precision(backend=backend):
            import loss_cases
            import policy_cases

            torch = _torch()
            seed = int(time.time()) % 100_000
            totals = {}
            for dtype in (torch.bfloat16, torch.float16):
                for name in loss_cases.LOW_PRECISION_CASES:
                    totals[f"oreal/{name}/{dtype}"] = loss_cases.assert_low_precision_within_twice_plain(
                        name, backend, dtype, seed, device="cuda")
                for name in policy_cases.LOW_PRECISION_CASES:
                    totals[f"policy/{name}/{dtype}"] = policy_cases.assert_low_precision_within_twice_plain(
                        name, backend, dtype, seed, device="cuda")
            return {"seed": seed, "errors": totals}

        def fp16_storage(backend=backend):
            import loss_cases

            torch = _torch()
            seed = int(time.time()) % 100_000
            loss_cases.assert_fp16_survives_large_token_counts(backend, seed, device="cuda")
            for dtype in (torch.bfloat16, torch.float16):
                loss_cases.assert_upstream_gradient_applied_in_fp32(backend, dtype, seed, device="cuda")
            return {"seed": seed}

        checks += [Check(f"cases/{backend}/fp32_oreal", fp32_loss, 20),
                   Check(f"cases/{backend}/fp32_policy", fp32_policy, 15),
                   Check(f"cases/{backend}/low_precision_confident", low_precision, 30),
                   Check(f"cases/{backend}/fp16_large_token_counts_and_grad_output", fp16_storage, 5)]
    return checks


def full_size_checks(backends) -> list[Check]:
    torch = _torch()
    checks = []
    reference_cache: dict = {}

    def reference(model, mode):
        key = (model, mode)
        if key not in reference_cache:
            reference_cache.clear()  # one fp32 reference (~7 GB of gradients) at a time
            batch = full_batch(FULL_MODELS[model], FULL_TOKENS, seed=1, device="cuda")
            reference_cache[key] = (batch, run_loss(batch, "torch", mode=mode, dtype=torch.float32))
        return reference_cache[key]

    for model in FULL_MODELS:
        for mode in ("oreal", "policy"):
            for backend in backends:
                def full(model=model, mode=mode, backend=backend):
                    batch, ref = reference(model, mode)
                    torch.cuda.synchronize()
                    start = time.perf_counter()
                    ours = run_loss(batch, backend, mode=mode)
                    torch.cuda.synchronize()
                    errors = compare(ours, ref)
                    return {**errors, "step_s": time.perf_counter() - start,
                            "peak_gib": torch.cuda.max_memory_allocated() / 2**30}

                checks.append(Check(f"full/{model}/{mode}/{backend}", full, 12))

    for backend in backends:
        def one_chunk(backend=backend):
            batch = full_batch(FULL_MODELS["qwen2.5-7b"], FULL_TOKENS, seed=2, device="cuda")
            assert FULL_TOKENS * FULL_VOCAB > 2**31
            whole = run_loss(batch, backend, chunk_size=FULL_TOKENS)
            chunked = run_loss(batch, backend)
            return compare(whole, chunked)

        def small_and_odd(backend=backend):
            details = {}
            for tokens in (1, 37, 64, 1237):
                batch = full_batch(FULL_MODELS["qwen2.5-7b"], tokens, seed=3 + tokens, device="cuda")
                ref = run_loss(batch, "torch", dtype=torch.float32)
                details[f"T={tokens}"] = compare(run_loss(batch, backend), ref)
            return details

        def repeatable(backend=backend):
            batch = full_batch(FULL_MODELS["qwen2.5-7b"], 4096, seed=4, device="cuda")
            first, second = run_loss(batch, backend), run_loss(batch, backend)
            same = {k: bool(torch.equal(first[k], second[k])) for k in first}
            assert all(same.values()), f"not bitwise repeatable: {same}"
            return same

        def no_grad(backend=backend):
            batch = full_batch(FULL_MODELS["qwen2.5-7b"], 4096, seed=5, device="cuda")
            with_grad, without = run_loss(batch, backend), run_loss(batch, backend, grad=False)
            diff = float((with_grad["logprobs"] - without["logprobs"]).abs().max())
            assert torch.equal(with_grad["logprobs"], without["logprobs"]), f"max |diff| {diff}"
            return {"max_abs_diff": diff}

        def second_device(backend=backend):
            if torch.cuda.device_count() < 2:
                raise Skip("one CUDA device")
            batch = full_batch(FULL_MODELS["qwen2.5-7b"], 2048, seed=6, device="cuda:1")
            ref = run_loss(batch, "torch", dtype=torch.float32)
            ours = run_loss(batch, backend)
            assert ours["grad_hidden"].device == torch.device("cuda:1")
            return compare(ours, ref)

        def side_stream(backend=backend):
            batch = full_batch(FULL_MODELS["qwen2.5-7b"], 2048, seed=7, device="cuda")
            default = run_loss(batch, backend)
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                other = run_loss(batch, backend)
            stream.synchronize()
            same = {k: bool(torch.equal(default[k], other[k])) for k in default}
            assert all(same.values()), f"results differ on a side stream: {same}"
            return same

        checks += [Check(f"full/chunk_size_T/{backend}", one_chunk, 15),
                   Check(f"full/small_and_odd_T/{backend}", small_and_odd, 10),
                   Check(f"full/bitwise_repeatable/{backend}", repeatable, 5),
                   Check(f"full/no_grad_logprobs/{backend}", no_grad, 4),
                   Check(f"full/second_device/{backend}", second_device, 4),
                   Check(f"full/side_stream/{backend}", side_stream, 4)]
    return checks


def native_op_checks() -> list[Check]:
    torch = _torch()

    def inputs():
        # fp32: the op's saved gradients are then stored unscaled, and opcheck's eager-vs-traced output
        # comparison is not disturbed by the eager backward's in-place scaling of 16-bit gradients
        batch = full_batch(64, 45, seed=8, device="cuda", vocab=301, num_seqs=3, dtype=torch.float32)
        pg = torch.where(batch["labels"] >= 0, torch.randn(45, device="cuda") / 45, 0.0)
        return (batch["hidden"].requires_grad_(), batch["weight"].requires_grad_(), batch["labels"], pg,
                batch["ref"], torch.tensor(0.05, device="cuda"))

    def opcheck():
        args = inputs()
        torch.library.opcheck(torch.ops.oreal_native.linear_logprob_loss_fwd.default,
                              (*args, 1.0, 0, True, True))
        return {"ok": True}

    def compiled():
        from oreal.ops import native

        args = inputs()

        def step(hidden, weight, labels, pg, ref, kl):
            loss, logprobs, _ = native.linear_logprob_loss(hidden, weight, labels, pg, ref, kl)
            return loss, logprobs

        eager_loss, eager_lp = step(*args)
        graph_loss, graph_lp = torch.compile(step, fullgraph=True)(*args)
        assert torch.allclose(eager_loss, graph_loss) and torch.equal(eager_lp, graph_lp)
        return {"loss": float(eager_loss)}

    return [Check("native/opcheck", opcheck, 20), Check("native/compile_fullgraph", compiled, 40)]


def profile_kernels(backend: str, hidden_size: int) -> dict:
    """CUDA time per kernel name over one full-size step, from torch.profiler."""
    torch = _torch()
    from torch.profiler import ProfilerActivity, profile

    batch = full_batch(hidden_size, FULL_TOKENS, seed=9, device="cuda")
    run_loss(batch, backend)  # warm-up (compiles Triton kernels)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run_loss(batch, backend)
        torch.cuda.synchronize()
    times: dict = {}
    for event in prof.key_averages():
        cuda_us = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0)
        if cuda_us:
            times[event.key[:120]] = times.get(event.key[:120], 0.0) + cuda_us / 1e6
    return dict(sorted(times.items(), key=lambda kv: -kv[1])[:25])


def bench_checks(backends, deadline: Callable[[], float]) -> list[Check]:
    def bench():
        left = deadline()
        if left < 60:
            raise Skip(f"only {left:.0f} s left")
        with TemporaryPath("bench_loss.json") as out:
            command = [sys.executable, "-m", "benchmarks.bench_loss", "--device", "cuda", "--dtype", "bf16",
                       "--tokens", str(FULL_TOKENS), "--hidden", str(FULL_MODELS["qwen2.5-7b"]),
                       "--vocab", str(FULL_VOCAB), "--providers", "floor,native,triton,liger", "--no-check",
                       "--warmup", "1", "--repeats", "3", "--json", str(out)]
            proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=left - 10)
            if proc.returncode != 0:
                raise AssertionError("bench_loss failed: " + " | ".join(proc.stderr.strip().splitlines()[-4:]))
            return {"rows": json.loads(out.read_text())}

    def kernels():
        from benchmarks import kernel_report

        lines = {}
        for name, gpu in kernel_report.GPUS.items():
            if name == "h100":
                lines = {path: kernel_report.roofline_lines(path, FULL_MODELS["qwen2.5-7b"], FULL_VOCAB, FULL_TOKENS,
                                                            gpu, _report_rows())
                         for path in ("triton", "native")}
        measured = {backend: profile_kernels(backend, FULL_MODELS["qwen2.5-7b"]) for backend in backends}
        return {"profiled_s": measured, "roofline_h100": lines,
                "device": _torch().cuda.get_device_name(), "floor_s": 6.0 * FULL_TOKENS * FULL_MODELS["qwen2.5-7b"]
                * FULL_VOCAB / kernel_report.H100_BF16_FLOPS}

    return [Check("bench/kernel_times_vs_roofline", kernels, 30), Check("bench/bench_loss_full_size", bench, 150)]


def _report_rows() -> list[dict]:
    path = ROOT / "benchmarks" / "results" / "kernel_report.json"
    try:
        return json.loads(path.read_text()).get("rows", [])
    except (OSError, ValueError):
        return []


class TemporaryPath:
    """A path in a fresh temporary folder, removed on exit."""

    def __init__(self, name):
        import tempfile

        self._dir = tempfile.TemporaryDirectory()
        self.path = Path(self._dir.name) / name

    def __enter__(self):
        return self.path

    def __exit__(self, *exc):
        self._dir.cleanup()


# ----------------------------------------------------------------------------------------------
# selection, running, reporting
# ----------------------------------------------------------------------------------------------

def all_checks(backends=("triton", "native"), deadline: Callable[[], float] = lambda: 1e9) -> list[Check]:
    """Every check, in running order: the 7B-shape agreement first (the most telling minute), then the
    case tables, the native ops, the other full-size checks, and the benchmarks last (they take the
    time that is left)."""
    full = full_size_checks(backends)
    first = [c for c in full if c.name.startswith("full/qwen2.5-7b/")]
    rest = [c for c in full if c not in first]
    return first + case_checks(backends) + native_op_checks() + rest + bench_checks(backends, deadline)


def select(checks: list[Check], only=(), skip=()) -> list[Check]:
    """Checks whose name contains any of `only` (all when empty) and none of `skip`."""
    return [c for c in checks if (not only or any(o in c.name for o in only)) and not any(s in c.name for s in skip)]


def available_backends() -> tuple[list[str], dict]:
    """The GPU backends that can run here, and why the others cannot."""
    torch = _torch()
    from oreal.ops import backends

    names, reasons = [], {}
    for name in ("triton", "native"):
        reason = backends.unavailable_reason(name, torch.device("cuda"))
        if reason is None:
            names.append(name)
        else:
            reasons[name] = reason
    return names, reasons


def write_json(path: Path | None, report: dict) -> None:
    if path is None:
        return
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(report, indent=1, default=str) + "\n")
    os.replace(tmp, path)


def run_checks(checks: list[Check], report: dict, path: Path | None, deadline: Callable[[], float]) -> bool:
    failed = False
    for check in checks:
        left = deadline()
        start = time.perf_counter()
        if left < check.cost_s:
            verdict, details = "SKIP", {"reason": f"time box: {left:.0f} s left, needs ~{check.cost_s:.0f} s"}
        else:
            try:
                verdict, details = "PASS", check.run()
            except Skip as exc:
                verdict, details = "SKIP", {"reason": str(exc)}
            except Exception as exc:  # noqa: BLE001 - every failure is reported and the run goes on
                verdict = "FAIL"
                details = {"error": f"{type(exc).__name__}: {exc}"[:2000],
                           "traceback": traceback.format_exc()[-3000:]}
            finally:
                _free_memory()
        seconds = time.perf_counter() - start
        failed |= verdict == "FAIL"
        summary = details.get("reason") or details.get("error") or ""
        print(f"{verdict} {check.name} {seconds:.1f}s {summary}"[:400], flush=True)
        report["checks"].append({"name": check.name, "verdict": verdict, "seconds": seconds, "details": details})
        write_json(path, report)
    return failed


def _free_memory() -> None:
    import gc

    gc.collect()
    torch = _torch()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="write the results here (rewritten after every check)")
    parser.add_argument("--budget-s", type=float, default=420.0,
                        help="time box for all checks (seconds); a started check may overrun it by its own length")
    parser.add_argument("--only", nargs="*", default=[], help="run the checks whose name contains one of these")
    parser.add_argument("--skip", nargs="*", default=[], help="leave out the checks whose name contains one of these")
    parser.add_argument("--list", action="store_true", help="print the check names and exit")
    args = parser.parse_args(argv)
    started = time.perf_counter()

    def left() -> float:
        return args.budget_s - (time.perf_counter() - started)

    if args.list:
        for check in select(all_checks(), args.only, args.skip):
            print(check.name)
        return 0
    torch = _torch()
    report = {"started": time.strftime("%Y-%m-%dT%H:%M:%S"), "argv": sys.argv[1:], "checks": []}
    if not torch.cuda.is_available():
        print("gpu_acceptance: skipped: no CUDA device (torch.cuda.is_available() is False)")
        report.update(skipped=True, reason="no CUDA device")
        write_json(args.json, report)
        return 0
    os.environ.pop("TRITON_INTERPRET", None)  # compiled kernels, never the interpreter
    sys.path.insert(0, str(TESTS))  # the shared case tables
    backends, unavailable = available_backends()
    report.update(device=torch.cuda.get_device_name(), device_count=torch.cuda.device_count(),
                  capability=list(torch.cuda.get_device_capability()), torch=torch.__version__,
                  cuda=torch.version.cuda, python=platform.python_version(), backends=backends,
                  unavailable=unavailable)
    try:
        import triton

        report["triton"] = triton.__version__
    except ImportError:
        pass
    print(f"gpu_acceptance on {report['device']} x{report['device_count']}, backends {backends}, "
          f"budget {args.budget_s:.0f} s", flush=True)
    for name, reason in unavailable.items():
        print(f"FAIL backend/{name} 0.0s unavailable: {reason}"[:400], flush=True)
        report["checks"].append({"name": f"backend/{name}", "verdict": "FAIL", "seconds": 0.0,
                                 "details": {"error": reason}})
    write_json(args.json, report)
    checks = select(all_checks(backends, left), args.only, args.skip)
    failed = run_checks(checks, report, args.json, left) or bool(unavailable)
    counts = {v: sum(c["verdict"] == v for c in report["checks"]) for v in ("PASS", "FAIL", "SKIP")}
    report.update(finished=time.strftime("%Y-%m-%dT%H:%M:%S"), seconds=time.perf_counter() - started, counts=counts)
    write_json(args.json, report)
    print(f"gpu_acceptance: {counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped "
          f"in {report['seconds']:.0f} s", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
