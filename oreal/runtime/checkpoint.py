"""Distributed checkpoints (torch.distributed.checkpoint) with exact resume, and Hugging Face export.

A checkpoint is a directory `<output_dir>/checkpoints/step-000020/` written by all ranks at once
with DCP: the sharded policy and token RM, their optimizers and LR schedulers, the step, the
best-eval record, and per rank (under a key naming the rank) the data sampler's state and the
Python / NumPy / torch RNG states. It is written into `.tmp-step-000020/` and renamed when every
rank has finished, so a directory named `step-*` is always complete; a kill mid-save leaves only a
temporary directory, removed by the next save. The last `keep_last` checkpoints are kept, plus
the best one by evaluation.

`export_hf` gathers the policy's full state dict and writes it as safetensors shards with the
model's config and tokenizer, loadable with `AutoModelForCausalLM.from_pretrained`.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)

CHECKPOINT_DIR = "checkpoints"
_STEP_DIR = re.compile(r"^step-(\d+)$")
BEST_FILE = "best.json"


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
    """Complete checkpoints under `root`, oldest first, as (step, path)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _STEP_DIR.match(path.name)
        if match and path.is_dir() and (path / ".metadata").exists():
            found.append((int(match.group(1)), path))
    return sorted(found)


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


class CheckpointManager:
    """Saves and restores everything a run needs to continue exactly where it stopped."""

    def __init__(self, output_dir: str | Path, *, keep_last: int):
        self.root = Path(output_dir) / CHECKPOINT_DIR
        self.keep_last = keep_last

    # ---------------------------------------------------------------------------------------------
    def save(self, step: int, *, models: dict[str, tuple[torch.nn.Module, torch.optim.Optimizer]],
             schedulers: dict[str, Any], sampler: Any, trainer_state: dict[str, Any]) -> Path:
        """Write checkpoint `step` atomically; every rank must call this. Returns the final directory."""
        final = self.root / step_dir_name(step)
        tmp = self.root / f".tmp-{step_dir_name(step)}"
        if _rank() == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob(".tmp-step-*"):
                shutil.rmtree(stale, ignore_errors=True)
        _barrier()
        state = self._state(models, schedulers, sampler, trainer_state, step)
        dcp.save(state, checkpoint_id=str(tmp))
        _barrier()  # every rank's shards are on disk
        if _rank() == 0:
            with open(tmp / "meta.json", "w", encoding="utf-8") as handle:
                json.dump({"step": step, "world_size": _world()}, handle)
            if final.exists():  # a re-save of the same step (after a resume): replace it
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(self.root)
            self._prune(protect=trainer_state.get("best_step"))
        _barrier()
        return final

    def load(self, path: str | Path, *, models: dict[str, tuple[torch.nn.Module, torch.optim.Optimizer]],
             schedulers: dict[str, Any], sampler: Any) -> dict[str, Any]:
        """Restore every piece from checkpoint `path`; returns the trainer state (step, best, counters)."""
        path = Path(path)
        if not (path / ".metadata").exists():
            raise CheckpointError(f"--resume: {str(path)!r} is not a complete checkpoint (no .metadata); "
                                  f"complete ones under {self.root}: {[p.name for _, p in list_checkpoints(self.root)]}")
        meta = json.loads((path / "meta.json").read_text()) if (path / "meta.json").exists() else {}
        if meta.get("world_size", _world()) != _world():
            raise CheckpointError(
                f"--resume: {path} was written by {meta['world_size']} ranks, this run has {_world()}; exact resume "
                "(data sampler and RNG state per rank) needs the same number of ranks")
        state = self._state(models, schedulers, sampler, {}, None)
        dcp.load(state, checkpoint_id=str(path))  # fills tensors in place; Stateful models load themselves
        for name, scheduler in schedulers.items():
            scheduler.load_state_dict(state["schedulers"][name])
        own = state.get(f"rank{_rank()}")
        if sampler is not None:
            sampler.load_state_dict(own["sampler"])
        set_rng_state(own["rng"])
        return json.loads(state["trainer"])

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


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


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
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    _barrier()
    return out_dir
