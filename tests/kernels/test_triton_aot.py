"""Every Triton kernel compiles ahead of time for sm_80 and sm_90a at Qwen2.5-7B shapes without spilling,
in both loss modes (OREAL's and the clipped surrogate of `fused_policy_loss`), and the matmuls run on
tensor cores (HGMMA on sm_90a, HMMA on sm_80). No GPU needed.

The compilation runs in a subprocess without TRITON_INTERPRET (this folder's conftest sets it, and the
kernels of an interpreting process cannot be compiled).
"""

import inspect
import json
import os
import subprocess
import sys

import pytest
import torch

from oreal_kernels import linear_logprob, matmul, token_weights
from oreal_kernels.linear_logprob import LOSS_CLIPPED_SURROGATE, LOSS_LOGPROB

MATMUL_KERNELS = {"logits_lse_fwd", "grad_hidden", "grad_weight"}
H, V, TOKENS = 3584, 152064, 16384


def launched_kernel_names() -> set[str]:
    """The `_..._kernel` jit functions of the package: what the AOT list must cover."""
    names = set()
    for module in (linear_logprob, matmul, token_weights):
        for name, value in vars(module).items():
            if name.startswith("_") and name.endswith("_kernel") and not inspect.isfunction(value):
                names.add(name)
    return names


SCRIPT = """
import json, torch
from oreal_kernels.aot import report_rows
print(json.dumps({
    "production": report_rows(%d, %d, torch.bfloat16, (80, 90), total_tokens=%d),
    "small": report_rows(5120, %d, torch.bfloat16, (90,), total_tokens=48),
    "policy": report_rows(%d, %d, torch.bfloat16, (80, 90), total_tokens=%d, loss="policy"),
}))
""" % (H, V, TOKENS, V, H, V, TOKENS)


@pytest.fixture(scope="module")
def rows():
    """One subprocess compiles everything: the production launches for sm_80 and sm_90a, the
    launches of a 48-token batch (64-row tiles, many vocabulary splits, split-K) for sm_90a, and the
    production launches of the clipped surrogate for both (only its softmax-gradient kernel differs;
    Triton's cache serves the others)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def production_rows(rows):
    return rows["production"]


def test_every_kernel_compiles_for_both_architectures_without_spills(production_rows):
    for arch in ("sm_80", "sm_90a"):
        rows = [r for r in production_rows if r["arch"] == arch]
        assert {r["fn"] for r in rows} == launched_kernel_names()
        for row in rows:
            assert row["spill_stores"] == 0 and row["spill_loads"] == 0, row
            assert 0 < row["registers"] <= 255, row


def test_matmuls_use_tensor_cores(production_rows):
    for row in production_rows:
        if row["kernel"] in MATMUL_KERNELS:
            if row["arch"] == "sm_90a":
                assert row["HGMMA"] > 0, row  # wgmma, Hopper's warpgroup MMA
            else:
                assert row["HMMA"] > 0 and row["HGMMA"] == 0, row


def test_floors_count_the_three_matmuls_once(production_rows):
    for arch in ("sm_80", "sm_90a"):
        rows = [r for r in production_rows if r["arch"] == arch and r["kernel"] in MATMUL_KERNELS]
        assert sum(r["flops"] for r in rows) == pytest.approx(3 * 2 * TOKENS * V * H, rel=1e-12)
        weight_bytes = torch.tensor([], dtype=torch.bfloat16).element_size() * V * H
        assert all(r["bytes"] >= weight_bytes * r["launches"] for r in rows if r["kernel"] != "grad_weight")


def test_small_batch_configs_compile_on_hopper(rows):
    small = rows["small"]
    assert {r["fn"] for r in small} == launched_kernel_names()
    hidden_grad = next(r for r in small if r["kernel"] == "grad_hidden")
    assert hidden_grad["grid"][1] > 1  # split-K
    for row in small:
        assert row["spill_stores"] == 0 and row["spill_loads"] == 0, row
        if row["kernel"] in MATMUL_KERNELS:
            assert row["HGMMA"] > 0, row


def test_clipped_surrogate_mode_compiles_for_both_architectures_without_spills(rows, production_rows):
    """`fused_policy_loss`'s launches: the softmax-gradient kernel in its second loss mode, and the same
    forward and gradient matmuls as OREAL's (no token-RM scan)."""
    policy = rows["policy"]
    for arch in ("sm_80", "sm_90a"):
        arch_rows = [r for r in policy if r["arch"] == arch]
        assert {r["fn"] for r in arch_rows} == launched_kernel_names() - {"_token_rm_weights_kernel"}
        for row in arch_rows:
            assert row["spill_stores"] == 0 and row["spill_loads"] == 0, row
            assert 0 < row["registers"] <= 255, row
            if row["kernel"] in MATMUL_KERNELS:
                assert row["HGMMA" if arch == "sm_90a" else "HMMA"] > 0, row
        modes = {r["constexprs"]["LOSS_MODE"] for r in arch_rows if r["kernel"] == "softmax_grad"}
        assert modes == {LOSS_CLIPPED_SURROGATE}
    oreal_modes = {r["constexprs"]["LOSS_MODE"] for r in production_rows if r["kernel"] == "softmax_grad"}
    assert oreal_modes == {LOSS_LOGPROB}
