"""Shared prompts: a micro-batch whose sequences repeat a prompt runs each distinct prompt through the model once.

GRPO, PPO and OREAL sample several answers per prompt, so a packed micro-batch holds each prompt many
times, and in the conventional layout (`oreal.data.packing`) every copy goes through every layer, forward
and backward: at 8 samples of a 45-token prompt with 46-token answers that is 43% of the step's tokens.
The compact layout holds each distinct prompt once, followed by the responses that continue it:

    compact rows:   [prompt A][response A1][response A2] ... [prompt B][response B1] ...

Attention runs over segments. A prompt segment attends to itself, causally. A response segment's queries
attend to the keys of [its prompt ; itself], causally aligned to the bottom right: response token j sees
the whole prompt and response tokens 0..j, exactly what it sees in the conventional layout. `kv_index`
lists, segment after segment, the compact rows of those keys (the attention backends gather K/V by it),
and a response's positions continue its prompt's. So every query sees the same tokens at the same
positions as in the conventional forward, and its hidden state is the same.

`expand_index` maps each conventional row to its compact row, so `oreal.model.forward_hidden` still
returns the conventional `[T, H]` hidden states and labels, side arrays and every loss stay as they are.
A prompt row's gradient arrives once per copy and is summed into the one shared row, which is what the
copies' own gradients add up to in the parameters: the gradients equal the conventional ones up to the
order of floating-point sums.

`group_units` keeps the sequences of one prompt together when `oreal.data.balance` spreads a step over
ranks and micro-batches (a group split across micro-batches shares nothing between the parts), splitting
a group only when it would not fit one micro-batch or when there are too few groups to balance the ranks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace

import numpy as np
import torch


@dataclass
class SharedPrompts:
    """The compact layout of one micro-batch (see the module docstring).

    Tensors: input_ids / position_ids `[1, Tc]` int64; cu_seqlens_q / cu_seqlens_k `[G+1]` int32 over the
    G attention segments; kv_index `[Tk]` int64 (compact rows of each segment's keys, segment after
    segment); expand_index `[T]` int64 (the compact row of each conventional row). Host-side: q_lens and
    kv_lens per segment.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens_q: torch.Tensor
    cu_seqlens_k: torch.Tensor
    kv_index: torch.Tensor
    expand_index: torch.Tensor
    q_lens: tuple[int, ...]
    kv_lens: tuple[int, ...]

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[1])

    def to(self, device, non_blocking: bool = False) -> SharedPrompts:
        moved = {f.name: getattr(self, f.name).to(device, non_blocking=non_blocking) for f in fields(self)
                 if isinstance(getattr(self, f.name), torch.Tensor)}
        return replace(self, **moved)


def prompt_key(prompt_ids: np.ndarray) -> bytes:
    """Identity of a prompt: its token ids' bytes (int64), so equal prompts and only they share."""
    return np.ascontiguousarray(prompt_ids, dtype=np.int64).tobytes()


def group_by_prompt(prompts: Sequence[np.ndarray]) -> list[list[int]]:
    """Indices of equal prompts, groups in order of first appearance, members in index order."""
    groups: dict[bytes, list[int]] = {}
    for index, prompt in enumerate(prompts):
        groups.setdefault(prompt_key(prompt), []).append(index)
    return list(groups.values())


def unit_tokens(prompt_lens: Sequence[int], response_lens: Sequence[int], unit: Sequence[int]) -> int:
    """Tokens of sequences sharing one prompt (`unit`, their indices) in the compact layout: the prompt once and
    every response."""
    return prompt_lens[unit[0]] + sum(response_lens[i] for i in unit)


def group_units(prompt_lens: Sequence[int], response_lens: Sequence[int], groups: Sequence[Sequence[int]], *,
                max_tokens: int, bins: int) -> list[list[int]]:
    """The groups cut into packing units (lists of sequence indices) whose compact size fits `max_tokens`
    and is at most about `1 / (2 bins)` of the total (so that `bins` ranks x micro-batches can still be
    balanced); a unit is never smaller than one sequence."""
    total = sum(unit_tokens(prompt_lens, response_lens, group) for group in groups)
    cap = min(max_tokens, max(1, -(-total // (2 * max(1, bins)))))
    units = []
    for group in groups:
        prompt = prompt_lens[group[0]]
        unit, size = [], prompt
        for index in group:
            if unit and size + response_lens[index] > cap:
                units.append(unit)
                unit, size = [], prompt
            unit.append(index)
            size += response_lens[index]
        units.append(unit)
    return units


def share_prompts(prompts: Sequence[np.ndarray], responses: Sequence[np.ndarray]) -> SharedPrompts | None:
    """The compact layout of sequences `prompt_i + response_i`, packed in this order in the conventional
    layout; None when no prompt occurs twice (the conventional layout is then as small)."""
    groups = group_by_prompt(prompts)
    if len(groups) == len(prompts):
        return None
    seq_lens = np.array([len(p) + len(r) for p, r in zip(prompts, responses)], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(seq_lens)[:-1]])
    expand = np.empty(int(seq_lens.sum()), dtype=np.int64)
    ids, positions, kv_index, q_lens, kv_lens = [], [], [], [], []
    row = 0
    for group in groups:
        prompt = np.asarray(prompts[group[0]], dtype=np.int64)
        plen = len(prompt)
        prompt_rows = np.arange(row, row + plen)
        ids.append(prompt)
        positions.append(np.arange(plen))
        kv_index.append(prompt_rows)
        q_lens.append(plen)
        kv_lens.append(plen)
        row += plen
        for index in group:
            response = np.asarray(responses[index], dtype=np.int64)
            rlen = len(response)
            start = starts[index]
            expand[start:start + plen] = prompt_rows
            if rlen == 0:  # nothing to run: the sequence is its prompt
                continue
            response_rows = np.arange(row, row + rlen)
            expand[start + plen:start + plen + rlen] = response_rows
            ids.append(response)
            positions.append(np.arange(plen, plen + rlen))
            kv_index.extend([prompt_rows, response_rows])
            q_lens.append(rlen)
            kv_lens.append(plen + rlen)
            row += rlen
    cu_q = np.zeros(len(q_lens) + 1, dtype=np.int32)
    np.cumsum(q_lens, out=cu_q[1:])
    cu_k = np.zeros(len(kv_lens) + 1, dtype=np.int32)
    np.cumsum(kv_lens, out=cu_k[1:])
    return SharedPrompts(
        input_ids=torch.from_numpy(np.concatenate(ids)).unsqueeze(0),
        position_ids=torch.from_numpy(np.concatenate(positions)).unsqueeze(0),
        cu_seqlens_q=torch.from_numpy(cu_q), cu_seqlens_k=torch.from_numpy(cu_k),
        kv_index=torch.from_numpy(np.concatenate(kv_index)), expand_index=torch.from_numpy(expand),
        q_lens=tuple(q_lens), kv_lens=tuple(kv_lens))
