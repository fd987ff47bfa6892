"""Making a finished write survive a crash: the one piece of file-system care several packages need.

A rename is atomic, but only durable once the directory that holds the new name is flushed too; the
checkpoints (`oreal.runtime.checkpoint`) and `oreal-judge`'s output (`oreal.reward.cli`) both rely on it.
Kept at the top of the package so that judging never imports the training runtime.
"""

from __future__ import annotations

import os


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a directory's entries to disk (best effort: some file systems refuse to open or sync one)."""
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
