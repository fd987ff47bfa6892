"""Static GPU kernel report: registers, spills, shared memory, tensor-core instructions and roofline
floors of every Triton and CUDA kernel of the fused loss, compiled ahead of time without a GPU.

    python -m benchmarks.kernel_report --json OUT.json [--markdown OUT.md] [--save]

- Triton (`kernels/`, `oreal_kernels.aot`): every distinct launch of one `fused_oreal_loss` call at
  production shapes (Qwen2.5-7B: H=3584, 32B: H=5120; V=152064; bf16; a 16k-token batch), compiled
  with `triton.compile` for sm_80 and sm_90a; registers, spills and shared memory from Triton's
  bundled `ptxas -v`, HGMMA/HMMA counts from its bundled `cuobjdump -sass`. Runs in a subprocess
  without TRITON_INTERPRET (interpreted kernels cannot be compiled).
- CUDA (`csrc/cuda_kernels.cu`): compiled to a cubin with `nvcc -Xptxas -v` for the same
  architectures, with the nvcc flags torch's extension build uses; the same counts per kernel. The
  matmuls of the native path run in cuBLAS: they get floor-only rows (`compiled: false`).

Every row carries the kernel's FLOP and DRAM-byte floor over the whole batch and the H100 time
floor max(FLOPs / 989 TFLOP/s, bytes / 3.35 TB/s) (dense bf16 tensor-core peak and HBM3
bandwidth; the element-wise kernels are memory-bound, so their floor is the byte term). For the CUDA
row kernel, `model_bytes` is what it actually moves (two reads of the fp32 logits: a 600 KiB row
does not stay on chip between its passes), against `bytes`, the unavoidable one read and one write.

`checks` (also the exit code, non-zero when one fails): zero spills in every compiled kernel at
every architecture, and HGMMA instructions in each Triton matmul kernel on sm_90a.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).parent / "results"
CSRC = ROOT / "csrc"
MODELS = {"qwen2.5-7b": (3584, 152064), "qwen2.5-32b": (5120, 152064)}
H100_BF16_FLOPS = 989e12
H100_BYTES_PER_S = 3.35e12
TRITON_MATMULS = ("logits_lse_fwd", "grad_hidden", "grad_weight")
BF16 = 2


def floor_seconds(flops: float, moved: float) -> float:
    return max(flops / H100_BF16_FLOPS, moved / H100_BYTES_PER_S)


# ----------------------------------------------------------------------------------------------
# Triton kernels: oreal_kernels.aot (written beside the kernels) in a clean subprocess
# ----------------------------------------------------------------------------------------------

_TRITON_SCRIPT = """
import json, sys, torch
from oreal_kernels.aot import report_rows
hidden, vocab, tokens = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
archs = [int(a) for a in sys.argv[4].split(",")]
print(json.dumps(report_rows(hidden, vocab, torch.bfloat16, archs, total_tokens=tokens)))
"""


def triton_rows(archs: list[int], tokens: int, timeout: float) -> tuple[list[dict], list[str]]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    rows, errors = [], []
    for model, (hidden, vocab) in MODELS.items():
        proc = subprocess.run([sys.executable, "-c", _TRITON_SCRIPT, str(hidden), str(vocab), str(tokens),
                               ",".join(map(str, archs))], env=env, cwd=ROOT, capture_output=True, text=True,
                              timeout=timeout)
        if proc.returncode != 0:
            errors.append(f"triton {model}: " + " | ".join(proc.stderr.strip().splitlines()[-3:]))
            continue
        for row in json.loads(proc.stdout.strip().splitlines()[-1]):
            row.pop("log", None)
            rows.append({"source": "triton", "model": model, "compiled": True, **row,
                         "spills": row.get("spill_stores", 0) + row.get("spill_loads", 0)})
    return rows, errors


# ----------------------------------------------------------------------------------------------
# CUDA kernels: nvcc -Xptxas -v on csrc/cuda_kernels.cu
# ----------------------------------------------------------------------------------------------

def find_nvcc() -> str | None:
    """nvcc as setup.py finds it: CUDA_HOME, then the conventional install locations, then PATH."""
    import torch

    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    if torch.version.cuda:
        homes.append(f"/usr/local/cuda-{torch.version.cuda}")
    homes.append("/usr/local/cuda")
    for home in homes:
        if home and os.path.isfile(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


def find_cuobjdump(nvcc: str) -> str | None:
    candidates = [os.path.join(os.path.dirname(nvcc), "cuobjdump")]
    try:
        import triton

        candidates.append(str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"))
    except ImportError:
        pass
    return next((c for c in candidates if os.path.isfile(c)), None)


def gencode(arch: int) -> tuple[str, str]:
    """(gencode flag, SM name); Hopper as sm_90a, the variant with wgmma."""
    sm = "90a" if arch == 90 else str(arch)
    return f"arch=compute_{sm},code=sm_{sm}", f"sm_{sm}"


def demangle(names: list[str]) -> dict[str, str]:
    tool = shutil.which("c++filt")
    if not tool or not names:
        return {n: n for n in names}
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


def parse_ptxas(log: str) -> dict[str, dict]:
    """Per mangled kernel name: registers, spills, stack, shared memory from `ptxas -v` output."""
    kernels: dict[str, dict] = {}
    current = None
    for line in log.splitlines():
        match = re.search(r"Compiling entry function '([^']+)'", line)
        if match:
            current = kernels.setdefault(match.group(1), {})
            continue
        if current is None:
            continue
        match = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if match:
            current.update(stack_frame=int(match.group(1)), spill_stores=int(match.group(2)),
                           spill_loads=int(match.group(3)))
        match = re.search(r"Used (\d+) registers", line)
        if match:
            current["registers"] = int(match.group(1))
            smem = re.search(r"(\d+) bytes smem", line)
            current["shared_static"] = int(smem.group(1)) if smem else 0
    return kernels


def sass_counts(cuobjdump: str, cubin: str) -> dict[str, Counter]:
    """Opcode counts per kernel (mangled name) of a cubin."""
    sass = subprocess.run([cuobjdump, "-sass", cubin], capture_output=True, text=True, check=True).stdout
    counts: dict[str, Counter] = {}
    current = None
    for line in sass.splitlines():
        match = re.match(r"\s*Function : (\S+)", line)
        if match:
            current = counts.setdefault(match.group(1), Counter())
            continue
        match = re.search(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", line)
        if match and current is not None:
            current[match.group(1)] += 1
    return counts


def default_cuda_chunk(tokens: int, vocab: int) -> int:
    """Rows per chunk of the native CUDA path (csrc/linear_logprob.cpp, default_chunk_size): the fp32
    [chunk, V] logit buffer capped at 1 GiB, chunks of equal size."""
    cap = max(1, (1 << 30) // (4 * vocab))
    if tokens <= cap:
        return tokens
    chunks = -(-tokens // cap)
    return -(-tokens // chunks)


def cuda_costs(kernel: str, hidden: int, vocab: int, tokens: int, num_seqs: int) -> dict:
    """FLOP and byte floors over a batch of the native path's kernels (bf16 model, fp32 logits)."""
    elements = tokens * vocab
    per_token = tokens * (8 + 4 + 4 + 4 + 4 + 4)  # label, pg_coef, ref in; logprob, entropy, loss out
    if kernel.startswith("row_pass"):
        grad_bytes = 4 if "<float" in kernel else BF16
        return {"flops": 11.0 * elements, "bytes": float(elements * (4 + grad_bytes) + per_token),
                "model_bytes": float(elements * (8 + grad_bytes) + per_token), "launches": -(-tokens // default_cuda_chunk(tokens, vocab))}
    if kernel.startswith("token_rm_weights"):
        moved = float(tokens * (4 + 8 + 4) + num_seqs * (16 + 1))
        return {"flops": 10.0 * tokens, "bytes": moved, "model_bytes": moved, "launches": 1}
    raise KeyError(kernel)


def cublas_rows(hidden: int, vocab: int, tokens: int, model: str) -> list[dict]:
    chunk = default_cuda_chunk(tokens, vocab)
    chunks = -(-tokens // chunk)
    flops = 2.0 * tokens * vocab * hidden
    rows = [
        ("logits (h @ W^T, bf16 in, fp32 out)", tokens * hidden * BF16 + chunks * vocab * hidden * BF16 + tokens * vocab * 4),
        ("grad_hidden (dz @ W, bf16)", tokens * vocab * BF16 + chunks * vocab * hidden * BF16 + tokens * hidden * BF16),
        ("grad_weight (dz^T @ h, fp32 accumulate, GemmEx)",
         tokens * vocab * BF16 + tokens * hidden * BF16 + chunks * 2 * vocab * hidden * 4),
    ]
    return [{"source": "cublas", "model": model, "kernel": name, "compiled": False, "hidden": hidden, "vocab": vocab,
             "tokens": tokens, "chunk_tokens": chunk, "launches": chunks, "flops": flops, "bytes": float(moved),
             "h100_floor_s": floor_seconds(flops, moved)} for name, moved in rows]


def cuda_rows(archs: list[int], tokens: int, num_seqs: int) -> tuple[list[dict], list[str], dict]:
    nvcc = find_nvcc()
    if nvcc is None:
        return [], ["cuda: no nvcc found (set CUDA_HOME)"], {}
    # torch guesses CUDA_HOME (wrongly, from a wrapper nvcc on PATH) when cpp_extension is imported
    os.environ.setdefault("CUDA_HOME", os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS

    cuobjdump = find_cuobjdump(nvcc)
    info = {"nvcc": nvcc, "nvcc_version": subprocess.run([nvcc, "--version"], capture_output=True,
                                                         text=True).stdout.strip().splitlines()[-1],
            "cuobjdump": cuobjdump}
    rows, errors = [], []
    for arch in archs:
        flag, sm = gencode(arch)
        with tempfile.TemporaryDirectory() as tmp:
            cubin = os.path.join(tmp, "kernels.cubin")
            command = [nvcc, "-cubin", "-O3", "-gencode", flag, "-Xptxas", "-v", "-DOREAL_WITH_CUDA",
                       f"-I{CSRC}", *COMMON_NVCC_FLAGS, str(CSRC / "cuda_kernels.cu"), "-o", cubin]
            proc = subprocess.run(command, capture_output=True, text=True)
            if proc.returncode != 0:
                errors.append(f"cuda {sm}: nvcc failed: " + " | ".join(proc.stderr.strip().splitlines()[-3:]))
                continue
            usage = parse_ptxas(proc.stdout + proc.stderr)
            counts = sass_counts(cuobjdump, cubin) if cuobjdump else {}
        names = demangle(sorted(usage))
        for mangled, stats in sorted(usage.items()):
            pretty = names[mangled].replace("oreal::cuda::", "").split("(")[0].removeprefix("void ")
            opcodes = counts.get(mangled, Counter())
            for model, (hidden, vocab) in MODELS.items():
                cost = cuda_costs(pretty, hidden, vocab, tokens, num_seqs)
                rows.append({"source": "cuda", "model": model, "kernel": pretty, "mangled": mangled, "arch": sm,
                             "compiled": True, "hidden": hidden, "vocab": vocab, "tokens": tokens, **stats,
                             "spills": stats.get("spill_stores", 0) + stats.get("spill_loads", 0),
                             "HGMMA": opcodes["HGMMA"], "HMMA": opcodes["HMMA"], "MUFU": opcodes["MUFU"],
                             "sass_instructions": sum(opcodes.values()), **cost,
                             "h100_floor_s": floor_seconds(cost["flops"], cost["bytes"]),
                             "h100_model_s": floor_seconds(cost["flops"], cost["model_bytes"])})
    for model, (hidden, vocab) in MODELS.items():
        rows += cublas_rows(hidden, vocab, tokens, model)
    return rows, errors, info


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------

def checks(rows: list[dict], archs: list[int]) -> dict:
    compiled = [r for r in rows if r.get("compiled")]
    spilling = [f"{r['source']}:{r['kernel']}@{r['arch']}" for r in compiled if r.get("spills", 0) > 0]
    covered = {(r["source"], r["arch"]) for r in compiled}
    result = {"zero_spills": bool(compiled) and not spilling, "spilling_kernels": spilling,
              "compiled_sources_and_archs": sorted(f"{s}@{a}" for s, a in covered)}
    if 90 in archs:
        matmuls = [r for r in compiled if r["source"] == "triton" and r["kernel"] in TRITON_MATMULS
                   and r["arch"] == "sm_90a"]
        without = sorted({r["kernel"] for r in matmuls if r.get("HGMMA", 0) == 0})
        result["triton_matmul_hgmma_sm90a"] = bool(matmuls) and not without
        result["triton_matmuls_without_hgmma"] = without
    return result


def markdown(report: dict) -> str:
    lines = [f"Kernel report, {report['tokens']}-token batch, bf16 models, {report['timestamp']}; "
             + ", ".join(f"{k} {v}" for k, v in report["versions"].items()), ""]
    lines += ["| source | model | kernel | arch | regs | spills | smem B | HGMMA | HMMA | launches | GFLOP | GB "
              "| H100 floor ms |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        smem = r.get("shared_dynamic", 0) + r.get("shared_static", 0) if r.get("compiled") else None
        cell = (lambda key: "-" if not r.get("compiled") else str(r.get(key, 0)))
        lines.append(f"| {r['source']} | {r['model']} | {r['kernel']} | {r.get('arch', '-')} | {cell('registers')} "
                     f"| {cell('spills')} | {'-' if smem is None else smem} | {cell('HGMMA')} | {cell('HMMA')} "
                     f"| {r.get('launches', '-')} | {r['flops'] / 1e9:.1f} | {r['bytes'] / 1e9:.2f} "
                     f"| {r['h100_floor_s'] * 1e3:.3f} |")
    lines += ["", "Checks: " + ", ".join(f"{k} = {v}" for k, v in report["checks"].items() if not isinstance(v, list))]
    if report["errors"]:
        lines += ["", "Errors: " + "; ".join(report["errors"])]
    return "\n".join(lines) + "\n"


def versions() -> dict:
    import torch

    info = {"torch": torch.__version__}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    return info


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archs", default="80,90", help="comma-separated: 80 (sm_80), 90 (sm_90a)")
    parser.add_argument("--tokens", type=int, default=16384, help="tokens per batch, for the floors")
    parser.add_argument("--seqs", type=int, default=64, help="packed sequences per batch")
    parser.add_argument("--skip-triton", action="store_true")
    parser.add_argument("--skip-cuda", action="store_true")
    parser.add_argument("--timeout", type=float, default=1200, help="seconds per Triton compile subprocess")
    parser.add_argument("--json", type=Path, help="write the report here")
    parser.add_argument("--markdown", type=Path, help="write the markdown tables here")
    parser.add_argument("--save", action="store_true", help="also write benchmarks/results/kernel_report.{json,md}")
    args = parser.parse_args(argv)
    archs = [int(a) for a in args.archs.split(",") if a.strip()]
    if not archs or any(a not in (80, 90) for a in archs):
        parser.error("--archs: choose from 80 and 90")

    rows, errors, tools = [], [], {}
    if not args.skip_triton:
        found, errs = triton_rows(archs, args.tokens, args.timeout)
        rows += found
        errors += errs
    if not args.skip_cuda:
        found, errs, tools = cuda_rows(archs, args.tokens, args.seqs)
        rows += found
        errors += errs
    report = {"tokens": args.tokens, "archs": archs, "models": MODELS, "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "versions": versions(), "tools": tools, "h100": {"bf16_flops": H100_BF16_FLOPS,
                                                               "bytes_per_s": H100_BYTES_PER_S},
              "rows": rows, "errors": errors}
    report["checks"] = checks(rows, archs)
    table = markdown(report)
    print(table)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    if args.markdown:
        args.markdown.write_text(table)
    if args.save:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "kernel_report.json").write_text(json.dumps(report, indent=1) + "\n")
        (RESULTS / "kernel_report.md").write_text(table)
    failed = errors or not all(v for k, v in report["checks"].items() if isinstance(v, bool))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
