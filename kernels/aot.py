"""Ahead-of-time compilation inputs for every Triton kernel, at production shapes, without a GPU.

`production_kernels(hidden_size, vocab_size, dtype, chunk_tokens, arch=90, loss="oreal")` runs the
real host launchers on `meta` tensors with an assumed device (architecture and SM count), so it
returns exactly the launches a training step would make (`loss="policy"`: those of
`fused_policy_loss`, whose softmax-gradient kernel is the clipped-surrogate specialisation; the other
kernels are the same): each as an `AotKernel` holding the `@triton.jit` function, the
`triton.compile` signature, constexprs and attributes (derived with Triton's own
argument-specialisation rule, as the JIT does), the warps and stages, and its FLOP and DRAM-byte
floor for a whole batch of `total_tokens` tokens.

    for kernel in production_kernels(3584, 152064, torch.bfloat16, 1664, arch=90):
        compiled = kernel.compile()            # triton.compile(kernel.source(), target=..., options=...)
        usage = ptxas_usage(compiled, 90)      # registers, spills, shared memory (bundled ptxas -v)
        counts = sass_counts(compiled)         # HGMMA / HMMA / ... in the SASS (bundled cuobjdump)

Architecture 90 compiles for sm_90a (Triton picks the `a` variant, which `wgmma` needs).
The kernels must be the compiled kind: import this module without TRITON_INTERPRET=1.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from . import configs, linear_logprob, token_weights

# Which public loss a report covers: OREAL's, or the clipped surrogate of `fused_policy_loss`.
LOSSES = ("oreal", "policy")
from ._runtime import INTERPRET, SM_COUNT_BY_ARCH, DeviceInfo, KernelLaunch, cdiv

# H100 SXM dense peaks, for the floors (issue 3).
H100_BF16_FLOPS = 989e12
H100_BYTES_PER_S = 3.35e12


@dataclass(frozen=True)
class AotKernel:
    """One distinct launch of a kernel and what it costs over a batch of `total_tokens` tokens."""

    name: str
    launch: KernelLaunch
    arch: int
    signature: dict
    constexprs: dict
    attrs: dict
    launches: int  # per batch
    flops: float  # per batch
    bytes: float  # per batch, the unavoidable DRAM traffic

    @property
    def fn(self):
        return self.launch.fn

    @property
    def options(self) -> dict:
        return {"num_warps": self.launch.num_warps, "num_stages": self.launch.num_stages}

    def source(self):
        from triton.compiler import ASTSource

        return ASTSource(self.fn, self.signature, self.constexprs, self.attrs)

    def target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", self.arch, 32)

    def compile(self):
        import triton

        return triton.compile(self.source(), target=self.target(), options=self.options)

    def floor_seconds(self, peak_flops: float = H100_BF16_FLOPS, bytes_per_s: float = H100_BYTES_PER_S) -> float:
        """Roofline floor of this kernel over the batch: the larger of its compute and memory time."""
        return max(self.flops / peak_flops, self.bytes / bytes_per_s)


def specialise(launch: KernelLaunch) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) for `triton.compile`, as the JIT derives them from the arguments:
    pointers and ints divisible by 16 get `tt.divisibility=16`, ints equal to 1 and None become constexprs.
    Meta tensors report address 0, i.e. 16-byte aligned, as every allocation and chunk slice is at
    these shapes."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    fn = launch.fn
    signature, constexprs, attrs = {}, {}, {}
    for index, name in enumerate(fn.arg_names):
        if name in launch.constexprs:
            signature[name] = "constexpr"
            constexprs[(index,)] = launch.constexprs[name]
            continue
        kind, attr = native_specialize_impl(BaseBackend, launch.args[name], False, True, True)
        signature[name] = kind
        if kind == "constexpr":
            constexprs[(index,)] = attr
        elif attr:
            attrs[(index,)] = BaseBackend.parse_attr(attr)
    return signature, constexprs, attrs


def _element_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _launch_cost(launch: KernelLaunch, hidden_size: int, vocab_size: int, dtype: torch.dtype) -> tuple[float, float]:
    """(FLOPs, DRAM bytes) floor of one launch; README.md lists the same formulas."""
    b = _element_bytes(dtype)
    args = launch.args
    if launch.name == "logits_lse_fwd":
        c, h, v = args["num_tokens"], hidden_size, vocab_size
        splits = launch.grid[0] // cdiv(c, launch.constexprs["BLOCK_T"])
        return 2.0 * c * v * h, float(c * h * b + v * h * b + c * v * b + 12 * splits * c + 12 * c)
    if launch.name == "softmax_grad":
        c, v = args["logits_ptr"].shape
        # the clipped surrogate also reads advantages, old log-probs and KL scales, writes ratio and clip flag
        per_token = 24 + (20 if launch.constexprs["LOSS_MODE"] == linear_logprob.LOSS_CLIPPED_SURROGATE else 0)
        return 4.0 * c * v, float(2 * c * v * b + 12 * args["num_splits"] * c + per_token * c)
    if launch.name in ("grad_hidden", "grad_weight"):
        m, n, k = args["M"], args["N"], args["K"]
        c_bytes = args["c_ptr"].element_size() * m * n
        if launch.name == "grad_weight":  # fp32 accumulator: write, plus read when accumulating
            moved = m * k * b + k * n * b + c_bytes * (2 if launch.constexprs["ACCUMULATE"] else 1)
        else:  # dz, the weight, and the (hidden-dtype) output
            moved = m * k * b + k * n * b + m * n * b
        return 2.0 * m * n * k, float(moved)
    if launch.name == "token_rm_weights":
        t = args["labels_ptr"].shape[0]
        s = args["positive_ptr"].shape[0]
        return 10.0 * t, float(t * (args["scores_ptr"].element_size() + args["labels_ptr"].element_size() + 4)
                               + s * 12)
    raise KeyError(launch.name)


def production_kernels(hidden_size: int, vocab_size: int, dtype: torch.dtype = torch.bfloat16,
                       chunk_tokens: int | None = None, *, arch: int = 90, total_tokens: int = 16384,
                       num_sequences: int = 64, sm_count: int | None = None, loss: str = "oreal") -> list[AotKernel]:
    """Every distinct kernel launch of one `fused_oreal_loss` call (`loss="oreal"`) or one
    `fused_policy_loss` call (`loss="policy"`, with a KL term: the superset specialisation) on
    `total_tokens` packed tokens (`num_sequences` sequences), with the chunking and block sizes the
    launchers would pick on a GPU of architecture `arch` (80 = A100, 90 = H100 as sm_90a) with
    `sm_count` SMs (default: that part's)."""
    if loss not in LOSSES:
        raise ValueError(f"loss: {loss!r} is not one of {', '.join(LOSSES)}")
    if INTERPRET:
        raise RuntimeError("oreal_kernels.aot: TRITON_INTERPRET=1 is set, so the kernels were built for the "
                           "interpreter; run the ahead-of-time report in a process without it")
    if dtype not in linear_logprob.SUPPORTED_DTYPES:
        raise ValueError(f"dtype: {dtype} is not supported (bf16, fp16 or fp32)")
    device = DeviceInfo(arch=arch, sm_count=sm_count or SM_COUNT_BY_ARCH.get(arch, 132))
    chunk = min(chunk_tokens or configs.default_chunk_tokens(total_tokens, vocab_size, dtype), total_tokens)
    meta = dict(device="meta")
    hidden = torch.empty((total_tokens, hidden_size), dtype=dtype, **meta)
    weight = torch.empty((vocab_size, hidden_size), dtype=dtype, **meta)
    labels = torch.empty(total_tokens, dtype=torch.int64, **meta)
    floats = [torch.empty(total_tokens, dtype=torch.float32, **meta) for _ in range(5)]
    pg_coef, ref, logprobs, entropy, token_loss = floats
    scalar = torch.empty((), dtype=torch.float32, **meta)
    surrogate = None
    if loss == "policy":  # token scale in pg_coef's place, per-token KL scales in the 0-d KL weight's
        kl_scale = torch.empty(total_tokens, dtype=torch.float32, **meta)
        statistics = torch.empty((2, total_tokens), dtype=torch.float32, **meta)
        surrogate = linear_logprob.ClippedSurrogate(torch.empty_like(kl_scale), torch.empty_like(kl_scale),
                                                    statistics[0], statistics[1], 0.2, 0.28)
    grad_hidden = torch.empty_like(hidden)
    grad_weight = torch.empty((vocab_size, hidden_size), dtype=torch.float32, **meta)
    buffers = linear_logprob.ChunkBuffers(chunk, vocab_size, hidden_size, dtype, "meta", device)

    distinct: dict[tuple, AotKernel] = {}

    def record(launch: KernelLaunch):
        signature, constexprs, attrs = specialise(launch)
        key = (launch.name, tuple(sorted(signature.items())), tuple(sorted(constexprs.items(), key=str)),
               tuple(sorted(attrs)), launch.num_warps, launch.num_stages)
        flops, moved = _launch_cost(launch, hidden_size, vocab_size, dtype)
        if key in distinct:
            old = distinct[key]
            distinct[key] = AotKernel(old.name, old.launch, arch, signature, constexprs, attrs,
                                      old.launches + 1, old.flops + flops, old.bytes + moved)
        else:
            distinct[key] = AotKernel(launch.name, launch, arch, signature, constexprs, attrs, 1, flops, moved)

    for start in range(0, total_tokens, chunk):
        part = slice(start, min(start + chunk, total_tokens))
        kl = scalar if surrogate is None else kl_scale[part]
        for launch in linear_logprob.chunk_launches(
                hidden[part], weight, labels[part], pg_coef[part], ref[part], kl, scalar,
                (logprobs[part], entropy[part], token_loss[part]), (grad_hidden[part], grad_weight), buffers,
                1.0, device, first_chunk=start == 0, surrogate=None if surrogate is None else surrogate.chunk(part)):
            record(launch)

    if loss == "policy":  # fused_policy_loss has no token-RM weights
        return list(distinct.values())
    cu_seqlens = torch.empty(num_sequences + 1, dtype=torch.int32, **meta)
    positive = torch.empty(num_sequences, dtype=torch.int32, **meta)
    record(token_weights.plan_token_rm_weights(floats[0], labels, cu_seqlens, positive, floats[1], device))
    return list(distinct.values())


# ---- inspection helpers (Triton's bundled CUDA tools; no GPU needed) ----

def _nvidia_tool(name: str) -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def sm_name(arch: int) -> str:
    return "sm_90a" if arch == 90 else f"sm_{arch}"


# The same kernel in several reports of one process (e.g. the matmuls of both loss modes) is
# inspected once: results by digest of its PTX (and architecture) or cubin.
_PTXAS_USAGE: dict[tuple[str, int], dict] = {}
_SASS_COUNTS: dict[str, Counter] = {}


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def ptxas_usage(compiled, arch: int) -> dict:
    """Registers, spill bytes, shared and stack bytes from the bundled `ptxas -v` on the kernel's PTX
    (the flags Triton itself uses to build the cubin)."""
    ptx = compiled.asm["ptx"]
    key = (_digest(ptx.encode()), arch)
    if key not in _PTXAS_USAGE:
        _PTXAS_USAGE[key] = _run_ptxas(ptx, arch)
    return {**_PTXAS_USAGE[key], "shared_dynamic": int(compiled.metadata.shared)}


def _run_ptxas(ptx_text: str, arch: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "kernel.ptx")
        Path(ptx).write_text(ptx_text)
        result = subprocess.run([_nvidia_tool("ptxas"), "-v", "--regAllocOptLevel=2", f"--gpu-name={sm_name(arch)}",
                                 ptx, "-o", os.path.join(tmp, "kernel.cubin")],
                                capture_output=True, text=True, check=True)
    log = result.stdout + result.stderr

    def number(pattern: str) -> int:
        match = re.search(pattern, log)
        return int(match.group(1)) if match else 0

    return {
        "registers": number(r"Used (\d+) registers"),
        "spill_stores": number(r"(\d+) bytes spill stores"),
        "spill_loads": number(r"(\d+) bytes spill loads"),
        "stack_frame": number(r"(\d+) bytes stack frame"),
        "shared_static": number(r"(\d+) bytes smem"),
        "log": log,
    }


def sass_counts(compiled) -> Counter:
    """How often each SASS opcode (e.g. HGMMA, HMMA, MUFU) occurs in the kernel's cubin."""
    cubin = compiled.asm["cubin"]
    key = _digest(cubin)
    if key not in _SASS_COUNTS:
        _SASS_COUNTS[key] = _run_cuobjdump(cubin)
    return Counter(_SASS_COUNTS[key])


def _run_cuobjdump(cubin_bytes: bytes) -> Counter:
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "kernel.cubin")
        Path(cubin).write_bytes(cubin_bytes)
        sass = subprocess.run([_nvidia_tool("cuobjdump"), "-sass", cubin], capture_output=True, text=True,
                              check=True).stdout
    counts = Counter()
    for match in re.finditer(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", sass):
        counts[match.group(1)] += 1
    return counts


# ---- command line: a quick table, also what tests/kernels/test_triton_aot.py runs ----

def report_rows(hidden_size: int, vocab_size: int, dtype: torch.dtype, archs, *, total_tokens: int = 16384,
                chunk_tokens: int | None = None, loss: str = "oreal") -> list[dict]:
    rows = []
    for arch in archs:
        for kernel in production_kernels(hidden_size, vocab_size, dtype, chunk_tokens, arch=arch,
                                         total_tokens=total_tokens, loss=loss):
            compiled = kernel.compile()
            usage = ptxas_usage(compiled, arch)
            counts = sass_counts(compiled)
            rows.append({
                "kernel": kernel.name, "fn": kernel.fn.__name__, "loss": loss, "arch": sm_name(arch),
                "hidden": hidden_size,
                "vocab": vocab_size, "dtype": str(dtype).replace("torch.", ""), "tokens": total_tokens,
                "grid": list(kernel.launch.grid), **kernel.options,
                "constexprs": {kernel.fn.arg_names[k[0]]: v for k, v in kernel.constexprs.items()},
                **{k: v for k, v in usage.items() if k != "log"},
                "HGMMA": counts["HGMMA"], "HMMA": counts["HMMA"],
                "launches": kernel.launches, "flops": kernel.flops, "bytes": kernel.bytes,
                "h100_floor_s": kernel.floor_seconds(),
            })
    return rows


def main(argv=None) -> None:
    import argparse
    import json

    parser = argparse.ArgumentParser(description="Compile every oreal_kernels launch ahead of time and report "
                                                 "registers, spills, shared memory and tensor-core instructions.")
    parser.add_argument("--hidden", type=int, default=3584)
    parser.add_argument("--vocab", type=int, default=152064)
    parser.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--chunk", type=int, default=None)
    parser.add_argument("--loss", choices=LOSSES, default="oreal",
                        help="the launches of fused_oreal_loss, or of fused_policy_loss (clipped surrogate)")
    parser.add_argument("--json", action="store_true", help="print one JSON list instead of a table")
    args = parser.parse_args(argv)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    rows = report_rows(args.hidden, args.vocab, dtype, args.arch, total_tokens=args.tokens, chunk_tokens=args.chunk,
                       loss=args.loss)
    if args.json:
        print(json.dumps(rows))
        return
    print(f"{'kernel':<18}{'arch':<8}{'warps':>6}{'regs':>6}{'spill':>7}{'smem':>8}{'HGMMA':>7}{'HMMA':>6}"
          f"{'launches':>9}{'floor ms':>10}")
    for r in rows:
        print(f"{r['kernel']:<18}{r['arch']:<8}{r['num_warps']:>6}{r['registers']:>6}"
              f"{r['spill_stores'] + r['spill_loads']:>7}{r['shared_dynamic']:>8}{r['HGMMA']:>7}{r['HMMA']:>6}"
              f"{r['launches']:>9}{r['h100_floor_s'] * 1e3:>10.3f}")


if __name__ == "__main__":
    main()
