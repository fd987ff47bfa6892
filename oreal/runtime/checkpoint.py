"""Distributed checkpoints (torch.distributed.checkpoint) with exact resume, and Hugging Face export.

A checkpoint is a directory `<output_dir>/checkpoints/step-000020/` written by all ranks at once
with DCP: the sharded policy and token RM, their optimizers and LR schedulers, the step, the
best-eval record, and per rank (under a key naming the rank) the data sampler's state and the
Python / NumPy / torch RNG states. It is written into `.tmp-step-000020/` and renamed when every
rank has finished, so a directory named `step-*` is always complete; a kill mid-save leaves only a
temporary directory, removed by the next save. The last `keep_last` checkpoints are kept, plus
the best one by evaluation.

Its `meta.json` records the size and SHA-256 of every file of the checkpoint (the ranks hash their
shares in parallel). Resuming checks them first: a truncated, emptied or altered file is found
before anything is loaded, `--resume` (latest) falls back to the newest intact checkpoint with a
warning naming what was wrong, and when none is intact the run stops with a `CheckpointError`.
Checkpoints are trusted input all the same: DCP's `.metadata` is a pickle, which these checks
do not make safe to load from someone else.

`export_hf` gathers the policy's full state dict and writes it as safetensors shards with the
model's config and tokenizer, loadable with `AutoModelForCausalLM.from_pretrained`. Files are
fsynced and the new folder replaces the old one in a single rename (an atomic exchange where the
filesystem has one), so a crash leaves the old export or the new one, never a half of either.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import random
import re
import shutil
import signal
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)

from oreal.durable_files import fsync_dir

CHECKPOINT_DIR = "checkpoints"
_STEP_DIR = re.compile(r"^step-(\d+)$")
BEST_FILE = "best.json"
META_FILE = "meta.json"
_HASH_CHUNK = 4 << 20


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used to resume this run; the message says which and why."""


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def list_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """Checkpoints under `root` (`step-*` folders with DCP's `.metadata` or our `meta.json`), oldest
    first, as (step, path). A damaged one is listed too: `verify_checkpoint` tells."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _STEP_DIR.match(path.name)
        if match and path.is_dir() and ((path / ".metadata").exists() or (path / META_FILE).exists()):
            found.append((int(match.group(1)), path))
    return sorted(found)


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _my_share(names: list[str]) -> list[str]:
    """This rank's part of `names` (sorted): the ranks hash a checkpoint's files in parallel."""
    rank, world = _rank(), _world()
    return [name for i, name in enumerate(sorted(names)) if i % world == rank]


def _gather(value):
    """Every rank's `value`, in rank order (just ours without a process group)."""
    if not dist.is_initialized():
        return [value]
    out = [None] * _world()
    dist.all_gather_object(out, value)
    return out


def _read_meta(path: Path) -> tuple[dict | None, str | None]:
    meta_path = path / META_FILE
    try:
        text = meta_path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None, f"{META_FILE} is missing"
    except (OSError, UnicodeDecodeError) as e:
        return None, f"{META_FILE} cannot be read ({e})"
    try:
        meta = json.loads(text)
    except json.JSONDecodeError:
        return None, f"{META_FILE} is empty or not JSON" if text.strip() else f"{META_FILE} is empty"
    if not isinstance(meta, dict):
        return None, f"{META_FILE} does not hold an object"
    return meta, None


def _file_problem(path: Path, name: str, record) -> str | None:
    if not isinstance(record, dict) or not isinstance(record.get("bytes"), int) or "sha256" not in record:
        return f"{META_FILE} has a malformed entry for {name}"
    target = path / name
    try:
        size = target.stat().st_size
    except FileNotFoundError:
        return f"{name} is missing"
    if size != record["bytes"]:
        return f"{name} has {size} bytes, {record['bytes']} were written (truncated or overwritten)"
    if file_digest(target) != record["sha256"]:
        return f"{name} does not match its checksum (its bytes changed after the save)"
    return None


def verify_checkpoint(path: str | Path) -> str | None:
    """None when checkpoint `path` is intact, else what is wrong. Collective under a process group
    (every rank checks its share of the files; all get the same answer)."""
    path = Path(path)
    meta, problem = _read_meta(path)
    problems = []
    if problem is None:
        files = meta.get("files")
        if files is None:  # written before checksums were recorded: nothing to check it against
            files = {}
        elif not isinstance(files, dict):
            problem = f"{META_FILE} has a malformed file list"
        elif ".metadata" not in files:
            problem = f"{META_FILE} does not list DCP's .metadata"
        else:
            problems = [p for name in _my_share(list(files)) if (p := _file_problem(path, name, files[name]))]
    found = [p for share in _gather(problems if problem is None else [problem]) for p in share]
    return "; ".join(dict.fromkeys(found)) or None


def latest_checkpoint(root: str | Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1][1] if found else None


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class _Stateful:
    """Model + optimizer in DCP's canonical (FQN-keyed, sharded) form, via torch's state-dict helpers.

    torch's helpers give an optimizer that has never stepped (the policy's, while it is frozen) a
    zero-gradient step to lay out its state. That must not count: the first real update would then
    use Adam's step-2 bias correction, and a run that checkpointed would differ from one that did not.
    So the flag `optim_started` travels with the state, and an unstarted optimizer is emptied again.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict:
        started = bool(self.optimizer.state)
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        if not started:
            self.optimizer.state.clear()
        return {"model": model_sd, "optim": optim_sd, "optim_started": started}

    def load_state_dict(self, state: dict) -> None:
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        if not state["optim_started"]:
            self.optimizer.state.clear()


RANK_EXTRA = "extra"  # per-rank JSON state a trainer adds (oreal.algorithms.loop: rollouts generated ahead)


class CheckpointManager:
    """Saves and restores everything a run needs to continue exactly where it stopped."""

    def __init__(self, output_dir: str | Path, *, keep_last: int, kill_mid_save_step: int = 0):
        self.root = Path(output_dir) / CHECKPOINT_DIR
        self.keep_last = keep_last
        self.kill_mid_save_step = kill_mid_save_step  # testing aid (debug.kill_mid_save_step)

    # ---------------------------------------------------------------------------------------------
    def save(self, step: int, *, models: dict[str, tuple[torch.nn.Module, torch.optim.Optimizer]],
             schedulers: dict[str, Any], sampler: Any, trainer_state: dict[str, Any],
             rank_extra: dict[str, Any] | None = None) -> Path:
        """Write checkpoint `step` atomically; every rank must call this. Returns the final directory.

        `rank_extra`: this rank's own JSON-able state (the rollouts generated ahead of their step), or None;
        `load` returns it under "rank_extra"."""
        final = self.root / step_dir_name(step)
        tmp = self.root / f".tmp-{step_dir_name(step)}"
        if _rank() == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob(".tmp-step-*"):
                shutil.rmtree(stale, ignore_errors=True)
        _barrier()
        state = self._state(models, schedulers, sampler, trainer_state, step)
        if rank_extra is not None:
            state[f"rank{_rank()}"][RANK_EXTRA] = json.dumps(rank_extra)
        dcp.save(state, checkpoint_id=str(tmp))  # (DCP fsyncs the files it writes)
        if step == self.kill_mid_save_step and _rank() == _world() - 1:
            os.kill(os.getpid(), signal.SIGKILL)  # debug.kill_mid_save_step: a rank dies half-way through
        _barrier()  # every rank's shards are on disk
        names = sorted(p.name for p in tmp.iterdir() if p.is_file())
        mine = {name: {"bytes": (tmp / name).stat().st_size, "sha256": file_digest(tmp / name)}
                for name in _my_share(names)}
        files = {name: record for share in _gather(mine) for name, record in share.items()}
        if _rank() == 0:
            meta = {"step": step, "world_size": _world(), "files": dict(sorted(files.items()))}
            _write_atomically(tmp / META_FILE, json.dumps(meta, indent=1))
            fsync_dir(tmp)
            _swap_in(tmp, final)  # a re-save of the same step (after a resume) replaces it whole
            fsync_dir(self.root)
            self._prune(protect=trainer_state.get("best_step"))
        _barrier()
        return final

    def latest_intact(self, warn) -> Path | None:
        """The newest checkpoint whose files match their checksums (collective). Each damaged one
        passed over is reported through `warn(text)`; None when there is none at all, and a
        `CheckpointError` when there are some but every one is damaged."""
        damaged = []
        for step, path in reversed(list_checkpoints(self.root)):
            problem = verify_checkpoint(path)
            if problem is None:
                return path
            damaged.append(f"{path.name}: {problem}")
            warn(f"warning: --resume: checkpoint {path} is damaged ({problem}); falling back to an older one")
        if damaged:
            raise CheckpointError(f"--resume: no intact checkpoint under {self.root}: " + "; ".join(damaged)
                                  + ". Start afresh (--overwrite) or restore the folder from a copy")
        return None

    def load(self, path: str | Path, *, models: dict[str, tuple[torch.nn.Module, torch.optim.Optimizer]],
             schedulers: dict[str, Any], sampler: Any) -> dict[str, Any]:
        """Restore every piece from checkpoint `path`; returns the trainer state (step, best, counters)."""
        path = Path(path)
        if not (path / ".metadata").exists():
            raise CheckpointError(f"--resume: {str(path)!r} is not a complete checkpoint (no .metadata); "
                                  f"complete ones under {self.root}: {[p.name for _, p in list_checkpoints(self.root)]}")
        problem = verify_checkpoint(path)
        if problem is not None:
            raise CheckpointError(f"--resume: checkpoint {path} is damaged: {problem}")
        meta, _ = _read_meta(path)
        if meta.get("world_size", _world()) != _world():
            raise CheckpointError(
                f"--resume: {path} was written by {meta['world_size']} ranks, this run has {_world()}; exact resume "
                "(data sampler and RNG state per rank) needs the same number of ranks")
        state = self._state(models, schedulers, sampler, {}, None)
        has_extra = f"rank{_rank()}.{RANK_EXTRA}" in dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
        if has_extra:  # only checkpoints written with rollouts in flight have it
            state[f"rank{_rank()}"][RANK_EXTRA] = ""
        try:
            dcp.load(state, checkpoint_id=str(path))  # fills tensors in place; Stateful models load themselves
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:  # DCP's CheckpointException is a BaseException
            raise CheckpointError(f"--resume: checkpoint {path} cannot be loaded into this run: "
                                  f"{type(e).__name__}: {str(e)[:2000]}") from e
        for name, scheduler in schedulers.items():
            scheduler.load_state_dict(state["schedulers"][name])
        own = state.get(f"rank{_rank()}")
        if sampler is not None:
            sampler.load_state_dict(own["sampler"])
        set_rng_state(own["rng"])
        trainer_state = json.loads(state["trainer"])
        if has_extra:
            trainer_state["rank_extra"] = json.loads(own[RANK_EXTRA])
        return trainer_state

    # ---------------------------------------------------------------------------------------------
    def _state(self, models, schedulers, sampler, trainer_state, step) -> dict:
        # DCP calls state_dict()/load_state_dict() only on Stateful values at the top level.
        state: dict[str, Any] = {f"model.{name}": _Stateful(model, optim) for name, (model, optim) in models.items()}
        state["schedulers"] = {name: scheduler.state_dict() for name, scheduler in schedulers.items()}
        # One JSON leaf, so that loading needs no template of its keys.
        state["trainer"] = "" if step is None else json.dumps({**trainer_state, "step": step})
        # Per-rank state under a key naming the rank, so that DCP's de-duplication keeps every rank's copy.
        state[f"rank{_rank()}"] = {"sampler": sampler.state_dict() if sampler is not None else {}, "rng": rng_state()}
        return state

    def _prune(self, protect: int | None) -> None:
        found = list_checkpoints(self.root)
        for step, path in found[:-self.keep_last]:
            if protect is not None and step == protect:
                continue
            shutil.rmtree(path, ignore_errors=True)

    def record_best(self, step: int, score: float, metric: str) -> None:
        if _rank() == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            tmp = self.root / (BEST_FILE + ".tmp")
            tmp.write_text(json.dumps({"step": step, "score": score, "metric": metric,
                                       "checkpoint": step_dir_name(step)}))
            os.replace(tmp, self.root / BEST_FILE)


def _write_atomically(path: Path, text: str) -> None:
    """`path` holds the old text or the new, never a part: written aside, fsynced, renamed."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0


def _swap_in(new: Path, final: Path) -> None:
    """Put folder `new` at `final`, replacing what is there: atomically where the filesystem can
    exchange two names, else by two renames (a crash between them leaves `<final>.old` beside
    `new`, and both are complete)."""
    if not final.exists():
        os.replace(new, final)
        return
    if _exchange(new, final):
        shutil.rmtree(new)  # now the old folder
        return
    old = final.with_name(final.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(final, old)
    os.replace(new, final)
    shutil.rmtree(old, ignore_errors=True)


def _fsync_tree(path: Path) -> None:
    for item in sorted(path.rglob("*")):
        if item.is_file():
            fd = os.open(item, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    fsync_dir(path)



# -------------------------------------------------------------------------------------------------
# Hugging Face export
# -------------------------------------------------------------------------------------------------

def export_hf(module: torch.nn.Module, hf_config: Any, tokenizer: Any, out_dir: str | Path, *,
              dtype: torch.dtype | None = None, max_shard_bytes: int = 5 * 1024**3) -> Path | None:
    """Write `module` (an FSDP2-sharded Hugging Face causal LM) as safetensors shards plus config and tokenizer.

    Every rank must call this (gathering the shards is collective); rank 0 writes. Tied weights are
    written once, as Hugging Face does. Returns the directory on rank 0, None elsewhere.
    """
    from safetensors.torch import save_file

    full = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if _rank() != 0:
        _barrier()
        return None
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if getattr(hf_config, "tie_word_embeddings", False):
        full.pop("lm_head.weight", None)
    tensors = {name: (t.to(dtype) if dtype is not None and t.is_floating_point() else t).contiguous()
               for name, t in full.items()}
    shards, current, size = [], {}, 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = tensor
        size += nbytes
    if current:
        shards.append(current)
    if len(shards) == 1:
        save_file(shards[0], str(tmp / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for index, shard in enumerate(shards, start=1):
            filename = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(tmp / filename), metadata={"format": "pt"})
            weight_map.update({name: filename for name in shard})
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        (tmp / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    if dtype is not None:
        hf_config.dtype = dtype  # what a loader should default to
    hf_config.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    _fsync_tree(tmp)
    _swap_in(tmp, out_dir)
    fsync_dir(out_dir.parent)
    _barrier()
    return out_dir
