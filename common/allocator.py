"""Keep freed training buffers inside the process instead of handing them back to the OS.

glibc serves allocations above its mmap threshold (128 kB to start with) by
mapping fresh pages and unmaps them again on free, so every training step of a
conv net faults its activation buffers in anew (for the Omniglot net, the page
faults per step and the CPU time they cost are in benchmarks/results/train_step.json,
made by `simulations/benchmarks/train_step.py`). Raising the
mmap and trim thresholds lets freed buffers be reused from the heap. The cost
is that memory freed after a peak stays with the process until it exits.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 256 * 1024 * 1024  # larger than any activation of the zoo's models
TRIM_THRESHOLD = 1024 * 1024 * 1024

log = logging.getLogger(__name__)


def keep_freed_memory() -> bool:
    """Tune glibc's malloc for repeated training steps; False (and nothing changed) elsewhere."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS): leave the allocator alone
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    done = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    if not done:
        log.debug("mallopt refused the thresholds; the allocator keeps its defaults")
    return done
