"""Process-wide settings that make evaluations faster: opt-in, since they reach beyond vaeeval.

The ``vaeeval`` command makes them at start-up. A library user who wants the
same speed calls them once, knowing they affect the whole process::

    from vaeeval.core import tuning
    tuning.keep_freed_memory()
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os

import torch

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


@functools.cache
def keep_freed_memory() -> bool:
    """Let glibc reuse freed tensor memory instead of unmapping it (once per process; Linux only).

    Each chunk allocates and frees the same few tensors of some megabytes. By default
    glibc serves those with fresh ``mmap``s, which the kernel zeroes page by page on
    first touch: a quarter of the run time on the benchmark. Raising the mmap and trim
    thresholds (as ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` would) keeps
    them in the heap for reuse. This is process-wide; peak memory is unchanged.

    Returns:
        Whether the setting could be made (False off glibc).
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, 32 * 2**20)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**30))
    except (OSError, AttributeError):
        return False


def share_cores(processes_on_this_machine: int) -> None:
    """Give each of the processes on this machine (torchrun's local world) an equal share of the cores."""
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // processes_on_this_machine))
