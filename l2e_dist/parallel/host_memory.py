"""The process-wide host-memory settings of a training process, applied by one explicit call of its entry point.

`apply_process_settings()` is that call (launcher/pretrain.py, launcher/bench.py, ...): the first thing an entry
point does, before anything allocates a tensor. Importing a module changes nothing.

Transparent huge pages (THP_MEM_ALLOC_ENABLE=1): torch then aligns host allocations of 2 MiB and more to 2 MiB
and madvises them as huge pages, so a fresh large buffer (the dense embedding gradient at Pythia's vocabulary)
takes far fewer page faults. torch reads the variable once, at its first CPU allocation, and importing
megatron-core or DeepSpeed already allocates: hence "before anything allocates". Only host memory is affected;
set THP_MEM_ALLOC_ENABLE=0 to opt out.

Host memory that stays mapped (CPU training only): PyTorch's CPU allocator is plain malloc/free, and with
glibc's defaults every buffer above the mmap threshold (with THP: every buffer of 2 MiB and more) is a fresh
mmap, unmapped when freed, so the next step's buffer of the same size page-faults all its memory in again, every
step. A training step allocates the same sizes every step, so freed memory is kept for reuse, as a caching
allocator (the CUDA one, jemalloc, tcmalloc) does: buffers up to 32 MiB come from the heap (M_MMAP_THRESHOLD,
glibc's largest; it also stops the threshold's own growth) and the heap's free top is not trimmed
(M_TRIM_THRESHOLD). Larger buffers stay mmapped, with THP's 2 MiB pages, because their slightly different sizes
fragment the heap. The price is a resident size that stays near its peak, which is why a GPU run, whose host
memory is the checkpoint writer's and the data loader's, keeps glibc's defaults. The figures behind both
settings: docs/benchmarks.md, "Host memory". Opt out with L2E_KEEP_HOST_MEMORY=0. Without glibc (musl, macOS)
nothing is changed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
from dataclasses import dataclass

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


@dataclass(frozen=True)
class ProcessSettings:
    """What `apply_process_settings` left in effect for this process."""

    huge_pages: bool  # THP_MEM_ALLOC_ENABLE=1 (unless the user set it to 0)
    kept_host_memory: bool  # glibc keeps freed memory mapped (keep_host_memory)


_applied: ProcessSettings | None = None


def apply_process_settings(keep_freed_memory: bool | None = None) -> ProcessSettings:
    """Apply the process-wide host-memory settings (see the module docstring); call it first in an entry point,
    before anything allocates a tensor, or torch never sees THP_MEM_ALLOC_ENABLE.

    keep_freed_memory: whether freed host memory stays mapped. None (a training run whose device its config
    decides later): when no CUDA GPU is visible, i.e. when `parallel.device: auto` trains on the CPU; a GPU run's
    host memory is the checkpoint writer's and the data loader's, which should be given back."""
    global _applied
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    if keep_freed_memory is None:
        import torch  # after THP_MEM_ALLOC_ENABLE; importing torch itself allocates no tensor

        keep_freed_memory = not torch.cuda.is_available()
    _applied = ProcessSettings(
        huge_pages=os.environ["THP_MEM_ALLOC_ENABLE"] == "1",
        kept_host_memory=keep_freed_memory and keep_host_memory(),
    )
    return _applied


def applied_process_settings() -> ProcessSettings | None:
    """The settings `apply_process_settings` applied in this process, None when it was not called."""
    return _applied
