"""Damaged checkpoints: every file's checksum is checked before anything loads; `--resume` falls
back to the newest intact checkpoint (warning what was wrong), and errs clearly when none is."""

from __future__ import annotations

import json
import os
import random

import pytest
import torch

from oreal.runtime.checkpoint import (CheckpointError, CheckpointManager, export_hf, list_checkpoints,
                                      verify_checkpoint)


def _parts(seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + s))
    return model, optimizer, scheduler


def _train_one_step(model, optimizer, scheduler):
    model(torch.randn(4, 7)).pow(2).mean().backward()
    optimizer.step()
    optimizer.zero_grad()
    scheduler.step()


def _save_three(tmp_path):
    """Checkpoints at steps 1, 2, 3; returns the manager and the weights each step saved."""
    model, optimizer, scheduler = _parts(seed=random.randrange(10**6))
    manager = CheckpointManager(tmp_path, keep_last=3)
    saved = {}
    for step in (1, 2, 3):
        _train_one_step(model, optimizer, scheduler)
        manager.save(step, models={"policy": (model, optimizer)}, schedulers={"policy": scheduler}, sampler=None,
                     trainer_state={"best_step": None})
        saved[step] = [p.detach().clone() for p in model.parameters()]
    return manager, saved


def _flip_one_byte(path):
    data = bytearray(path.read_bytes())
    i = random.randrange(len(data))
    data[i] ^= 1 << random.randrange(8)
    path.write_bytes(bytes(data))


def _shard(path):
    return next(p for p in sorted(path.iterdir()) if p.suffix == ".distcp")


DAMAGES = {
    "a flipped bit in a shard": (lambda d: _flip_one_byte(_shard(d)), "does not match its checksum"),
    "a truncated shard": (lambda d: os.truncate(_shard(d), _shard(d).stat().st_size // 2), "(truncated or overwritten)"),
    "an empty .metadata": (lambda d: (d / ".metadata").write_bytes(b""), ".metadata has 0 bytes"),
    "a missing shard": (lambda d: _shard(d).unlink(), "is missing"),
    "a missing meta.json": (lambda d: (d / "meta.json").unlink(), "meta.json is missing"),
    "an empty meta.json": (lambda d: (d / "meta.json").write_text(""), "meta.json is empty"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_resume_falls_back_to_the_newest_intact_checkpoint(tmp_path, damage):
    manager, saved = _save_three(tmp_path)
    newest = manager.root / "step-000003"
    assert verify_checkpoint(newest) is None
    do_damage, what = DAMAGES[damage]
    do_damage(newest)
    before = sorted((p.name, p.stat().st_size) for p in newest.iterdir())

    warnings = []
    path = manager.latest_intact(warnings.append)
    assert path == manager.root / "step-000002"
    assert len(warnings) == 1 and "step-000003 is damaged" in warnings[0] and what in warnings[0]
    model, optimizer, scheduler = _parts(seed=0)
    state = manager.load(path, models={"policy": (model, optimizer)}, schedulers={"policy": scheduler}, sampler=None)
    assert state["step"] == 2
    assert all(torch.equal(a, b) for a, b in zip(saved[2], model.parameters()))
    # naming the damaged one is a clear error, not a traceback from DCP or a silent load
    with pytest.raises(CheckpointError, match=f"step-000003 is damaged: .*{what.replace('(', '.').replace(')', '.')}"):
        manager.load(newest, models={"policy": (model, optimizer)}, schedulers={"policy": scheduler}, sampler=None)
    # nothing already saved was lost: the damaged checkpoint is left as it was, the others too
    assert sorted((p.name, p.stat().st_size) for p in newest.iterdir()) == before
    assert [s for s, _ in list_checkpoints(manager.root)] == [1, 2, 3]


def test_no_intact_checkpoint_is_a_clear_error(tmp_path):
    manager, _ = _save_three(tmp_path)
    for step, path in list_checkpoints(manager.root):
        _flip_one_byte(_shard(path))
    warnings = []
    with pytest.raises(CheckpointError, match="no intact checkpoint under .*step-000003: .*step-000001: .*--overwrite"):
        manager.latest_intact(warnings.append)
    assert len(warnings) == 3


def test_meta_json_records_every_file_and_is_replaced_atomically(tmp_path):
    manager, _ = _save_three(tmp_path)
    path = manager.root / "step-000003"
    meta = json.loads((path / "meta.json").read_text())
    on_disk = sorted(p.name for p in path.iterdir() if p.name != "meta.json")
    assert sorted(meta["files"]) == on_disk and ".metadata" in on_disk
    assert all(meta["files"][name]["bytes"] == (path / name).stat().st_size for name in on_disk)
    assert not list(manager.root.glob("**/*.tmp")) and not list(manager.root.glob(".tmp-*"))


class _TinyConfig:
    tie_word_embeddings = False

    def save_pretrained(self, path):
        (path / "config.json").write_text("{}")


def test_hf_export_replaces_the_old_folder_in_one_step(tmp_path, monkeypatch):
    model = torch.nn.Linear(3, 2)
    out = tmp_path / "hf"
    export_hf(model, _TinyConfig(), None, out)
    first = (out / "model.safetensors").read_bytes()
    with torch.no_grad():
        model.weight.add_(1.0)

    import oreal.runtime.checkpoint as checkpoint_module

    def crash_while_writing(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint_module, "_fsync_tree", crash_while_writing)
    with pytest.raises(OSError, match="disk full"):
        export_hf(model, _TinyConfig(), None, out)
    assert (out / "model.safetensors").read_bytes() == first  # the old export survives a failed one
    monkeypatch.undo()
    export_hf(model, _TinyConfig(), None, out)
    assert (out / "model.safetensors").read_bytes() != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no half-written or old folder left behind
