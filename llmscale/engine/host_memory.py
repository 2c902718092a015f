"""Keep freed activation buffers in the process instead of handing them back to the kernel.

A CPU step allocates multi-MB activations (a 2,048-token prefill chunk: ~75 MB per decoder
layer) and frees them a moment later. glibc serves such sizes with fresh `mmap`s, or trims
them off the heap top, so the next step page-faults them back in and the kernel zeroes every
page: ~15,000 faults per prefill step of SmolLM2-135M on a 2-core CPU. Raising glibc's mmap
and trim thresholds makes those buffers ordinary heap blocks, reused across steps without a
fault (vLLM's CPU backend gets the same from tcmalloc via LD_PRELOAD).
"""

from __future__ import annotations

import ctypes
import functools
import logging

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3  # glibc's mallopt parameters
MMAP_THRESHOLD_MAX = 32 << 20  # the largest mmap threshold glibc accepts on 64-bit
TRIM_THRESHOLD = 1 << 30  # free heap top kept for reuse
TOP_PAD = 64 << 20  # extra heap grown per sbrk, so growth itself faults less often


@functools.cache
def keep_freed_memory() -> bool:
    """Tune glibc's allocator for this process, once; False where it is not glibc."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok = all(mallopt(param, value) == 1 for param, value in (
        (M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX), (M_TRIM_THRESHOLD, TRIM_THRESHOLD), (M_TOP_PAD, TOP_PAD)))
    if not ok:
        log.warning("mallopt refused a setting: large CPU buffers may page-fault every step")
    return ok
