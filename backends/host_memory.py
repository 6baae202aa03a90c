"""Host (CPU) memory: keep freed memory for reuse, for the backends whose CPU allocations go
through glibc's malloc (torch's CPU allocator, XLA's CPU client)."""

from __future__ import annotations

import ctypes
import functools
import os
import platform

KEEP_FREED_ENV_VAR = "SWITCHSAE_KEEP_FREED_MEMORY"


@functools.cache
def keep_freed_cpu_memory() -> bool:
    """Have glibc's malloc keep freed memory for reuse rather than return it to the kernel
    (M_MMAP_MAX 0: large blocks come from the heap; M_TRIM_THRESHOLD 1 GiB: no trimming), as
    CUDA's caching allocator does for GPU memory.  A train step allocates the same (batch, d) and
    (N, m, d) buffers every step (torch's tensors, XLA's temporaries); handed back, each is
    page-faulted in again (about 5 % of a torch CPU step).  M_ARENA_MAX 1: every thread allocates
    from the main heap; a thread's own arena maps a block larger than its 64 MiB heaps whatever
    M_MMAP_MAX says, and unmaps it when freed (XLA's CPU client runs a step on a worker thread:
    ~75 k page faults, ~0.1 s, per JAX step at d 768, M 24576).  That one takes effect only for
    threads that have not allocated yet: call this before starting them.  Over the first tens of
    steps the heap still grows now and then (glibc 2.36's memalign needs more than an exactly sized
    freed block, and XLA's buffers are 64-byte aligned) until its freed blocks cover every request.
    Process-wide; off with
    $SWITCHSAE_KEEP_FREED_MEMORY=0.  -> whether it was applied (False without glibc, e.g. on macOS)."""
    if os.environ.get(KEEP_FREED_ENV_VAR, "1") == "0" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL("libc.so.6")
    M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8  # <malloc.h>
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)) \
        and bool(libc.mallopt(M_ARENA_MAX, 1))
