"""The shared-prompt layout (`oreal.data.shared_prompts`) and the packing plan that keeps a prompt's answers together.

The model-level equality (hidden states, loss and gradients against the plain layout) is in
tests/model/test_packed_forward.py and tests/model/test_attention_backends.py; here: the layout itself, on fresh
random groups, and the plan's budget, balance and coverage.
"""

import numpy as np
import pytest
import torch

from oreal.data import TrainingSample, pack_rollouts
from oreal.data.shared_prompts import group_units, share_prompts


def random_groups(rng, groups, *, max_prompt=60, max_answer=50, samples=(1, 9)):
    out = []
    for _ in range(groups):
        prompt = rng.integers(0, 1000, size=int(rng.integers(1, max_prompt + 1)))
        out += [TrainingSample(prompt, rng.integers(0, 1000, size=int(rng.integers(0, max_answer + 1))),
                               advantage=float(rng.normal()), rm_scores=None)
                for _ in range(int(rng.integers(*samples)))]
    return [out[i] for i in rng.permutation(len(out))]


def test_layout_rebuilds_every_sequence():
    """Each conventional row's token and position are the compact row's it maps to; each segment's keys are its
    prompt and itself; every distinct prompt appears once."""
    rng = np.random.default_rng()
    samples = random_groups(rng, int(rng.integers(2, 8)))
    (plain,), _ = pack_rollouts(samples, max_tokens=10**6)
    (shared,), _ = pack_rollouts(samples, max_tokens=10**6, shared_prompts=True)
    layout = shared.shared
    assert torch.equal(shared.input_ids, plain.input_ids) and torch.equal(shared.labels, plain.labels)
    assert torch.equal(layout.input_ids[0, layout.expand_index], plain.input_ids[0])
    assert torch.equal(layout.position_ids[0, layout.expand_index], plain.position_ids[0])
    distinct = {s.prompt_ids.tobytes(): len(s.prompt_ids) for s in samples}
    assert layout.num_tokens == sum(distinct.values()) + sum(len(s.response_ids) for s in samples)
    assert sum(layout.q_lens) == layout.num_tokens and sum(layout.kv_lens) == layout.kv_index.numel()
    assert layout.cu_seqlens_q.tolist() == np.cumsum([0, *layout.q_lens]).tolist()
    assert layout.cu_seqlens_k.tolist() == np.cumsum([0, *layout.kv_lens]).tolist()
    # segment by segment: queries are the last q_len of their keys (bottom-right alignment), same tokens
    q_start = k_start = 0
    for q_len, kv_len in zip(layout.q_lens, layout.kv_lens):
        keys = layout.kv_index[k_start:k_start + kv_len]
        assert torch.equal(keys[kv_len - q_len:], torch.arange(q_start, q_start + q_len))
        assert layout.position_ids[0, keys].tolist() == list(range(kv_len))
        q_start, k_start = q_start + q_len, k_start + kv_len


def test_nothing_to_share_keeps_the_plain_layout():
    samples = [TrainingSample([1, 2, 3], [4, 5]), TrainingSample([1, 2], [3]), TrainingSample([7], [])]
    assert share_prompts([s.prompt_ids for s in samples], [s.response_ids for s in samples]) is None
    (batch,), _ = pack_rollouts(samples, max_tokens=100, shared_prompts=True)
    assert batch.shared is None
    assert pack_rollouts(samples + samples[:1], max_tokens=100, shared_prompts=True)[0][0].shared is not None


def test_to_moves_the_layout():
    samples = [TrainingSample([1, 2, 3], [4, 5]), TrainingSample([1, 2, 3], [6])]
    (batch,), _ = pack_rollouts(samples, max_tokens=100, shared_prompts=True)
    moved = batch.to("meta")
    assert all(getattr(moved.shared, name).device.type == "meta" for name in
               ("input_ids", "position_ids", "cu_seqlens_q", "cu_seqlens_k", "kv_index", "expand_index"))
    assert moved.shared.q_lens == batch.shared.q_lens


@pytest.mark.parametrize("world_size", [1, 2, 3, 8])
def test_plan_covers_every_sequence_once_within_the_budget(world_size):
    """Over ranks and micro-batches every sequence is packed once; each micro-batch's compact tokens (what it runs)
    fit the budget and are at most what the report counts (two parts of one split group that land in the same
    micro-batch share their prompt again)."""
    rng = np.random.default_rng()
    samples = random_groups(rng, int(rng.integers(1, 20)), max_prompt=200, max_answer=300, samples=(1, 17))
    budget = max(s.num_tokens for s in samples) + int(rng.integers(0, 2000))
    seen = []
    for rank in range(world_size):
        batches, report = pack_rollouts(samples, max_tokens=budget, world_size=world_size, rank=rank,
                                        shared_prompts=True)
        for batch, reported in zip(batches, report.tokens[rank], strict=True):
            if batch.is_padding:
                assert reported == 0
                continue
            seen += batch.seq_indices
            tokens = batch.shared.num_tokens if batch.shared is not None else batch.num_tokens
            assert tokens <= reported <= budget
    assert sorted(seen) == list(range(len(samples)))


def test_a_prompts_answers_stay_together_when_they_fit():
    """16 prompts x 8 answers on one rank: every micro-batch holds whole groups, so each prompt runs once."""
    rng = np.random.default_rng(3)
    samples = random_groups(rng, 16, samples=(8, 9))
    groups = {s.prompt_ids.tobytes() for s in samples}
    batches, report = pack_rollouts(samples, max_tokens=2000, shared_prompts=True)
    assert len(batches) > 1 and report.micro_batches_per_rank == len(batches)
    prompts_run = sum(len({samples[i].prompt_ids.tobytes() for i in b.seq_indices}) for b in batches)
    assert prompts_run == len(groups)


def test_units_split_a_group_only_when_needed():
    prompt_lens, response_lens = [10] * 6, [5] * 6
    whole = [[0, 1, 2], [3, 4, 5]]
    assert group_units(prompt_lens, response_lens, whole, max_tokens=100, bins=1) == whole
    assert group_units(prompt_lens, response_lens, whole, max_tokens=20, bins=1) == [[0, 1], [2], [3, 4], [5]]
    # eight bins for 50 compact tokens: units of at most ~3 tokens, so one sequence each
    assert group_units(prompt_lens, response_lens, whole, max_tokens=100, bins=8) == [[i] for i in range(6)]


def test_sequence_over_budget_names_it_with_shared_prompts():
    samples = [TrainingSample([1] * 5, [2] * 5), TrainingSample([1] * 5, [2] * 20)]
    with pytest.raises(ValueError, match="sequence 1 has 25 tokens, more than the micro-batch token budget "
                                         "max_tokens=20"):
        pack_rollouts(samples, max_tokens=20, shared_prompts=True)
