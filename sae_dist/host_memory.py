"""Freed host memory kept for the process's next allocations (glibc's malloc), which spares a CPU run its page faults.

On a CPU every forward pass allocates its activations afresh. glibc's malloc takes each allocation above its mmap
threshold (32 MiB at most) straight from the system and gives it back when it is freed, so the next forward
faults every page in again and the kernel zeroes it: about 120,000 minor page faults per MiniLM forward of 8192
tokens to block 3, some 10% of its CPU time (1,000 to 2,000 with this setting; `bench_lm.py` times both). With
mmap off for malloc and the heap's free top trimmed only beyond 2 GiB, freed memory is reused instead; the
process then keeps its peak, which a training job reaches again at every step anyway. Where the C library is not
glibc, nothing changes.
"""

from __future__ import annotations

import ctypes
import ctypes.util

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
"""glibc's mallopt parameters (malloc.h)."""
_KEPT = {_M_TRIM_THRESHOLD: 2**31 - 1, _M_MMAP_MAX: 0}
_GLIBC_DEFAULTS = {_M_TRIM_THRESHOLD: 128 * 1024, _M_MMAP_MAX: 65536}


def keep_freed_host_memory(keep: bool = True) -> bool:
    """Make malloc keep freed memory for reuse (`keep`), or restore glibc's defaults; return whether the C library
    took the settings (False where it has no glibc `mallopt`)."""
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c")).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return all(mallopt(parameter, value) == 1 for parameter, value in (_KEPT if keep else _GLIBC_DEFAULTS).items())
