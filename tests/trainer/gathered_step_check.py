"""Run by test_budget.py under `torchrun --nproc_per_node 2`: an update's micro-batches through FSDP2 with and
without `gathered_within_step`, from the same weights and data, and a rank waiting on rank 0 in a gloo
collective; writes the gradients' gap, the all-gather counts and the waiting rank's CPU time as JSON."""

from __future__ import annotations

import json
import sys
import time

import torch
import torch.distributed as dist

from oreal.model.tiny import tiny_qwen2_config
from oreal.runtime.distributed import gathered_within_step, init_distributed, shard


def main(out_path: str, seed: int) -> None:
    ctx = init_distributed("cpu")
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(seed)  # the same weights on both ranks
    config = tiny_qwen2_config(61, hidden_size=32, num_layers=3, intermediate_size=40)
    model = shard(Qwen2ForCausalLM(config).float(), ctx, param_dtype=None)
    generator = torch.Generator().manual_seed(seed + 1 + ctx.rank)  # different data on every rank
    micro_batches = [torch.randint(0, 61, (2, int(torch.randint(3, 11, (), generator=generator))), generator=generator)
                     for _ in range(3)]

    gathers = [0]
    inner = dist.all_gather_single

    def counted(*args, **kwargs):
        gathers[0] += 1
        return inner(*args, **kwargs)

    dist.all_gather_single = counted

    def update(enabled: bool) -> tuple[dict, int]:
        gathers[0] = 0
        model.zero_grad(set_to_none=True)
        with gathered_within_step(model, enabled) as before_micro_batch:
            for index, ids in enumerate(micro_batches):
                before_micro_batch(last=index == len(micro_batches) - 1)
                logits = model(input_ids=ids).logits
                (logits.double().pow(2).mean() * (index + 1)).backward()
        grads = {n: p.grad.full_tensor().double().clone() for n, p in model.named_parameters()}
        return grads, gathers[0]

    plain, plain_gathers = update(False)
    kept, kept_gathers = update(True)
    worst = max(float((kept[n] - plain[n]).abs().max() / plain[n].abs().max().clamp(min=1e-30)) for n in plain)
    sharded_after = all(type(p).__name__ == "DTensor" for p in model.parameters())

    # After the block the module is as FSDP2 left it: an optimizer step is seen by the next forward.
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    optimizer.step()
    with torch.no_grad():
        after_step = model(input_ids=micro_batches[0]).logits.double()
    full = {n: p.full_tensor() for n, p in model.named_parameters()}

    # How the ranks wait for rank 0's engine (DedicatedEngines.generate): in a gloo object scatter. Rank 1's
    # CPU time over a 1.5 s wait must stay near zero (asleep, not spinning), leaving the cores to the engine.
    group = dist.new_group(backend="gloo")
    dist.barrier(group=group)
    cpu_start, wall_start = time.process_time(), time.perf_counter()
    if ctx.rank == 0:
        time.sleep(1.5)
    box = [None]
    dist.scatter_object_list(box, [["done"]] * ctx.world_size if ctx.rank == 0 else None, src=0, group=group)
    waits = [None] * ctx.world_size
    dist.all_gather_object(waits, (time.process_time() - cpu_start, time.perf_counter() - wall_start), group=group)
    if ctx.rank == 0:
        reference = Qwen2ForCausalLM(config).float()
        reference.load_state_dict(full)
        with torch.no_grad():
            expected = reference(input_ids=micro_batches[0]).logits.double()
        stale = float((after_step - expected).abs().max())
        with open(out_path, "w") as f:
            json.dump({"worst_relative": worst, "plain_gathers": plain_gathers, "kept_gathers": kept_gathers,
                       "sharded_after": sharded_after, "after_step_gap": stale, "rank1_wait_cpu_s": waits[1][0],
                       "rank1_wait_wall_s": waits[1][1]}, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
