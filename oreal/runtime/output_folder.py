"""One rule for every command that writes a run folder (`oreal-sft`, `oreal-eval`, ...): a folder that
already holds files is refused, unless the user says what to do with them: `--resume` (continue
the run it holds) or `--overwrite` (delete it and start afresh). A typo in `--output-dir` then
never mixes a new run into an old one, nor silently wipes hours of results.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from oreal.runtime.config import ConfigError


def is_used(path: str | Path) -> bool:
    """Whether `path` exists and holds anything (a plain file counts as used too)."""
    path = Path(path)
    if not path.exists():
        return False
    return not path.is_dir() or any(path.iterdir())


def check_output_folder(path: str | Path, *, resume: bool, overwrite: bool) -> None:
    """Raise `ConfigError` when `path` is in use and neither `resume` nor `overwrite` is set (reads only)."""
    path = Path(path)
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite contradict each other: continue the run, or start afresh")
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--output-dir: {str(path)!r} is a file, not a folder")
    if is_used(path) and not (resume or overwrite):
        raise ConfigError(f"--output-dir: {str(path)!r} already holds files; pass --resume to continue that run, "
                          "--overwrite to delete it and start afresh, or choose another folder")


def prepare_output_folder(path: str | Path, *, resume: bool, overwrite: bool) -> Path:
    """`check_output_folder`, then (with `overwrite`) delete what the folder holds; returns the folder, created."""
    path = Path(path)
    check_output_folder(path, resume=resume, overwrite=overwrite)
    if overwrite and path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    return path
