"""The loss benchmark's providers and the CUDA half of the kernel report, at tiny sizes (no GPU needed)."""

import argparse
import os

import pytest
import torch

from benchmarks import bench_loss, kernel_report
from loss_cases import relative_error
from oreal.ops import native


def _batch(**override):
    args = argparse.Namespace(tokens=64, hidden=16, vocab=97, seqs=4, seed=torch.randint(0, 2**31 - 1, ()).item())
    vars(args).update(override)
    batch = bench_loss.make_batch(args, torch.device("cpu"), torch.float32)
    batch["hidden"].requires_grad_()
    batch["weight"].requires_grad_()
    return batch


def _grads(batch):
    return batch["hidden"].grad.clone(), batch["weight"].grad.clone()


@pytest.mark.parametrize("provider", ["torch", "native"])
def test_fused_providers_agree_with_naive(provider):
    if provider == "native" and native.unavailable_reason(torch.device("cpu")):
        pytest.skip("native backend not built")
    batch = _batch()
    naive_loss, naive_lp, _ = bench_loss.make_provider("naive", batch)()
    naive_grads = _grads(batch)
    bench_loss._clear_grads(batch)
    loss, logprobs, _ = bench_loss.make_provider(provider, batch)()
    assert torch.allclose(loss, naive_loss, rtol=1e-5, atol=1e-7)
    assert torch.allclose(logprobs, naive_lp, rtol=1e-5, atol=1e-5)
    # Norm-relative, as every loss test: one gradient entry can be a cancelling sum (~1e-9 of its terms),
    # where two fp32 summation orders legitimately differ by more than an element-wise 1e-4.
    for ours, theirs in zip(_grads(batch), naive_grads):
        assert relative_error(ours, theirs) < 1e-4


def test_liger_and_floor_providers_run():
    pytest.importorskip("liger_kernel.chunked_loss")
    batch = _batch()
    bench_loss.make_provider("liger", batch)()
    assert batch["hidden"].grad is not None and batch["weight"].grad is not None
    assert batch["hidden"].grad.abs().sum() > 0
    bench_loss.make_provider("floor", batch)()


def test_cuda_kernels_compile_without_spills():
    """csrc/cuda_kernels.cu through `nvcc -Xptxas -v` for sm_80 and sm_90a: every kernel found, no spills."""
    if kernel_report.find_nvcc() is None:
        pytest.skip("no nvcc")
    rows, errors, _ = kernel_report.cuda_rows([80, 90], tokens=16384, num_seqs=64)
    assert not errors, errors
    compiled = [r for r in rows if r["compiled"]]
    kernels = {(r["kernel"].split("<")[0], r["arch"]) for r in compiled}
    assert kernels == {(k, a) for k in ("row_pass_kernel", "token_rm_weights_kernel") for a in ("sm_80", "sm_90a")}
    assert all(r["spills"] == 0 and 0 < r["registers"] <= 128 for r in compiled), compiled
    assert kernel_report.checks(compiled, [80, 90])["zero_spills"]
    # the row kernel is memory-bound: its floor is the one read of the fp32 logits plus one write of dz
    row = next(r for r in compiled if r["kernel"].startswith("row_pass_kernel<__nv_bfloat16"))
    assert row["bytes"] >= row["tokens"] * row["vocab"] * 6 and row["h100_floor_s"] > 0
    assert os.path.exists(kernel_report.CSRC / "cuda_kernels.cu")
