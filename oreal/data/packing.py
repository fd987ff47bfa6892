"""Packing rollouts into flat micro-batches: one row of `T` tokens, sequences delimited by `cu_seqlens`.

A `TrainingSample` is what the trainer builds from one sampled answer: prompt ids, response ids, the
sequence's advantage and polarity, and optional per-response-token arrays (token-RM scores,
reference and behaviour log-probs, anything else by name). `pack_rollouts` balances rollouts
over data-parallel ranks and micro-batches (`oreal.data.balance`) and builds this rank's
`PackedBatch`es. Layout of one packed sequence i of prompt length P and response length R,
starting at row offset s (L = P + R):

    input_ids[s : s+L]      = prompt + response
    position_ids[s : s+L]   = 0 .. L-1
    labels[s+t]             = input_ids[s+t+1] for t in [P-1, L-2] (the action positions), else -100
    side[s+P-1+j]           = per-token value of response token j (0 at non-action positions)

so `labels`, `rm_scores`, `ref_logprobs`, `old_logprobs` and `extras[...]` line up with the
hidden state that predicts each response token, as `oreal.fused_oreal_loss` expects.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace

import numpy as np
import torch

from oreal.data.balance import PackingReport, check_lengths, plan_packing
from oreal.data.shared_prompts import SharedPrompts, group_by_prompt, group_units, share_prompts, unit_tokens

IGNORE_INDEX = -100
SIDE_FIELDS = ("rm_scores", "ref_logprobs", "old_logprobs")


def _as_array(value, dtype) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    return np.asarray(value, dtype=dtype).reshape(-1)


@dataclass
class TrainingSample:
    """One sampled answer to pack.

    Args:
        prompt_ids: prompt token ids (at least one: the first response token is predicted from it).
        response_ids: generated token ids (may be empty: the sequence then has no action token).
        advantage: the sequence's advantage (e.g. RLOO).
        is_positive: the outcome reward is +1.
        rm_scores, ref_logprobs, old_logprobs: optional arrays with one value per response token.
        extras: more per-response-token arrays by name; packed into `PackedBatch.extras`.

    Arrays may be lists, numpy arrays or torch tensors; they are kept as numpy arrays.
    """

    prompt_ids: Sequence[int]
    response_ids: Sequence[int]
    advantage: float = 0.0
    is_positive: bool = False
    rm_scores: Sequence[float] | None = None
    ref_logprobs: Sequence[float] | None = None
    old_logprobs: Sequence[float] | None = None
    extras: Mapping[str, Sequence[float]] = field(default_factory=dict)

    def __post_init__(self):
        self.prompt_ids = _as_array(self.prompt_ids, np.int64)
        self.response_ids = _as_array(self.response_ids, np.int64)
        for name in SIDE_FIELDS:
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, _as_array(value, np.float32))
        self.extras = {name: _as_array(value, np.float32) for name, value in dict(self.extras).items()}

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)

    def token_arrays(self) -> dict[str, np.ndarray | None]:
        arrays = {name: getattr(self, name) for name in SIDE_FIELDS}
        arrays.update({f"extras.{name}": value for name, value in self.extras.items()})
        return arrays


@dataclass
class PackedBatch:
    """One micro-batch: `S` sequences packed into a single row of `T` tokens.

    Tensors (what the model and `oreal.fused_oreal_loss` consume):
        input_ids `[1, T]` int64, position_ids `[1, T]` int64 (restarting at 0 per sequence),
        cu_seqlens `[S+1]` int32 (0, ..., T), labels `[T]` int64 (-100 on prompt tokens and on each
        sequence's last position), advantages `[S]` float32, is_positive `[S]` bool,
        rm_scores / ref_logprobs / old_logprobs `[T]` float32 or None, extras: name -> `[T]` float32.
    Host-side metadata (no device sync to read): max_seqlen, seq_lens, prompt_lens, and
    seq_indices (each sequence's index in the list given to `pack_rollouts`; -1 for padding).
    `shared`: the compact layout in which each distinct prompt runs once (`oreal.data.shared_prompts`),
    or None: `oreal.model.forward_hidden` runs it and returns hidden states in this (conventional) layout.
    `is_padding`: a stand-in micro-batch (one ignored token) so that every rank runs the same
    number of forwards; it has no action token and adds nothing to the loss.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    labels: torch.Tensor
    advantages: torch.Tensor
    is_positive: torch.Tensor
    seq_lens: tuple[int, ...]
    prompt_lens: tuple[int, ...]
    seq_indices: tuple[int, ...]
    rm_scores: torch.Tensor | None = None
    ref_logprobs: torch.Tensor | None = None
    old_logprobs: torch.Tensor | None = None
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    is_padding: bool = False
    shared: SharedPrompts | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[1])

    @property
    def num_sequences(self) -> int:
        return len(self.seq_lens)

    @property
    def device(self) -> torch.device:
        return self.input_ids.device

    @property
    def action_mask(self) -> torch.Tensor:
        """`[T]` bool: positions whose label is a response token."""
        return self.labels != IGNORE_INDEX

    def action_token_counts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(positive, negative) action-token counts as 0-d int64 tensors on the batch's device."""
        seq = torch.repeat_interleave(torch.arange(self.num_sequences, device=self.device),
                                      torch.tensor(self.seq_lens, device=self.device), output_size=self.num_tokens)
        positive = self.is_positive[seq]
        action = self.action_mask
        return (action & positive).sum(), (action & ~positive).sum()

    def to(self, device, non_blocking: bool = False) -> PackedBatch:
        """A copy with every tensor on `device`."""
        moved = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                moved[f.name] = value.to(device, non_blocking=non_blocking)
        moved["extras"] = {k: v.to(device, non_blocking=non_blocking) for k, v in self.extras.items()}
        if self.shared is not None:
            moved["shared"] = self.shared.to(device, non_blocking=non_blocking)
        return replace(self, **moved)

    def unpack(self, values: torch.Tensor) -> list[torch.Tensor]:
        """Per-sequence views of a packed `[T, ...]` (or `[1, T, ...]`) tensor, split at `cu_seqlens`."""
        if values.dim() >= 2 and values.shape[0] == 1 and values.shape[1] == self.num_tokens:
            values = values[0]
        if values.shape[0] != self.num_tokens:
            raise ValueError(f"values: expected {self.num_tokens} packed positions along dim 0, got shape "
                             f"{tuple(values.shape)}")
        return list(torch.split(values, list(self.seq_lens)))

    def unpack_actions(self, values: torch.Tensor) -> list[torch.Tensor]:
        """Per-sequence views of the action positions of a packed `[T, ...]` tensor.

        Sequence i yields `R_i` entries, one per response token, in response order: the inverse of how
        `TrainingSample` per-token arrays are packed. `unpack_actions(labels)` gives back the response ids.
        """
        out = []
        for piece, prompt_len in zip(self.unpack(values), self.prompt_lens):
            out.append(piece[prompt_len - 1:piece.shape[0] - 1])
        return out

    @classmethod
    def padding(cls, *, pad_token_id: int = 0, side_fields: Sequence[str] = (),
                extras: Sequence[str] = ()) -> PackedBatch:
        """A one-token micro-batch with no action token, shaped like real ones (same side tensors)."""
        zero = torch.zeros(1, dtype=torch.float32)
        side = {name: zero.clone() for name in side_fields}
        return cls(input_ids=torch.full((1, 1), pad_token_id, dtype=torch.int64),
                   position_ids=torch.zeros((1, 1), dtype=torch.int64),
                   cu_seqlens=torch.tensor([0, 1], dtype=torch.int32), max_seqlen=1,
                   labels=torch.full((1,), IGNORE_INDEX, dtype=torch.int64),
                   advantages=torch.zeros(1, dtype=torch.float32), is_positive=torch.zeros(1, dtype=torch.bool),
                   seq_lens=(1,), prompt_lens=(1,), seq_indices=(-1,),
                   extras={name: zero.clone() for name in extras}, is_padding=True, **side)


def check_rollouts(rollouts: Sequence[TrainingSample]) -> tuple[list[str], list[str]]:
    """Validates rollouts for packing; returns the side fields and extras names they all carry."""
    if not rollouts:
        raise ValueError("rollouts: nothing to pack (the list is empty)")
    for index, r in enumerate(rollouts):
        if not isinstance(r, TrainingSample):
            raise ValueError(f"rollouts[{index}]: expected a TrainingSample, got {type(r).__name__}")
    first = rollouts[0]
    side = [name for name in SIDE_FIELDS if getattr(first, name) is not None]
    extras = sorted(first.extras)
    for index, r in enumerate(rollouts):
        if len(r.prompt_ids) == 0:
            raise ValueError(f"rollouts[{index}]: prompt_ids is empty; a sequence needs at least one prompt "
                             "token to predict its first response token from")
        if sorted(r.extras) != extras:
            raise ValueError(f"rollouts[{index}]: extras {sorted(r.extras)} differ from rollouts[0]'s {extras}; "
                             "give every rollout the same per-token arrays")
        for name, value in r.token_arrays().items():
            if name in SIDE_FIELDS and (value is not None) != (name in side):
                state = "given" if value is not None else "missing"
                raise ValueError(f"rollouts[{index}]: {name} is {state}, unlike in rollouts[0]; give every "
                                 "rollout the same per-token arrays")
            if value is not None and len(value) != len(r.response_ids):
                raise ValueError(f"rollouts[{index}]: {name} has {len(value)} values for "
                                 f"{len(r.response_ids)} response tokens (one per response token)")
    return side, extras


def pack_sequences(rollouts: Sequence[TrainingSample], indices: Sequence[int], *, side_fields: Sequence[str] = (),
                   extras: Sequence[str] = (), pad_token_id: int = 0, shared_prompts: bool = False) -> PackedBatch:
    """One micro-batch from `rollouts[i] for i in indices` (already validated); padding when empty.

    `shared_prompts`: also build the compact layout (`PackedBatch.shared`) when a prompt occurs twice."""
    if len(indices) == 0:
        return PackedBatch.padding(pad_token_id=pad_token_id, side_fields=side_fields, extras=extras)
    chosen = [rollouts[i] for i in indices]
    prompt_lens = np.fromiter((len(r.prompt_ids) for r in chosen), dtype=np.int64, count=len(chosen))
    seq_lens = prompt_lens + np.fromiter((len(r.response_ids) for r in chosen), dtype=np.int64, count=len(chosen))
    num_tokens = int(seq_lens.sum())
    pieces = []
    for r in chosen:
        pieces.append(r.prompt_ids)
        pieces.append(r.response_ids)
    input_ids = np.concatenate(pieces)
    if input_ids.min() < 0:  # one vectorised check; find the culprit only on failure
        culprit = next(i for i, r in zip(indices, chosen) if min(r.prompt_ids.min(), r.response_ids.min(initial=0)) < 0)
        raise ValueError(f"rollouts[{culprit}]: token ids must be non-negative")
    starts = np.zeros(len(chosen), dtype=np.int64)
    np.cumsum(seq_lens[:-1], out=starts[1:])
    positions = np.arange(num_tokens, dtype=np.int64) - np.repeat(starts, seq_lens)
    # Position t of a sequence predicts token t+1: an action when t in [P-1, L-2].
    action = (positions >= np.repeat(prompt_lens - 1, seq_lens)) & (positions <= np.repeat(seq_lens - 2, seq_lens))
    labels = np.full(num_tokens, IGNORE_INDEX, dtype=np.int64)
    labels[:-1][action[:-1]] = input_ids[1:][action[:-1]]

    def side(arrays: list[np.ndarray]) -> torch.Tensor:
        out = np.zeros(num_tokens, dtype=np.float32)
        out[action] = np.concatenate(arrays)
        return torch.from_numpy(out)

    cu_seqlens = np.zeros(len(chosen) + 1, dtype=np.int32)
    np.cumsum(seq_lens, out=cu_seqlens[1:])
    return PackedBatch(
        input_ids=torch.from_numpy(input_ids).unsqueeze(0),
        position_ids=torch.from_numpy(positions).unsqueeze(0),
        cu_seqlens=torch.from_numpy(cu_seqlens), max_seqlen=int(seq_lens.max()),
        labels=torch.from_numpy(labels),
        advantages=torch.tensor([float(r.advantage) for r in chosen], dtype=torch.float32),
        is_positive=torch.tensor([bool(r.is_positive) for r in chosen], dtype=torch.bool),
        seq_lens=tuple(seq_lens.tolist()), prompt_lens=tuple(prompt_lens.tolist()), seq_indices=tuple(indices),
        extras={name: side([r.extras[name] for r in chosen]) for name in extras},
        shared=share_prompts([r.prompt_ids for r in chosen], [r.response_ids for r in chosen]) if shared_prompts
        else None,
        **{name: side([getattr(r, name) for r in chosen]) for name in side_fields})


def pack_rollouts(rollouts: Sequence[TrainingSample], *, max_tokens: int, world_size: int = 1, rank: int = 0,
                  method: str = "auto", min_micro_batches: int = 1, pad_token_id: int = 0,
                  shared_prompts: bool = False) -> tuple[list[PackedBatch], PackingReport]:
    """This rank's balanced micro-batches of all `rollouts` (the global list, identical on every rank).

    Every rank gets the same number of micro-batches (empty slots become `PackedBatch.padding`).
    Returns `(micro_batches, report)`; `report.summary()` is a one-line imbalance summary.
    Raises ValueError when one rollout alone is longer than `max_tokens` (naming the limit).

    `shared_prompts`: each distinct prompt of a micro-batch runs once (`oreal.data.shared_prompts`). The
    sequences of one prompt are then kept together where the budget and the balance allow, and the
    budget and the report count tokens as the compact layout holds them.
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank: expected an int in [0, {world_size}), got {rank!r}")
    side_fields, extras = check_rollouts(rollouts)
    if shared_prompts:
        rank_batches, report = plan_shared_packing(rollouts, max_tokens, world_size=world_size, method=method,
                                                   min_micro_batches=min_micro_batches)
    else:
        plan = plan_packing([r.num_tokens for r in rollouts], max_tokens, world_size=world_size, method=method,
                            min_micro_batches=min_micro_batches)
        rank_batches, report = plan.rank_batches, plan.report()
    batches = [pack_sequences(rollouts, indices, side_fields=side_fields, extras=extras, pad_token_id=pad_token_id,
                              shared_prompts=shared_prompts)
               for indices in rank_batches[rank]]
    return batches, report


def plan_shared_packing(rollouts: Sequence[TrainingSample], max_tokens: int, *, world_size: int, method: str,
                        min_micro_batches: int) -> tuple[list[list[list[int]]], PackingReport]:
    """`plan_packing` over units of sequences that share a prompt (`group_units`), weighed by their compact
    size: (`rank_batches[r][j]`, sequence indices in ascending order; the report, in compact tokens)."""
    check_lengths([r.num_tokens for r in rollouts], max_tokens)
    prompt_lens = [len(r.prompt_ids) for r in rollouts]
    response_lens = [len(r.response_ids) for r in rollouts]
    groups = group_by_prompt([r.prompt_ids for r in rollouts])
    units = group_units(prompt_lens, response_lens, groups, max_tokens=max_tokens,
                        bins=world_size * max(1, min_micro_batches))
    weights = [unit_tokens(prompt_lens, response_lens, unit) for unit in units]
    plan = plan_packing(weights, max_tokens, world_size=world_size, method=method,
                        min_micro_batches=min_micro_batches)
    rank_batches = [[sorted(i for u in batch for i in units[u]) for batch in rank] for rank in plan.rank_batches]
    return rank_batches, plan.report()
