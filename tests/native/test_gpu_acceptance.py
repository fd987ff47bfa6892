"""benchmarks/gpu_acceptance.py on a machine without CUDA: its skip path, its case selection, its
guarded and time-boxed runner, and its batch/loss/compare helpers on CPU tensors (the same code that
runs on the GPU, so that the first GPU run has as little new code as possible)."""

import json

import pytest
import torch

from benchmarks import gpu_acceptance as ga
from oreal.ops import native


def test_without_cuda_it_prints_skipped_and_exits_zero(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "acceptance.json"
    assert ga.main(["--json", str(out)]) == 0
    assert "skipped" in capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["skipped"] is True and report["checks"] == []


def test_check_names_are_unique_and_cover_the_issue():
    names = [c.name for c in ga.all_checks()]
    assert len(names) == len(set(names))
    for needed in ("cases/triton/fp32_oreal", "cases/native/low_precision_confident",
                   "cases/native/fp16_large_token_counts_and_grad_output", "full/qwen2.5-7b/oreal/native",
                   "full/qwen2.5-32b/policy/triton", "full/chunk_size_T/native", "full/small_and_odd_T/triton",
                   "full/bitwise_repeatable/native", "full/no_grad_logprobs/triton", "full/second_device/native",
                   "full/side_stream/triton", "native/opcheck", "native/compile_fullgraph",
                   "bench/bench_loss_full_size", "bench/kernel_times_vs_roofline"):
        assert needed in names
    assert names[0].startswith("full/qwen2.5-7b/") and names[-1].startswith("bench/")


def test_selection_by_substring(capsys):
    checks = ga.all_checks(("native",))
    picked = ga.select(checks, only=["full/"], skip=["32b", "side_stream"])
    assert picked and all(c.name.startswith("full/") and "32b" not in c.name and "side_stream" not in c.name
                          for c in picked)
    assert all("triton" not in c.name for c in checks)
    assert ga.main(["--list", "--only", "opcheck"]) == 0
    assert capsys.readouterr().out.split() == ["native/opcheck"]


def test_runner_guards_each_check_and_keeps_the_json_current(tmp_path, capsys):
    out = tmp_path / "r.json"
    seen = []

    def passing():
        seen.append(json.loads(out.read_text())["checks"][-1]["verdict"])  # the failure is already written
        return {"x": 1}

    def failing():
        raise AssertionError("bound exceeded")

    def skipping():
        raise ga.Skip("one CUDA device")

    checks = [ga.Check("a/fails", failing, 1), ga.Check("b/passes", passing, 1), ga.Check("c/skips", skipping, 1),
              ga.Check("d/too_long", passing, 10_000)]
    report = {"checks": []}
    ga.write_json(out, report)
    assert ga.run_checks(checks, report, out, lambda: 100.0) is True
    verdicts = [c["verdict"] for c in json.loads(out.read_text())["checks"]]
    assert verdicts == ["FAIL", "PASS", "SKIP", "SKIP"] and seen == ["FAIL"]
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("FAIL a/fails") and "bound exceeded" in printed[0]
    assert printed[3].startswith("SKIP d/too_long") and "time box" in printed[3]


@pytest.mark.skipif(native.unavailable_reason(torch.device("cpu")) is not None, reason="native not built")
@pytest.mark.parametrize("mode", ["oreal", "policy"])
def test_helpers_on_cpu_tensors(mode):
    """full_batch, run_loss and compare as the GPU checks use them, at a small shape on the CPU."""
    batch = ga.full_batch(48, 70, seed=3, device="cpu", vocab=301, num_seqs=4)
    assert batch["hidden"].dtype == torch.bfloat16 and (batch["labels"] == -100).any()
    reference = ga.run_loss(batch, "torch", mode=mode, dtype=torch.float32)
    ours = ga.run_loss(batch, "native", mode=mode)
    errors = ga.compare(ours, reference)
    assert errors["grad_hidden_rel"] < ga.FULL_GRAD_RTOL and errors["loss_rel"] < ga.FULL_LOSS_RTOL
    no_grad = ga.run_loss(batch, "native", mode=mode, grad=False)
    assert torch.equal(no_grad["logprobs"], ours["logprobs"])
    with pytest.raises(AssertionError, match="outside bounds"):
        ga.compare({**ours, "grad_weight": ours["grad_weight"] * 1.5}, reference)


@pytest.mark.skipif(native.unavailable_reason(torch.device("cpu")) is not None, reason="native not built")
def test_one_chunk_path_on_cpu_tensors():
    batch = ga.full_batch(32, 50, seed=4, device="cpu", vocab=211, num_seqs=3)
    whole = ga.run_loss(batch, "native", chunk_size=50)
    chunked = ga.run_loss(batch, "native", chunk_size=7)
    ga.compare(whole, chunked)
