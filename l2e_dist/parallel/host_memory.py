"""Host memory that stays mapped: glibc's malloc as a caching allocator for training on CPU.

PyTorch's CPU allocator is plain malloc/free. With glibc's defaults every buffer above the (dynamic) mmap
threshold is a fresh mmap, and with THP_MEM_ALLOC_ENABLE=1 (launcher/__init__.py) every buffer of 2 MiB and
more is: freeing it unmaps it, so the next step's activation, logits chunk or gradient of that size page-faults
all its memory in again, every step (the figures: docs/benchmarks.md, "Host memory").

A training step allocates the same sizes every step, so keeping freed memory for reuse is what a caching
allocator (the CUDA one, jemalloc, tcmalloc) does: buffers up to 32 MiB come from the heap (M_MMAP_THRESHOLD,
glibc's largest; it also stops the threshold's own growth), and the heap's free top is not trimmed
(M_TRIM_THRESHOLD). Larger buffers (a Pythia-vocabulary embedding gradient: 100 MB) stay mmapped, with THP's
2 MiB pages: in the heap their slightly different sizes fragmented it (peak RSS grew by hundreds of MiB). The price
is that the process's resident size stays near its peak; that is why it is applied on CPU runs only (on a GPU the
step's memory is the CUDA caching allocator's, and host memory is the checkpoint writer's and the data loader's,
which should be given back).
Opt out with L2E_KEEP_HOST_MEMORY=0. Without glibc (musl, macOS) nothing is changed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_TRIM_THRESHOLD_BYTES = 2**31 - 1  # mallopt takes a C int: trim only a free heap top of over 2 GiB
_MMAP_THRESHOLD_BYTES = 32 << 20  # glibc's largest on 64-bit (HEAP_MAX_SIZE / 2)


@functools.cache
def keep_host_memory() -> bool:
    """Make freed host memory reusable without page faults (see the module docstring). Returns whether it was
    applied: False when opted out or when the C library is not glibc. Idempotent."""
    if os.environ.get("L2E_KEEP_HOST_MEMORY", "1") == "0":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # noqa: B018 - glibc only; AttributeError elsewhere
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    heap_up_to_32mib = bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES))
    return heap_up_to_32mib and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD_BYTES))
