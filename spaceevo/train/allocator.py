"""Keep freed tensor memory in the process during training, so that it is reused without page faults.

The training engine (:meth:`spaceevo.train.engine.Engine.run`) turns it on for every training.

glibc's ``malloc`` serves large blocks (above a threshold that adapts up to 32 MiB) with ``mmap`` and
hands them back to the kernel on ``free``; a training step allocates and frees activations of tens
of MiB in every layer, and each new block is zero-filled page by page by the kernel on first touch.
A sandwich step of ``tiny-1144-1101`` (batch 64, 1 thread) took 11,000-28,000 page faults and
28-51 ms of system time; with the thresholds raised, 2,500-4,200 faults and 5-11 ms, and about 4 %
less CPU time per step (three alternating pairs of processes timing 10 steps each with
``resource.getrusage``, on a shared 2-core VM). The cost: the process keeps its peak heap.
"""

from __future__ import annotations

import ctypes
import platform

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_THRESHOLD = 1 << 30
"""Blocks up to 1 GiB come from the heap, and up to 1 GiB of free heap top stays with the process."""

_done = False


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process (once); False where the C library is
    not glibc (nothing to tune) or refuses the values."""
    global _done
    if _done:
        return True
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _done = bool(mallopt(_M_MMAP_THRESHOLD, _THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, _THRESHOLD))
    return _done
