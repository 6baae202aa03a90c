"""Which device the torch backend puts arrays on: $SWITCHSAE_DEVICE, else CUDA when present, else
CPU; and how CPU memory is handed out."""

from __future__ import annotations

import ctypes
import functools
import os
import platform

import torch

ENV_VAR = "SWITCHSAE_DEVICE"
KEEP_FREED_ENV_VAR = "SWITCHSAE_KEEP_FREED_MEMORY"


class DeviceError(RuntimeError):
    """$SWITCHSAE_DEVICE names a device torch cannot use here."""


def select_device(name: str | None = None) -> torch.device:
    """`name` (e.g. "cpu", "cuda:1", "mps"), else $SWITCHSAE_DEVICE, else cuda if available, else cpu."""
    name = name or os.environ.get(ENV_VAR, "").strip()
    if not name:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise DeviceError(f"{ENV_VAR}={name!r} is not a torch device: {err}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"{ENV_VAR}={name!r} asks for CUDA, but torch sees no CUDA device")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceError(f"{ENV_VAR}={name!r} asks for MPS, but it is not available")
    return device


@functools.cache
def keep_freed_cpu_memory() -> bool:
    """Have glibc's malloc keep freed memory for reuse rather than return it to the kernel
    (M_MMAP_MAX 0: large blocks come from the heap; M_TRIM_THRESHOLD 1 GiB: no trimming), as
    CUDA's caching allocator does for GPU memory.  A train step allocates the same (batch, d) and
    (N, m, d) buffers every step; handed back, each is page-faulted in again (about 5 % of a CPU
    step).  Process-wide; off with $SWITCHSAE_KEEP_FREED_MEMORY=0.  -> whether it was applied
    (False without glibc, e.g. on macOS)."""
    if os.environ.get(KEEP_FREED_ENV_VAR, "1") == "0" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL("libc.so.6")
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # <malloc.h>
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 1 << 30))
