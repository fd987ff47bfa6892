"""One OpenMP team per process: the thread that computes gets `n` threads, every other thread one.

Why: torch's CPU operators run under GNU OpenMP (libgomp), and every OS thread that runs a parallel
operator gets a team of its own, whose threads live as long as that thread. Once the threads libgomp
manages outnumber the cores, it throttles the spin-wait of every team to ~100 iterations
(libgomp/config/linux/wait.h, `gomp_throttled_spin_count_var`), so a team's worker goes to sleep
between two operators and must be woken for the next: around every operator of a decode loop.
gloo's worker threads run parallel copies for the object collectives and FSDP's gathers, so after
the first training step a 2-core trainer held three managed threads and its engine's generation went
from 0.41 s to 0.55-0.75 s (measured once while diagnosing it, the demo's step in `bench_step`'s
one-process layout: 126 voluntary context switches per generation before, ~6,900 after). torch hands
every new thread the process-wide count of `torch.set_num_threads` when it first runs a parallel
operator (`at::init_num_threads`), so that count is set to 1 here and only the calling thread's own
OpenMP and MKL counts (`omp_set_num_threads`, `MKL_Set_Num_Threads_Local`, both per thread) are set
to `n`.

Consequence: torch operators in other threads run on one thread. The trainer computes on its main
thread (training, and the colocated engine's generation: `oreal.rollout.colocated.call_with_timeout`);
a thread that must compute in parallel calls `use_threads` itself.
"""

from __future__ import annotations

import ctypes
import functools
import os

import torch


@functools.cache
def _per_thread_setters():
    """(omp_set_num_threads, MKL_Set_Num_Threads_Local or None) of the libraries torch loaded, or None when this
    torch does not run on libgomp (another OpenMP runtime, or none: then the process-wide count is used)."""
    gomp = mkl = None
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "/" in line}
    except OSError:
        return None
    for path in sorted(paths):
        name = os.path.basename(path)
        try:
            if gomp is None and name.startswith("libgomp"):
                gomp = ctypes.CDLL(path).omp_set_num_threads
            elif mkl is None and name.startswith("libtorch_cpu"):
                mkl = getattr(ctypes.CDLL(path), "MKL_Set_Num_Threads_Local", None)  # the C API (by value)
        except (OSError, AttributeError):
            continue
    if gomp is None:
        return None
    gomp.argtypes, gomp.restype = [ctypes.c_int], None
    if mkl is not None:
        mkl.argtypes, mkl.restype = [ctypes.c_int], ctypes.c_int
    return gomp, mkl


def use_threads(n: int) -> None:
    """torch computes with `n` threads in the calling thread and with one in threads that start later (see the
    module docstring); without libgomp, `torch.set_num_threads(n)` for the whole process."""
    if n < 1:
        raise ValueError(f"threads: expected at least 1, got {n}")
    setters = _per_thread_setters() if n > 1 else None
    if setters is None:
        torch.set_num_threads(n)
        return
    gomp, mkl = setters
    torch.get_num_threads()  # this thread's one-time OpenMP set-up happens now, not later from the count of 1
    torch.set_num_threads(1)
    gomp(n)
    if mkl is not None:
        mkl(n)
    if torch.get_num_threads() != n:  # an OpenMP runtime that keeps one count per process after all
        torch.set_num_threads(n)
