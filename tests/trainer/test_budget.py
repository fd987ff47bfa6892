"""The machine budget (oreal/runtime/budget.py): the micro-batch token budget follows the model's real
activation cost and the memory, threads follow the machine, and keeping FSDP2 parameters gathered within
an update changes no gradient while saving all-gathers."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torchrun_launch import free_port

from oreal.model.tiny import tiny_qwen2_config
from oreal.runtime import budget

SCRIPT = Path(__file__).with_name("gathered_step_check.py")


def saved_activation_bytes(model, ids: torch.Tensor) -> int:
    """Bytes autograd saves for the backward of one forward, parameters (constant per token) excluded."""
    params = {p.data_ptr() for p in model.parameters()}
    seen, total = set(), [0]

    def pack(tensor):
        key = (tensor.untyped_storage().data_ptr(), tensor.dtype)
        if tensor.untyped_storage().data_ptr() not in params and key not in seen:
            seen.add(key)
            total[0] += tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        hidden = model.model(input_ids=ids).last_hidden_state
    del hidden
    return total[0]


@pytest.mark.parametrize("shape", [dict(hidden_size=64, num_layers=3, num_heads=4, num_kv_heads=2,
                                        intermediate_size=160),
                                   dict(hidden_size=48, num_layers=2, num_heads=6, num_kv_heads=6,
                                        intermediate_size=96)])
def test_activation_estimate_matches_what_autograd_saves(shape):
    """The per-token estimate is within 2x of the slope of the bytes a real Qwen2 forward saves."""
    from transformers import Qwen2ForCausalLM

    config = tiny_qwen2_config(97, **shape)
    model = Qwen2ForCausalLM(config).float().train()
    short, long = random.randint(20, 40), random.randint(200, 300)
    small = saved_activation_bytes(model, torch.randint(0, 97, (1, short)))
    large = saved_activation_bytes(model, torch.randint(0, 97, (1, long)))
    measured = (large - small) / (long - short)
    estimate = budget.activation_bytes_per_token(config, torch.float32)
    assert 0.5 * measured <= estimate <= 2.0 * measured, (estimate, measured)
    assert budget.activation_bytes_per_token(config, torch.bfloat16) * 2 == estimate
    assert budget.activation_bytes_per_token(config, torch.float32, gradient_checkpointing=True) < estimate


def test_micro_batch_tokens_configured_derived_and_bounded():
    config = tiny_qwen2_config(512, hidden_size=128, num_layers=4, intermediate_size=256)
    per_token = budget.activation_bytes_per_token(config, torch.float32)
    cpu = torch.device("cpu")
    free = random.randint(1 << 28, 1 << 30)
    assert budget.micro_batch_tokens(777, config, torch.float32, cpu, max_sequence_tokens=160, free_bytes=free) == 777
    derived = budget.micro_batch_tokens(0, config, torch.float32, cpu, max_sequence_tokens=160, free_bytes=free)
    assert derived == min(int(budget.ACTIVATION_SHARE * free) // per_token, budget.MAX_DERIVED_TOKENS)
    assert derived > 512  # the demo's old constant, on any machine with a quarter GiB to spare
    # never less than one whole sequence, never more than the cap
    assert budget.micro_batch_tokens(0, config, torch.float32, cpu, max_sequence_tokens=4096, free_bytes=1) == 4096
    assert budget.micro_batch_tokens(0, config, torch.float32, cpu, max_sequence_tokens=1,
                                     free_bytes=1 << 50) == budget.MAX_DERIVED_TOKENS
    # a small model: enough tokens to amortise a micro-batch's fixed costs, not what the memory would allow
    params = random.randint(100_000, 2_000_000)
    bounded = budget.micro_batch_tokens(0, config, torch.float32, cpu, max_sequence_tokens=160, num_params=params,
                                        free_bytes=1 << 34)
    assert bounded == int(budget.AMORTISING_FLOPS["cpu"] // (6 * params)) < derived * 64
    assert budget.micro_batch_tokens(0, config, torch.float32, cpu, max_sequence_tokens=160, num_params=params,
                                     free_bytes=1 << 20) == 160  # memory still bounds it (one sequence at least)
    # the live default reads the machine's free memory
    assert budget.micro_batch_tokens(0, config, torch.float32, cpu, max_sequence_tokens=160) >= 160


def test_keep_unsharded_only_when_the_model_is_small_next_to_memory():
    model = torch.nn.Linear(100, 100)  # 40,400 bytes of parameters
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    cpu = torch.device("cpu")
    assert budget.keep_unsharded(model, cpu, free_bytes=int(2 * size / budget.UNSHARDED_SHARE) + 1)
    assert not budget.keep_unsharded(model, cpu, free_bytes=int(2 * size / budget.UNSHARDED_SHARE) - 100)


def test_threads_follow_the_machine(monkeypatch):
    monkeypatch.setattr(budget, "usable_cpus", lambda: 8)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setattr(os, "getloadavg", lambda: (2.0, 2.0, 2.0))  # only the two ranks: an idle machine
    assert budget.rank_threads() == 4
    assert budget.engine_threads() == 8 and budget.engine_threads(engines_on_node=2) == 4
    assert budget.engine_threads(3) == 3 and budget.judge_workers(5) == 5 and budget.judge_workers() == 4
    monkeypatch.setattr(os, "getloadavg", lambda: (7.6, 7.0, 7.0))  # other work keeps ~6 cores busy
    assert budget.idle_cpus(own_busy=2) == 2 and budget.rank_threads() == 1 and budget.engine_threads() == 2
    monkeypatch.setattr(os, "getloadavg", lambda: (40.0, 40.0, 40.0))
    assert budget.idle_cpus() == 1 and budget.rank_threads() == 1


def test_gathered_within_step_same_gradients_fewer_gathers_and_waiting_ranks_sleep(tmp_path):
    out = tmp_path / "result.json"
    seed = random.randrange(1 << 30)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), str(SCRIPT), str(out), str(seed)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["worst_relative"] < 1e-5, r  # fp32 accumulation order only
    assert r["sharded_after"], "parameters must be back to their shards after the block"
    assert r["after_step_gap"] < 1e-5, "a forward after the optimizer step must see the new weights"
    # 3 micro-batches over 4 FSDP units (3 blocks + root): resharding gathers each block twice per micro-batch
    assert r["kept_gathers"] < r["plain_gathers"], r
    assert r["kept_gathers"] <= 4, r
    # a rank waiting for rank 0 (as for its engine) sleeps: a few ms of CPU over a 1.5 s wait, not a spinning core
    assert r["rank1_wait_wall_s"] >= 1.4 and r["rank1_wait_cpu_s"] < 0.2 * r["rank1_wait_wall_s"], r
