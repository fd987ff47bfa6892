"""`oreal-eval`'s pieces without a model: the shipped benchmarks, the metrics, resumable records, engines per GPU."""

from __future__ import annotations

import json
import math
import random
from fractions import Fraction

import pytest

from oreal.runtime.config import Config, ConfigError
from oreal.runtime.eval_cli import (BENCHMARK_DIR, BENCHMARKS, EvalRequest, engine_groups, finished_chunks,
                                    format_table, model_label, read_records, resolve_benchmarks)
from oreal.runtime.heldout import ScoredProblem, chunk_starts, summarize

SEED = random.randrange(1_000_000)


def test_shipped_benchmarks_load_with_the_trainers_reader_and_carry_their_licenses():
    from oreal.data import read_prompt_file

    expected = {"math500": 500, "aime24": 30, "amc23": 40, "gsm8k": 1319}
    assert set(BENCHMARKS) == set(expected)
    for name, (file, _) in BENCHMARKS.items():
        examples = read_prompt_file(BENCHMARK_DIR / file)
        assert len(examples) == expected[name] and all(e.question and e.gold_answer for e in examples), name
    licenses = (BENCHMARK_DIR / "LICENSES.md").read_text()
    assert licenses.count("Permission is hereby granted") == 3 and "Copyright (c) 2021 OpenAI" in licenses
    readme = (BENCHMARK_DIR / "README.md").read_text()
    assert all(file in readme for file, _ in BENCHMARKS.values())


def test_benchmark_names_and_paths(tmp_path):
    mine = tmp_path / "my_set.jsonl"
    mine.write_text(json.dumps({"problem": "1+1", "answer": "2"}) + "\n")
    got = resolve_benchmarks(f"math500, {mine},aime24")
    assert [n for n, _ in got] == ["math500", "my_set", "aime24"] and got[1][1] == str(mine)
    with pytest.raises(ConfigError, match="'math5000' is neither a shipped benchmark"):
        resolve_benchmarks("math5000")
    twin = tmp_path / "other"
    twin.mkdir()
    (twin / "my_set.jsonl").write_text(mine.read_text())
    with pytest.raises(ConfigError, match="share the name 'my_set'"):
        resolve_benchmarks(f"{mine},{twin / 'my_set.jsonl'}")
    assert model_label("runs/oreal_7b/hf") == "oreal_7b" and model_label("models/Qwen2.5-7B") == "Qwen2.5-7B"


def random_problems(rng: random.Random, count: int, n: int) -> list[ScoredProblem]:
    out = []
    for i in range(count):
        correct = [rng.random() < rng.random() for _ in range(n)]
        out.append(ScoredProblem(index=i, uid=f"u{i}", question="q", gold="1", responses=["r"] * n, correct=correct,
                                 lengths=[rng.randint(1, 50) for _ in range(n)],
                                 finish=[rng.choice(["stop", "length"]) for _ in range(n)]))
    return out


def test_summary_metrics_against_exact_fractions():
    rng = random.Random(SEED)
    for n in (1, 2, 5, 16):
        problems = random_problems(rng, rng.randint(1, 30), n)
        s = summarize(problems)
        exact_pass1 = sum(Fraction(sum(p.correct), n) for p in problems) / len(problems)
        assert s["pass@1"] == pytest.approx(float(exact_pass1), rel=1e-12, abs=1e-15)
        if n > 1:  # pass@n: the share of problems with at least one correct sample
            assert s[f"avg@{n}"] == s["pass@1"]
            assert s[f"pass@{n}"] == pytest.approx(sum(any(p.correct) for p in problems) / len(problems), abs=1e-12)
        else:
            assert set(s) == {"pass@1", "problems", "samples", "response_length", "truncated"}
        cut = sum(f == "length" for p in problems for f in p.finish)
        assert s["truncated"] == pytest.approx(cut / (n * len(problems)))
        assert s["problems"] == len(problems) and s["samples"] == n
    with pytest.raises(ValueError):
        summarize([])


def test_table_is_laid_out_like_the_paper():
    summary = {"math500": {"pass@1": 0.9123, "avg@4": 0.9123, "pass@4": 0.97, "problems": 500, "samples": 4,
                           "response_length": 812.4, "truncated": 0.01},
               "mine": {"pass@1": 0.25, "problems": 8, "samples": 1, "response_length": 12.0, "truncated": 0.0}}
    table = format_table(summary, "oreal_7b").splitlines()
    assert table[0] == "| Model | MATH-500 | mine | Average |"
    assert table[2] == "| oreal_7b | 91.2 | 25.0 | 58.1 |"
    assert "| MATH-500 | 500 | 4 | 91.2 | 91.2 (n=4) | 97.0 (n=4) | 812 | 1.0% |" in table
    assert "| mine | 8 | 1 | 25.0 | – | – | 12 | 0.0% |" in table


def test_records_survive_a_cut_line_and_only_whole_chunks_count(tmp_path):
    rng = random.Random(SEED)
    count, chunk = rng.randint(5, 40), rng.randint(1, 7)
    problems = random_problems(rng, count, 2)
    keep = sorted(rng.sample(range(count), rng.randint(0, count)))
    path = tmp_path / "b.jsonl"
    path.write_text("".join(json.dumps(problems[i].to_json()) + "\n" for i in keep) + '{"index": 3, "resp')
    records = read_records(path)
    assert sorted(records) == keep
    done = finished_chunks(records, count, chunk)
    for lo in chunk_starts(count, chunk):
        assert (lo in done) == all(i in keep for i in range(lo, min(lo + chunk, count)))
    assert chunk_starts(count, chunk)[-1] < count and math.ceil(count / chunk) == len(chunk_starts(count, chunk))


def test_one_vllm_engine_per_gpu_group(monkeypatch):
    def request(gpus, tp, engine="vllm"):
        return EvalRequest(model="m", benchmarks=[], output="o", cfg=Config(), engine=engine, gpus=gpus,
                           tensor_parallel_size=tp)

    assert engine_groups(request(["0", "1", "2", "3"], 1)) == ["0", "1", "2", "3"]
    assert engine_groups(request(["0", "1", "2", "3", "4"], 2)) == ["0,1", "2,3"]  # a spare GPU stays idle
    assert engine_groups(request([], 1, engine="hf")) == [None]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setattr("torch.cuda.device_count", lambda: 0)
    assert engine_groups(request([], 1)) == [None]  # vLLM's CPU build: one engine
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    assert engine_groups(request([], 2)) == ["4,5", "6,7"]
    with pytest.raises(ConfigError, match="only 2 GPU"):
        engine_groups(request(["0", "1"], 4))
