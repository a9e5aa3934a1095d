"""CPU inference without the kernel tax: the inference child's heap and threads.

glibc's malloc serves every block above 32 MiB with its own ``mmap`` and gives it back with
``munmap`` when freed. A 3D U-Net's activations on a 48 x 208 x 208 window are 60-130 MiB each,
so every layer of every fold on every window mapped fresh pages, and the kernel faulted and
zeroed each 4 KiB page on first touch: about 600 000 page faults and a third of the CPU time in
the kernel per forward pass of the demo model (``bench/infer.py`` prints user, sys and faults).
:func:`keep_freed_memory` turns that off for the process, so freed activations stay in the heap
and the next window reuses them; :func:`release_freed_memory` hands the heap back to the system
after a job, so an idle child does not hold its peak. Neither changes a single computed value.

Both are no-ops where the C library is not glibc (its ``mallopt``/``malloc_trim`` are missing).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

# glibc's malloc.h
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def keep_freed_memory() -> bool:
    """Serve large blocks from the heap and keep freed ones for reuse (no per-block mmap);
    True when the C library took the settings."""
    libc = _libc()
    if libc is None:
        return False
    # no block gets its own mapping; a trim threshold of -1 (SIZE_MAX) never shrinks the heap
    # by itself: release_freed_memory does, once the job is done
    return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, -1))


def release_freed_memory() -> None:
    """Give the heap's free pages back to the system (after a job)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def cpu_threads() -> int:
    """Threads for torch's CPU kernels: the cores this process may run on (its affinity, which
    a container's or systemd's CPU set narrows), not the machine's."""
    return len(os.sched_getaffinity(0))
