"""Host buffers for arrays that JAX's CPU backend adopts without copying them.

`jax.device_put` on CPU aliases a C-contiguous NumPy array whose data is 64-byte
aligned instead of copying it, so a prediction written on the host (`ghn.hypernet.
predict`) costs its bytes once. Large buffers start on a 2 MB boundary and are advised
as transparent huge pages (Linux `madvise(MADV_HUGEPAGE)`; the kernel's default
"madvise" mode honours it): writing fresh 4 KB pages costs a page fault each, measured
on a 2-core Xeon at ~1.2 ms per MB (3.4 s for GPT-2 Large's 2.9 GB of parameters),
against ~0.2 ms per MB for huge pages, including the GEMM that writes them.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import math
import sys

import numpy as np

ALIGN = 64
HUGE_PAGE = 2 << 20
# Smaller buffers are not worth up to 2 MB of unused address space each.
HUGE_MIN = 4 * HUGE_PAGE
_MADV_HUGEPAGE = 14  # linux/mman.h


@functools.cache
def _madvise():
    """libc's `madvise`, or None off Linux or when it cannot be found."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def empty(shape: tuple[int, ...], dtype) -> np.ndarray:
    """An uninitialized C-contiguous array that `jax.device_put` on CPU adopts as is.

    The array keeps its (slightly larger) allocation alive through `.base`; huge pages
    are only advice, so the result is the same wherever the kernel declines.
    """
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    align = HUGE_PAGE if nbytes >= HUGE_MIN else ALIGN
    raw = np.empty(nbytes + align, np.uint8)
    start = -raw.ctypes.data % align
    madvise = _madvise() if align == HUGE_PAGE else None
    if madvise is not None:
        madvise(raw.ctypes.data + start, nbytes - nbytes % HUGE_PAGE, _MADV_HUGEPAGE)
    return raw[start : start + nbytes].view(dtype).reshape(shape)
