"""The transformers engine: sampling on CPU (or one GPU), in its own process or in the trainer's.

This backend runs inside the engine process (oreal/rollout/server.py) or in a trainer rank
(oreal/rollout/colocated.py). It samples with this package's decode loop (oreal/rollout/decode.py:
one prefill per prompt, keys and values in preallocated buffers, a grouped-query attention step with
no mask building, finished rows compacted away)
wherever the model allows it (`decode_unsupported` is None: full attention in every layer, attention
through transformers' interface), and with `model.generate(..., output_scores=True)` otherwise or
with `decoder="transformers"`. Either way every token's log-probability is read from the processed
distribution, the one the sampler really drew from. A request is sampled in as few calls as
possible: prompts sorted by length are cut into buckets (`length_buckets`) that are left-padded to
their longest prompt, so long as padding adds at most `max_padding` of the bucket's work and the
bucket holds at most `max_batch_rows` rows; one call per bucket, not one per distinct prompt length
(a step's prompts rarely share a length, and every call pays the per-token overhead again). Padded
positions are masked out of attention and the model's positions are rotary (relative), so a padded
row computes what the unpadded prompt would, up to float rounding.

Weight syncs arrive over gloo, in one of two ways (`receive`):
- "inplace" (default): on the first sync with a given bucket layout, the parameters are moved
  (by name, once) into one flat storage laid out like the buckets; from then on every bucket
  is received directly into the parameters, with no staging buffer and no copy.
- "staged": two bucket buffers; bucket i+1 arrives while the pieces of bucket i are copied
  into their parameters by name (what the vLLM workers do on GPU, through load_weights).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence

import torch

from oreal.cpu_threads import use_threads
from oreal.rollout.decode import DecodedRow, decode, fast_decode_unsupported, use_decode_attention
from oreal.rollout.errors import EngineSyncError
from oreal.rollout.plan import ALIGN_BYTES, Bucket, SyncPlan
from oreal.rollout.transport import GlooTransport
from oreal.rollout.types import EngineInfo, Rollout, SamplingParams, TensorSpec, dtype_from_name, dtype_name


def build_hf_model(model, dtype: str, device: str, seed: int):
    """A causal LM from a local path, a `transformers` config object or a config dict."""
    import transformers

    torch_dtype = dtype_from_name(dtype)
    if isinstance(model, (str, os.PathLike)):
        if not os.path.isdir(model):
            raise FileNotFoundError(f"model path {model!r} is not a directory (downloads are not attempted)")
        net = transformers.AutoModelForCausalLM.from_pretrained(model, dtype=torch_dtype)
    else:
        if isinstance(model, dict):
            fields = dict(model)
            config = transformers.AutoConfig.for_model(fields.pop("model_type"), **fields)
        else:
            config = model
        torch.manual_seed(seed)
        net = transformers.AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    return net.to(device).eval()


def length_buckets(lengths: Sequence[int], *, rows_per_prompt: int, max_rows: int, new_tokens: int,
                   max_padding: float) -> list[list[int]]:
    """Prompt indices in `generate` calls: sorted by length, cut where a call would exceed `max_rows` rows
    (each prompt takes `rows_per_prompt`) or where left-padding to the call's longest prompt would add more
    than `max_padding` of its real work (prompt plus `new_tokens` per row). Every index appears once; within
    a bucket indices ascend with length (ties in input order)."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    prompts_per_call = max(1, max_rows // max(1, rows_per_prompt))
    buckets: list[list[int]] = []
    real = 0  # tokens of the current bucket without padding (prompt + new tokens per prompt)
    for i in order:
        work = lengths[i] + new_tokens
        if buckets and len(buckets[-1]) < prompts_per_call:
            # sorted ascending: prompt i is the bucket's longest, every row is padded to its length
            padded = (len(buckets[-1]) + 1) * work
            if padded - (real + work) <= max_padding * (real + work):
                buckets[-1].append(i)
                real += work
                continue
        buckets.append([i])
        real = work
    return buckets


class HFBackend:
    """Owns the model inside the engine process; see the module docstring."""

    kind = "hf"

    def __init__(self, *, model, dtype: str = "float32", device: str = "cpu", seed: int = 0,
                 num_threads: int | None = None, max_batch_rows: int = 256, max_padding: float = 0.25,
                 receive: str = "inplace", decoder: str = "oreal"):
        if receive not in ("inplace", "staged"):
            raise ValueError(f"receive must be 'inplace' or 'staged', got {receive!r}")
        if decoder not in ("oreal", "transformers"):
            raise ValueError(f"decoder must be 'oreal' or 'transformers', got {decoder!r}")
        self.receive = receive
        if num_threads:
            use_threads(num_threads)  # this thread's, one for the others (oreal.cpu_threads)
        self.model = build_hf_model(model, dtype, device, seed)
        self.device = torch.device(device)
        if max_batch_rows < 1 or not 0 <= max_padding:
            raise ValueError(f"max_batch_rows must be >= 1 and max_padding >= 0, got {max_batch_rows}, {max_padding}")
        self.max_batch_rows = max_batch_rows
        self.max_padding = max_padding
        self.generator_seed = seed
        torch.manual_seed(seed)
        self.params: dict[str, torch.nn.Parameter] = dict(self.model.named_parameters())
        for name, p in self.params.items():
            if not p.is_contiguous():  # pieces are copied into flat views of the parameters
                p.data = p.data.contiguous()
        cfg = self.model.generation_config
        eos = cfg.eos_token_id if cfg is not None else None
        self.model_eos = tuple(eos if isinstance(eos, (list, tuple)) else ([eos] if eos is not None else []))
        # The sampling loop of oreal/rollout/decode.py where the model allows it, else `model.generate`.
        self.decode_unsupported = (fast_decode_unsupported(self.model) if decoder == "oreal"
                                   else "decoder='transformers'")
        if self.decode_unsupported is None:
            use_decode_attention(self.model)
        self.transport: GlooTransport | None = None
        self._raw: list[torch.Tensor] = []
        self._recv: list[torch.Tensor] = []
        self._layout: tuple | None = None  # (plan layout key, flat storage, bucket byte offsets)
        self.last_receive: str | None = None

    # ----- description --------------------------------------------------------------------
    def specs(self) -> dict[str, TensorSpec]:
        return {n: TensorSpec(n, tuple(p.shape), dtype_name(p.dtype)) for n, p in self.params.items()}

    def info(self) -> EngineInfo:
        import transformers

        return EngineInfo(kind=self.kind, pid=os.getpid(), transport="gloo", receivers=1, specs=self.specs(),
                          versions={"torch": torch.__version__, "transformers": transformers.__version__})

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().cpu().clone() for n, p in self.params.items()}

    # ----- generation ---------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], n: int, sampling: SamplingParams) -> list[Rollout]:
        from transformers import GenerationConfig

        stop_ids = list(dict.fromkeys([*sampling.stop_token_ids, *self.model_eos]))
        stop_set = set(stop_ids)
        # Greedy samples are identical: decode once per prompt and repeat it n times.
        per_prompt = 1 if sampling.greedy else n
        kwargs = dict(max_new_tokens=sampling.max_new_tokens, num_return_sequences=per_prompt, output_scores=True,
                      return_dict_in_generate=True, eos_token_id=stop_ids or None,
                      pad_token_id=stop_ids[0] if stop_ids else 0, use_cache=True)
        if sampling.greedy:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            kwargs.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p,
                          top_k=sampling.top_k)
        gen_config = GenerationConfig(**kwargs)

        for i, p in enumerate(prompts):
            if len(p) == 0:
                raise ValueError(f"prompt {i} is empty")
        lengths = [len(p) for p in prompts]
        buckets = length_buckets(lengths, rows_per_prompt=per_prompt, max_rows=self.max_batch_rows,
                                 new_tokens=sampling.max_new_tokens, max_padding=self.max_padding)
        out: dict[int, list[Rollout]] = {}
        for chunk in buckets:
            if sampling.seed is not None:
                torch.manual_seed(sampling.seed + chunk[0])
            if self.decode_unsupported is None:
                rows = decode(self.model, [prompts[i] for i in chunk], per_prompt,
                              max_new_tokens=sampling.max_new_tokens,
                              temperature=0.0 if sampling.greedy else sampling.temperature, top_k=sampling.top_k,
                              top_p=sampling.top_p, stop_ids=stop_ids, pad_id=kwargs["pad_token_id"])
            else:
                rows = self._generate_bucket([prompts[i] for i in chunk], gen_config, kwargs["pad_token_id"],
                                             stop_set)
            for row, decoded in enumerate(rows):
                prompt_index = chunk[row // per_prompt]
                for _ in range(n // per_prompt):
                    samples = out.setdefault(prompt_index, [])
                    samples.append(Rollout(prompt_index=prompt_index, sample_index=len(samples),
                                           token_ids=decoded.token_ids, logprobs=decoded.logprobs,
                                           finish_reason=decoded.finish_reason))
        return [r for i in range(len(prompts)) for r in out[i]]

    def _generate_bucket(self, prompts: Sequence[Sequence[int]], gen_config, pad_id: int,
                         stop_set: set[int]) -> list[DecodedRow]:
        """One left-padded `model.generate` call (the fallback sampler): each row's tokens cut after its first stop
        token, with their log-probs from the processed scores."""
        lengths = [len(p) for p in prompts]
        width = max(lengths)
        ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, p in enumerate(prompts):  # left padding: every row's last prompt token is at width - 1
            ids[row, width - lengths[row]:] = torch.as_tensor(p, dtype=torch.long)
            mask[row, width - lengths[row]:] = 1
        res = self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                  generation_config=gen_config)
        new = res.sequences[:, width:]
        # one [rows, vocab] log-softmax at a time: never a [rows, steps, vocab] copy of the scores
        token_lp = torch.cat([torch.log_softmax(s.float(), dim=-1).gather(-1, new[:, t, None])
                              for t, s in enumerate(res.scores)], dim=1)
        rows = []
        for tokens, row_lp in zip(new.tolist(), token_lp.tolist()):
            cut = next((t + 1 for t, tok in enumerate(tokens) if tok in stop_set), None)
            finish = "stop" if cut is not None else "length"
            cut = cut if cut is not None else len(tokens)
            rows.append(DecodedRow(tokens[:cut], row_lp[:cut], finish))
        return rows

    # ----- weight sync ----------------------------------------------------------------------
    def init_transport(self, *, host: str, port: int, world_size: int, timeout_s: float, prefix: str) -> None:
        if world_size != 2:
            raise ValueError(f"the transformers engine joins a 2-party group, got world_size={world_size}")
        self.transport = GlooTransport.connect(host, port, timeout_s, prefix)

    def _require_transport(self) -> GlooTransport:
        if self.transport is None:
            raise EngineSyncError("no data plane: the trainer must call init_transport first")
        return self.transport

    def apply_bucket(self, bucket: Bucket, buf: torch.Tensor) -> None:
        """Copy every piece of a received bucket into its parameter, in place."""
        for piece in bucket.pieces:
            dst = self.params[piece.name].data.view(-1)[piece.start:piece.start + piece.numel]
            src = buf[piece.offset:piece.offset + piece.numel * dst.element_size()].view(dst.dtype)
            dst.copy_(src)

    @torch.no_grad()
    def _adopt_layout(self, plan: SyncPlan) -> list[int] | None:
        """Move the synced parameters into one flat storage laid out like `plan`'s buckets.

        Returns each bucket's byte offset in that storage, or None when the layout cannot
        hold the parameters contiguously (then the staged path is used).
        """
        key = tuple((b.nbytes, tuple((p.name, p.start, p.numel, p.offset) for p in b.pieces)) for b in plan.buckets)
        if self._layout is not None and self._layout[0] == key:
            return self._layout[2]
        bases, total = [], 0
        for bucket in plan.buckets:
            bases.append(total)
            total += (bucket.nbytes + ALIGN_BYTES - 1) // ALIGN_BYTES * ALIGN_BYTES
        where: dict[str, int] = {}  # name -> byte offset of its element 0
        for bucket, base in zip(plan.buckets, bases):
            for piece in bucket.pieces:
                param = self.params[piece.name]
                pos = base + piece.offset - piece.start * param.element_size()
                if where.setdefault(piece.name, pos) != pos:
                    return None  # a split tensor whose pieces would not be adjacent
        flat = torch.empty(total, dtype=torch.uint8, device=self.device)
        for name, pos in where.items():
            param = self.params[name]
            view = flat[pos:pos + param.numel() * param.element_size()].view(param.dtype).view(param.shape)
            view.copy_(param.data)
            param.data = view
        self._layout = (key, flat, bases)
        self._recv = []  # the staged buffers are not needed any more
        return bases

    @torch.no_grad()
    def receive_weights(self, plan: SyncPlan, timeout_s: float, after_bucket: Callable[[int], None]) -> None:
        """Receive every bucket of `plan` into the parameters (see the module docstring)."""
        bases = self._adopt_layout(plan) if self.receive == "inplace" else None
        self.last_receive = "inplace" if bases is not None else "staged"
        if bases is None:
            self._receive_staged(plan, timeout_s, after_bucket)
            return
        transport = self._require_transport()
        flat = self._layout[1]
        handles = [transport.broadcast(flat[base:base + bucket.nbytes]) for bucket, base in zip(plan.buckets, bases)]
        for i, handle in enumerate(handles):
            handle.wait(timeout_s)
            after_bucket(i)

    @torch.no_grad()
    def _receive_staged(self, plan: SyncPlan, timeout_s: float, after_bucket: Callable[[int], None]) -> None:
        """Two buffers: bucket i+1 arrives while the pieces of bucket i are copied by name."""
        transport = self._require_transport()
        slots = min(2, len(plan.buckets))
        # Kept between syncs: fresh pages for every sync would cost as much as a memory copy.
        if len(self._recv) < slots or (slots and self._recv[0].numel() < plan.capacity):
            self._recv = []
            self._recv = [torch.empty(plan.capacity, dtype=torch.uint8) for _ in range(slots)]
        buffers = self._recv
        pending: dict[int, object] = {}

        def post(i: int) -> None:
            pending[i] = transport.broadcast(buffers[i % 2][:plan.buckets[i].nbytes])

        for i in range(min(2, len(plan.buckets))):
            post(i)
        for i, bucket in enumerate(plan.buckets):
            pending.pop(i).wait(timeout_s)
            self.apply_bucket(bucket, buffers[i % 2])
            after_bucket(i)
            if i + 2 < len(plan.buckets):
                post(i + 2)

    @torch.no_grad()
    def receive_tensor(self, spec: TensorSpec, timeout_s: float) -> None:
        """One tensor per call: the per-tensor RPC pattern, kept as a benchmark baseline."""
        tensor = torch.empty(spec.shape, dtype=dtype_from_name(spec.dtype))
        self._require_transport().broadcast(tensor).wait(timeout_s)
        self.params[spec.name].data.copy_(tensor)

    def prepare_raw(self, sizes: list[int]) -> None:
        """Pre-allocate (and touch) receive buffers for `receive_raw`."""
        self._raw = [torch.zeros(s, dtype=torch.uint8) for s in sizes]

    def receive_raw(self, timeout_s: float) -> float:
        """Receive len(sizes) plain broadcasts and do nothing with them (the transport floor)."""
        t0 = time.perf_counter()
        transport = self._require_transport()
        handles = [transport.broadcast(b) for b in self._raw]
        for h in handles:
            h.wait(timeout_s)
        return time.perf_counter() - t0
