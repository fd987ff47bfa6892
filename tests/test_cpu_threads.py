"""`oreal.cpu_threads.use_threads`: the calling thread computes with n threads, threads that start torch work later
with one (so that the process holds one OpenMP team and libgomp never throttles its spin-wait)."""

import ctypes
import threading

import pytest
import torch

from oreal import cpu_threads


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def in_new_thread(fn):
    box = {}
    thread = threading.Thread(target=lambda: box.setdefault("value", fn()))
    thread.start()
    thread.join()
    return box["value"]


def mkl_max_threads():
    """MKL's thread count for the calling thread, or None when this torch has no MKL."""
    getter = getattr(ctypes.CDLL(f"{torch.__path__[0]}/lib/libtorch_cpu.so"), "MKL_Get_Max_Threads", None)
    return getter() if getter is not None and cpu_threads._per_thread_setters()[1] is not None else None


@pytest.mark.skipif(cpu_threads._per_thread_setters() is None, reason="this torch does not run on libgomp")
def test_only_the_calling_thread_gets_the_threads(restore_threads):
    cpu_threads.use_threads(3)
    assert torch.get_num_threads() == 3

    def other():
        torch.ones(1 << 20).add_(1.0)  # a parallel operator: the thread's one-time OpenMP (and MKL) set-up
        return torch.get_num_threads(), mkl_max_threads()

    mkl = mkl_max_threads() is not None
    assert in_new_thread(other) == (1, 1 if mkl else None)
    assert torch.get_num_threads() == 3 and mkl_max_threads() == (3 if mkl else None)  # the caller keeps its counts
    # a thread that must compute in parallel asks for itself
    assert in_new_thread(lambda: (cpu_threads.use_threads(2), torch.get_num_threads())[1]) == 2
    assert torch.get_num_threads() == 3


def test_without_libgomp_the_count_is_process_wide(monkeypatch, restore_threads):
    monkeypatch.setattr(cpu_threads, "_per_thread_setters", lambda: None)
    cpu_threads.use_threads(2)
    assert torch.get_num_threads() == 2
    assert in_new_thread(lambda: (torch.ones(1 << 20).add_(1.0), torch.get_num_threads())[1]) == 2


def test_one_thread_and_bad_counts(restore_threads):
    cpu_threads.use_threads(1)
    assert torch.get_num_threads() == 1
    with pytest.raises(ValueError, match="expected at least 1"):
        cpu_threads.use_threads(0)
