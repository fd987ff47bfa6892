"""Bucket layout and the name/shape check that guards every sync."""

import json
import random

import pytest

from oreal.rollout import SyncPlan, TensorSpec, WeightMismatchError, check_specs, plan_buckets
from oreal.rollout.plan import ALIGN_BYTES


def random_specs(rng: random.Random, count: int):
    dtypes = ["float32", "bfloat16", "float16"]
    specs = []
    for i in range(count):
        shape = tuple(rng.randint(1, 40) for _ in range(rng.randint(1, 3)))
        specs.append(TensorSpec(f"layer.{i}.w", shape, rng.choice(dtypes)))
    return specs


@pytest.mark.parametrize("seed", range(6))
def test_every_element_lands_exactly_once_in_aligned_bounded_buckets(seed):
    rng = random.Random(seed)
    specs = random_specs(rng, rng.randint(1, 30))
    bucket_bytes = rng.choice([ALIGN_BYTES, 200, 1000, 4096, 1 << 20])  # 200, 1000: rounded down to 64s
    plan = plan_buckets(specs, bucket_bytes, ramp=rng.random() < 0.5)

    covered = {s.name: [] for s in specs}
    for i, bucket in enumerate(plan.buckets):
        assert bucket.index == i
        assert 0 < bucket.nbytes <= bucket_bytes
        end = 0
        for piece in sorted(bucket.pieces, key=lambda p: p.offset):
            size = piece.numel * TensorSpec(piece.name, piece.shape, piece.dtype).element_size
            assert piece.offset % ALIGN_BYTES == 0 and piece.offset >= end  # aligned, no overlap
            end = piece.offset + size
            covered[piece.name].append((piece.start, piece.start + piece.numel))
        assert end == bucket.nbytes
    for spec in specs:
        ranges = sorted(covered[spec.name])
        assert ranges[0][0] == 0 and ranges[-1][1] == spec.numel
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        if spec.nbytes <= bucket_bytes:
            assert len(ranges) == 1, "a tensor that fits in a bucket must not be split"
    assert plan.capacity <= bucket_bytes
    assert plan.payload_bytes == sum(s.nbytes for s in specs)
    order = [p.name for b in plan.buckets for p in b.pieces]
    assert list(dict.fromkeys(order)) == [s.name for s in specs]  # send order is spec order
    assert SyncPlan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan  # plain types only


def test_large_tensor_is_cut_into_full_buckets():
    plan = plan_buckets([TensorSpec("a", (3,), "float32"), TensorSpec("big", (10, 7), "float32")], 64)
    big = [p for b in plan.buckets for p in b.pieces if p.name == "big"]
    assert [p.numel for p in big] == [16, 16, 16, 16, 6]
    assert all(len(b.pieces) == 1 for b in plan.buckets if b.pieces[0].name == "big")
    # Pieces fill whole buckets, so buckets laid back to back keep the tensor contiguous.
    plan = plan_buckets([TensorSpec("big", (1000,), "bfloat16"), TensorSpec("c", (5,), "float32")], 1000)
    assert plan.bucket_bytes == 960
    assert [b.nbytes for b in plan.buckets] == [960, 960, 80, 20]


def test_ramp_starts_with_small_buckets():
    specs = [TensorSpec(f"w{i}", (256,), "float32") for i in range(64)]  # 1 KiB each
    ramped = plan_buckets(specs, 16 << 10)
    assert [b.nbytes for b in ramped.buckets[:4]] == [2048, 4096, 8192, 16384]
    assert [b.nbytes for b in plan_buckets(specs, 16 << 10, ramp=False).buckets] == [16384] * 4


def test_plan_rejects_bad_arguments():
    with pytest.raises(ValueError, match="unique"):
        plan_buckets([TensorSpec("a", (2,), "float32"), TensorSpec("a", (2,), "float32")], 1024)
    with pytest.raises(ValueError, match="bucket_bytes"):
        plan_buckets([TensorSpec("a", (2,), "float32")], 8)
    with pytest.raises(ValueError, match="dtype"):
        TensorSpec("a", (2,), "float33")


def test_check_lists_unknown_missing_and_mismatched_shapes():
    engine = {n: TensorSpec(n, s, "bfloat16") for n, s in [("x", (4, 4)), ("y", (4,)), ("z", (2,))]}
    sent = [TensorSpec("x", (4, 4), "bfloat16"), TensorSpec("y", (5,), "bfloat16"), TensorSpec("w", (1,), "bfloat16")]
    problems = check_specs(sent, engine)
    assert any("unknown" in p and "w" in p for p in problems)
    assert any("shape differs: y" in p for p in problems)
    assert any("not sent" in p and p.endswith(": z") for p in problems)
    assert len(problems) == 3
    assert len(check_specs(sent, engine, allow_missing=True)) == 2
    assert check_specs([TensorSpec("x", (4, 4), "bfloat16")], engine, allow_missing=True) == []
    err = WeightMismatchError(problems)
    assert "3 problem(s)" in str(err) and "shape differs: y" in str(err)
