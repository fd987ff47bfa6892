"""How a rank spends its machine: the micro-batch token budget, FSDP2 resharding, threads for each process.

Three decisions that used to be constants, made here from the model and the machine:

- `micro_batch_tokens`: tokens per packed micro-batch. Fewer, larger micro-batches mean fewer forward
  and backward launches and fewer FSDP2 collectives per step (each one costs the same however few tokens
  it carries, which dominates a small model). The budget is the smaller of: the tokens whose training work
  makes those fixed costs a few percent (`AMORTISING_FLOPS`; larger buys no speed, only memory), and the
  memory this rank may give to activations divided by what one token's activations cost in the model
  (`activation_bytes_per_token`).
- `keep_unsharded`: whether FSDP2 keeps a step's gathered parameters between the forward and the backward
  (`reshard_after_forward=False`: one all-gather per block per micro-batch instead of two). Worth it when
  the whole model is small next to the memory (it always is for a model that fits one device unsharded
  many times over); the paper's 7B/32B on GPUs keep resharding.
- threads: on a CPU machine the trainer ranks of a node share its idle cores (`rank_threads`); while a
  dedicated rollout engine generates, the ranks wait asleep (blocking socket and collective waits, no
  spinning: measured 6 ms of CPU in a 3 s gloo wait), so the engine gets every idle core
  (`engine_threads`); the judge's workers run while the ranks judge their own samples, so each rank's
  pool gets that rank's share (`judge_workers`). "Idle" discounts the load other work puts on the
  machine (`idle_cpus`): threads that outnumber the free cores are far slower than fewer threads.
"""

from __future__ import annotations

import os

import torch

# Share of a rank's free memory that the activations of one micro-batch may take: the rest holds the
# weights, gradients, optimizer state, the loss's chunk buffers and the allocator's slack.
ACTIVATION_SHARE = 0.25
# Bounds of the derived budget: at least one whole sequence; at most this many tokens, past which a larger
# micro-batch saves nothing measurable and only delays the first backward.
MAX_DERIVED_TOKENS = 1 << 17
# Training FLOPs (6 x parameters per token) that make a micro-batch's fixed costs (kernel launches, Python,
# FSDP2 collectives: milliseconds) a few percent of its compute: ~1 s of one CPU core, ~10 ms of a datacenter
# GPU. Past that, a larger micro-batch only costs memory (its activations grow with it).
AMORTISING_FLOPS = {"cpu": 2e10, "cuda": 1e13}
# Whole-model size (parameters + gradients) under which FSDP2 keeps parameters gathered within a step,
# as a share of the free memory of a rank.
UNSHARDED_SHARE = 0.05


def usable_cpus() -> int:
    """Cores this process may run on (its affinity mask, which containers and `taskset` narrow)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def idle_cpus(own_busy: int = 0) -> int:
    """Cores not kept busy by other work: the usable cores less the 1-minute load average, not counting
    `own_busy` processes of this job that are known to be running while it is measured. At least 1.

    Why the load matters: torch's OpenMP threads meet at a barrier after every operator; on a machine
    whose cores are all taken, a thread that loses its core stalls its siblings for a scheduler time slice
    per operator (measured on a 2-core machine at load ~15: generation 40x slower with 2 threads than with 1).
    """
    try:
        others = max(0.0, os.getloadavg()[0] - own_busy)
    except OSError:
        others = 0.0
    return max(1, min(usable_cpus(), usable_cpus() - int(others + 0.5)))


def local_world_size() -> int:
    """Trainer ranks on this node (torchrun's LOCAL_WORLD_SIZE; 1 outside torchrun)."""
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def explicit_threads() -> int:
    """The intra-op thread count the user chose for each trainer rank, 0 if none: `OREAL_CPU_THREADS`, or
    `OMP_NUM_THREADS` outside torchrun. Under torchrun `OMP_NUM_THREADS=1` is what torchrun itself sets when
    the launcher's environment has none (torch/distributed/run.py), so there it cannot tell a choice from a
    default and only `OREAL_CPU_THREADS` counts.

    Why a choice must win over the derived count: the derived count follows the machine's load, and CPU
    reductions split across a different number of threads round differently, so a resumed run (started at
    another load) would no longer reproduce the uninterrupted one bit for bit.
    """
    names = ("OREAL_CPU_THREADS",) if "TORCHELASTIC_RUN_ID" in os.environ else ("OREAL_CPU_THREADS", "OMP_NUM_THREADS")
    for name in names:
        value = os.environ.get(name, "").strip()
        if value:
            try:
                threads = int(value)
            except ValueError:
                raise ValueError(f"{name}={value!r}: expected a whole number of threads") from None
            if threads < 1:
                raise ValueError(f"{name}={value!r}: expected at least 1 thread")
            return threads
    return 0


def rank_threads() -> int:
    """Intra-op threads of one trainer rank on CPU: the user's choice (`explicit_threads`), else the node's idle
    cores shared evenly by its ranks (measured while the ranks start, so they count as busy)."""
    return explicit_threads() or max(1, idle_cpus(own_busy=local_world_size()) // local_world_size())


def engine_threads(configured: int = 0, engines_on_node: int = 1) -> int:
    """Threads of a dedicated CPU rollout engine: `configured`, or the node's cores shared by the engines that
    generate at the same time on it (the trainer ranks sleep while they do)."""
    return configured if configured > 0 else max(1, idle_cpus(own_busy=local_world_size()) // max(1, engines_on_node))


def judge_workers(configured: int = 0) -> int:
    """Judge worker processes per rank: `configured`, or the rank's share of the cores (every rank judges at once)."""
    return configured if configured > 0 else rank_threads()


def free_memory_bytes(device: torch.device) -> int:
    """Memory this rank may still allocate: free device memory on CUDA; on CPU the node's available memory
    shared by its ranks (each rank's rollout engine or judge pool lives in that share too)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    import psutil

    return int(psutil.virtual_memory().available // local_world_size())


def activation_bytes_per_token(hf_config, dtype: torch.dtype, *, gradient_checkpointing: bool = False) -> int:
    """Bytes that one token's saved activations take in the forward of a decoder-only transformer.

    Per layer, the tensors autograd keeps for the backward of a pre-norm block with grouped-query attention
    and a gated MLP: the two norm inputs and outputs (4 x hidden), the query and attention output
    (2 x hidden), keys and values (2 x KV width), and the MLP's gate, up and activated product (3 x
    intermediate), plus the down projection's input (1 x intermediate). With gradient checkpointing only a
    layer's input is kept, and one layer is recomputed at a time. The logits are never materialised (the
    fused loss works in chunks of fixed size whatever the micro-batch), so the vocabulary adds nothing per
    token. fp32 statistics of the norms and the attention are small next to these and covered by the share.
    """
    hidden = int(hf_config.hidden_size)
    layers = int(hf_config.num_hidden_layers)
    intermediate = int(getattr(hf_config, "intermediate_size", 4 * hidden))
    heads = int(hf_config.num_attention_heads)
    kv_heads = int(getattr(hf_config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(hf_config, "head_dim", None) or hidden // heads)
    per_layer = 6 * hidden + 2 * kv_heads * head_dim + 4 * intermediate
    element = torch.finfo(dtype).bits // 8
    if gradient_checkpointing:
        return element * (layers * hidden + per_layer)
    return element * layers * per_layer


def micro_batch_tokens(configured: int, hf_config, dtype: torch.dtype, device: torch.device, *,
                       max_sequence_tokens: int, num_params: int = 0, gradient_checkpointing: bool = False,
                       free_bytes: int | None = None) -> int:
    """The packed micro-batch size in tokens: `configured` when > 0, else derived (see the module docstring):
    as many tokens as amortise a micro-batch's fixed costs (`AMORTISING_FLOPS` of training work for a model of
    `num_params` parameters; 0: no such bound), but no more than a share of the free memory holds.

    Never less than `max_sequence_tokens` (a micro-batch holds at least one whole sequence).
    """
    if configured > 0:
        return configured
    free = free_memory_bytes(device) if free_bytes is None else free_bytes
    per_token = activation_bytes_per_token(hf_config, dtype, gradient_checkpointing=gradient_checkpointing)
    derived = min(int(ACTIVATION_SHARE * free) // max(1, per_token), MAX_DERIVED_TOKENS)
    if num_params > 0:
        flops = AMORTISING_FLOPS.get(device.type, AMORTISING_FLOPS["cuda"])
        derived = min(derived, max(1, int(flops // (6 * num_params))))
    return max(max_sequence_tokens, derived)


def keep_unsharded(model: torch.nn.Module, device: torch.device, *, free_bytes: int | None = None) -> bool:
    """Whether FSDP2 should keep this (not yet sharded) model's parameters gathered from forward to backward:
    true when its full parameters and gradients are a small share of the rank's free memory."""
    full = sum(p.numel() * p.element_size() for p in model.parameters())
    free = free_memory_bytes(device) if free_bytes is None else free_bytes
    return 2 * full <= UNSHARDED_SHARE * free


def decide_for_run(cfg, parts, ctx, dtype: torch.dtype) -> tuple[int, bool]:
    """(micro-batch tokens, keep the policy gathered within an update) for this run, the same on every rank
    (`dtype`: the compute dtype of the activations): the smallest budget any rank derived, and keeping
    gathered only if every rank can afford it (ranks that packed differently, or gathered differently,
    would wait on each other's collectives forever)."""
    import torch.distributed as dist

    hf_config = getattr(parts, "hf_config", None)
    configured = cfg.train.micro_batch_tokens
    if configured <= 0 and hf_config is None:
        raise ValueError("train.micro_batch_tokens 0 (derived) needs the model's config to size activations")
    policy = getattr(parts, "policy", None)
    num_params = sum(p.numel() for p in policy.parameters()) if policy is not None else 0  # global, not the shard
    tokens = micro_batch_tokens(configured, hf_config, dtype, ctx.device,
                                max_sequence_tokens=cfg.rollout.max_total_tokens, num_params=num_params,
                                gradient_checkpointing=cfg.model.gradient_checkpointing)
    unsharded = policy is not None and keep_unsharded(policy, ctx.device)
    if ctx.world_size > 1 and dist.is_initialized():
        agreed = torch.tensor([tokens, int(unsharded)], dtype=torch.int64, device=ctx.device)
        dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
        tokens, unsharded = int(agreed[0]), bool(agreed[1])
    return tokens, unsharded
