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

`roofline` (per model; `roofline_lines`): one line per kernel of each GPU path (Triton, native),
with its FLOPs and DRAM bytes over the batch, the compute-bound time (FLOPs / peak) and the
memory-bound time (bytes / bandwidth) on H100 and A100, and an estimate: operand streaming overlaps
the tensor cores, so a kernel takes max(compute, streamed bytes); bytes a GEMM writes or
read-modify-writes in its epilogue after its main loop overlap only when another CTA shares the SM
(occupancy from the sm_90a/sm_80 registers and shared memory of this report; cuBLAS's persistent
Hopper/Ampere GEMMs overlap them), else they add. `floor_s` is 6 T H V FLOPs at peak: nothing that
computes the loss's three matmuls can beat it. kernels/README.md explains each line.

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
# (dense bf16 tensor-core FLOP/s, HBM bytes/s, registers and shared memory per SM) of the SXM parts
GPUS = {"h100": dict(flops=H100_BF16_FLOPS, bytes_per_s=H100_BYTES_PER_S, arch="sm_90a", regs=65536,
                     smem=228 << 10),
        "a100": dict(flops=312e12, bytes_per_s=2.039e12, arch="sm_80", regs=65536, smem=164 << 10)}
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
    [chunk, V] logit buffer capped at 2 GiB, chunks of equal size."""
    cap = max(1, (2 << 30) // (4 * vocab))
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
# Roofline: one line per kernel of each GPU path, summed against the 6 T H V floor
# ----------------------------------------------------------------------------------------------

def triton_chunk(tokens: int, vocab: int) -> int:
    """Tokens per chunk of the Triton path (oreal_kernels.configs.default_chunk_tokens, bf16)."""
    import torch
    from oreal_kernels import configs

    return configs.default_chunk_tokens(tokens, vocab, torch.bfloat16)


def occupancy(row: dict | None, gpu: dict) -> int:
    """CTAs per SM of a compiled kernel from its registers and shared memory (1 when unknown)."""
    if not row or not row.get("registers"):
        return 1
    threads = 32 * row.get("num_warps", 4)
    by_regs = gpu["regs"] // (-(-row["registers"] // 8) * 8 * threads)
    smem = row.get("shared_dynamic", 0) + row.get("shared_static", 0)
    by_smem = gpu["smem"] // smem if smem else 32
    return max(1, min(by_regs, by_smem))


def _line(kernel, flops, streamed, epilogue, overlapped, gpu, why):
    t_compute = flops / gpu["flops"]
    t_stream = streamed / gpu["bytes_per_s"]
    t_epilogue = epilogue / gpu["bytes_per_s"]
    estimate = max(t_compute, t_stream + t_epilogue) if overlapped else max(t_compute, t_stream) + t_epilogue
    return {"kernel": kernel, "flops": float(flops), "bytes": float(streamed + epilogue),
            "epilogue_bytes": float(epilogue), "epilogue_overlapped": overlapped,
            "compute_s": t_compute, "memory_s": t_stream + t_epilogue, "estimate_s": estimate, "why": why}


def roofline_lines(path: str, hidden: int, vocab: int, tokens: int, gpu: dict, rows: list[dict]) -> list[dict]:
    """The kernels of one fused-loss step (forward + backward, bf16) on the `path` ("triton" or "native")."""
    b, T, H, V = BF16, tokens, hidden, vocab
    gemm = 2.0 * T * V * H
    if path == "triton":
        chunks = -(-T // triton_chunk(T, V))
        compiled = {r["kernel"]: r for r in rows if r.get("source") == "triton" and r.get("arch") == gpu["arch"]
                    and r.get("hidden") == hidden}
        over = {k: occupancy(compiled.get(k), gpu) >= 2 for k in ("logits_lse_fwd", "grad_hidden", "grad_weight")}
        return [
            _line("logits_lse_fwd", gemm, T * H * b + chunks * V * H * b, T * V * b + 16 * T * 64,
                  over["logits_lse_fwd"], gpu, "z = h W^T on tensor cores; streams h and W once per chunk, "
                  "stores the bf16 logits and (max, sum, dot, stored-sum) partials"),
            _line("softmax_grad", 4.0 * T * V, 2 * T * V * b, 0, True, gpu,
                  "reads the stored logits, writes dz in place: memory-bound"),
            _line("grad_hidden", gemm, T * V * b + chunks * V * H * b, T * H * b, over["grad_hidden"], gpu,
                  "dz @ W; its epilogue writes only T x H"),
            _line("grad_weight", gemm, T * V * b + T * H * b,
                  4 * V * H + (chunks - 1) * 8 * V * H, over["grad_weight"], gpu,
                  f"dz^T @ h into the fp32 [V, H] buffer: written by the first of {chunks} chunks, read and "
                  "written by each later one"),
            _line("token_rm_weights", 10.0 * T, T * (4 + 8 + 4), 0, True, gpu, "segmented scan, T floats"),
        ]
    chunks = -(-T // default_cuda_chunk(T, V))
    return [
        _line("logits (cuBLAS, fp32 out)", gemm, T * H * b + chunks * V * H * b, T * V * 4, True, gpu,
              "bf16 GEMM with fp32 output (exact log-softmax inputs); persistent cuBLAS kernels overlap "
              "the epilogue"),
        _line("row_pass (CUDA)", 11.0 * T * V, T * V * (8 + b), 0, True, gpu,
              "one block per row: the fp32 row read twice (600 KiB does not stay on chip), dz written in bf16"),
        _line("grad_hidden (cuBLAS)", gemm, T * V * b + chunks * V * H * b, T * H * b, True, gpu, "dz @ W"),
        _line("grad_weight (cuBLAS GemmEx)", gemm, T * V * b + T * H * b, 4 * V * H + (chunks - 1) * 8 * V * H,
              True, gpu, f"fp32-accumulating GEMM over {chunks} chunks (beta = 0 on the first)"),
        _line("token_rm_weights (CUDA)", 10.0 * T, T * (4 + 8 + 4), 0, True, gpu, "segmented scan"),
    ]


# `backend="auto"` on a CUDA device picks the native kernels when they are built (oreal/ops/backends.py).
AUTO_CUDA_PATH = "native"


def roofline(tokens: int, rows: list[dict]) -> dict:
    """Per model: floor and estimated H100 time of the default GPU path, the paths' lines on H100 and A100."""
    result = {}
    for model, (hidden, vocab) in MODELS.items():
        entry = {"floor_s": 6.0 * tokens * hidden * vocab / H100_BF16_FLOPS, "tokens": tokens, "hidden": hidden,
                 "vocab": vocab, "path": AUTO_CUDA_PATH, "gpus": {}}
        for name, gpu in GPUS.items():
            floor = 6.0 * tokens * hidden * vocab / gpu["flops"]
            paths = {}
            for path in ("triton", "native"):
                lines = roofline_lines(path, hidden, vocab, tokens, gpu, rows)
                total = sum(line["estimate_s"] for line in lines)
                paths[path] = {"estimate_s": total, "vs_floor": total / floor, "lines": lines}
            entry["gpus"][name] = {"floor_s": floor, "paths": paths}
        entry["estimate_s"] = entry["gpus"]["h100"]["paths"][AUTO_CUDA_PATH]["estimate_s"]
        entry["vs_floor"] = entry["estimate_s"] / entry["floor_s"]
        result[model] = entry
    return result


def roofline_markdown(report: dict) -> list[str]:
    lines = ["", "Roofline (bf16, one forward + backward step; ms; estimate = max(compute, streamed bytes) "
             "+ epilogue bytes not overlapped):", "",
             "| model | gpu | path | kernel | GFLOP | GB | compute ms | memory ms | estimate ms |",
             "|---|---|---|---|---|---|---|---|---|"]
    for model, entry in report["roofline"].items():
        for gpu, info in entry["gpus"].items():
            for path, data in info["paths"].items():
                for line in data["lines"]:
                    lines.append(f"| {model} | {gpu} | {path} | {line['kernel']} | {line['flops'] / 1e9:.0f} "
                                 f"| {line['bytes'] / 1e9:.2f} | {line['compute_s'] * 1e3:.2f} "
                                 f"| {line['memory_s'] * 1e3:.2f} | {line['estimate_s'] * 1e3:.2f} |")
                lines.append(f"| {model} | {gpu} | {path} | **total** (floor {info['floor_s'] * 1e3:.1f} ms) | | | | "
                             f"| **{data['estimate_s'] * 1e3:.1f} ({data['vs_floor']:.2f}x floor)** |")
    return lines


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
    if report.get("roofline"):
        lines += roofline_markdown(report)
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
                                                               "bytes_per_s": H100_BYTES_PER_S}, "gpus": GPUS,
              "rows": rows, "errors": errors}
    report["checks"] = checks(rows, archs)
    report["roofline"] = roofline(args.tokens, rows)
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
