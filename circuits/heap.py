"""The C heap under CPU tensors: keep freed memory for the next tensors instead of mapping it anew.

PyTorch takes CPU tensors from the C library's ``malloc``. glibc (Linux) serves each request
above its *mmap threshold* (128 KiB at first, rising with the sizes freed, to at most 32 MiB)
with a fresh mapping of zeroed pages and unmaps it when the tensor is freed. A run whose
temporaries are larger than that (the patched variants of a batch side by side: ``C x b x p x
d`` floats, tens to hundreds of MiB each) then has the kernel fault in and zero every page of
every temporary, every time. Measured on ACDC at the GPT-2-small shape (2 threads): 7.3 million
page faults and 13 s of kernel time in an 18 s sample of its runs; with the settings below, 0.7
million and 1.6 s, and the sample took 11 s.

`keep_freed_memory` raises the mmap threshold to 1 GiB (requests below it come from the heap)
and the trim threshold to 2 GiB (freed heap memory stays with the process), so a run's pages
are faulted in once and then reused. The memory goes back to the system when a measured block
ends (`circuits.cost.measure` trims the heap): a finished method holds no more than before.

The settings are process-wide and glibc has no call that undoes them, so they are opt-in: no
library call makes them (a notebook that frees a large tensor gets its memory back as before).
The ``circuits`` program makes them as it starts, and so do the benchmarks; a script or
notebook that runs many methods can call `keep_freed_memory` itself. Set the environment
variable ``CIRCUITS_KEEP_FREED_MEMORY=0`` to leave the C library's defaults alone even then.
Elsewhere than glibc (macOS, Windows, musl) nothing is changed.
"""

from __future__ import annotations

import ctypes
import functools
import os
from collections.abc import Callable

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
MMAP_THRESHOLD = 2**30  # requests below it come from the heap
MMAP_THRESHOLD_CAPPED = 2**25  # what glibc versions that cap the threshold accept at most
TRIM_THRESHOLD = 2**31 - 1  # free memory at the heap's top kept up to it (mallopt takes an int)


def _libc_function(name: str) -> Callable[..., int] | None:
    try:
        return getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError):
        return None


@functools.cache
def keep_freed_memory() -> bool:
    """Make the C heap keep freed memory for reuse, for the rest of the process (see the module
    notes); returns whether the settings were made. Done once per process; later calls return
    the first answer. The ``circuits`` program and the benchmarks call it; the library never
    does.

    Examples
    --------
    At the top of a script that runs many methods:

    >>> from circuits.heap import keep_freed_memory
    >>> isinstance(keep_freed_memory(), bool)
    True
    """
    if os.environ.get("CIRCUITS_KEEP_FREED_MEMORY", "1").strip().lower() in ("0", "false", "no"):
        return False
    mallopt = _libc_function("mallopt")
    if mallopt is None:
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    if not (mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
            or mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_CAPPED)):
        return False
    return bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None where the C library has none."""
    trim = _libc_function("malloc_trim")
    if trim is not None:
        trim.argtypes = [ctypes.c_size_t]
    return trim


def release_free_memory() -> None:
    """Hand the heap memory that is free back to the system (glibc's ``malloc_trim(0)``; a no-op
    elsewhere)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
