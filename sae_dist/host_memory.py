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


def _glibc(name: str):
    """glibc's function `name`, or None where the C library has none."""
    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c")), name)
    except (OSError, AttributeError):
        return None


def keep_freed_host_memory(keep: bool = True) -> bool:
    """Make malloc keep freed memory for reuse (`keep`), or restore glibc's defaults; return whether the C library
    took the settings (False where it has no glibc `mallopt`)."""
    mallopt = _glibc("mallopt")
    if mallopt is None:
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return all(mallopt(parameter, value) == 1 for parameter, value in (_KEPT if keep else _GLIBC_DEFAULTS).items())


def release_freed_host_memory() -> bool:
    """Give the memory that malloc keeps back to the system now (glibc's `malloc_trim(0)`, every arena), so that
    the resident set falls to what is in use, e.g. before measuring a peak; return whether glibc did so."""
    malloc_trim = _glibc("malloc_trim")
    if malloc_trim is None:
        return False
    malloc_trim.argtypes, malloc_trim.restype = (ctypes.c_size_t,), ctypes.c_int
    malloc_trim(0)
    return True
