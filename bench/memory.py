"""Peak memory of a piece of work: the framework's own counter where it has one (torch on CUDA,
MLX), else the process's resident set.

The resident-set measure on Linux resets the kernel's high-water mark (VmHWM, via
/proc/self/clear_refs) after handing freed heap memory back (malloc_trim), so memory an earlier
measurement freed but the allocator kept cannot hide this one's allocations; elsewhere it samples
the resident set in a thread."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import resource
import sys
import threading
import time


def _status_bytes(field: str) -> int:
    """A size from /proc/self/status (kB there), in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def _reset_high_water_mark() -> bool:
    """Release free heap memory and reset VmHWM to the current RSS; False where unsupported."""
    libc_name = ctypes.util.find_library("c")
    if libc_name:
        libc = ctypes.CDLL(libc_name)
        if hasattr(libc, "malloc_trim"):
            libc.malloc_trim(0)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _rss_bytes() -> int:
    if sys.platform.startswith("linux"):
        return _status_bytes("VmRSS")
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, kB elsewhere
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale  # peak so far: a lower bound


class PeakRSS:
    """Context manager: `.peak_delta` is the peak resident set above the one at entry (bytes)."""

    def __init__(self, interval: float = 0.001):
        self.interval = interval
        self.peak_delta = 0

    def __enter__(self):
        gc.collect()
        self._hwm = _reset_high_water_mark()
        self._base = self._peak = _rss_bytes()
        if not self._hwm:
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self._peak = max(self._peak, _rss_bytes())
            time.sleep(self.interval)

    def __exit__(self, *exc):
        if self._hwm:
            self._peak = _status_bytes("VmHWM")
        else:
            self._stop.set()
            self._thread.join()
            self._peak = max(self._peak, _rss_bytes())
        self.peak_delta = max(0, self._peak - self._base)

    @property
    def how(self) -> str:
        return "process RSS high-water mark delta" if self._hwm else "process RSS peak delta (sampled)"


def peak_memory(fn, backend) -> tuple[int, str]:
    """Run fn() once; -> (peak bytes it needed, how it was measured)."""
    if backend.name == "torch" and backend.device_name().startswith("cuda"):
        import torch

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        backend.block_until_ready(fn())
        return torch.cuda.max_memory_allocated() - before, "torch.cuda.max_memory_allocated"
    if backend.name == "mlx":
        import mlx.core as mx

        mx.reset_peak_memory()
        before = mx.get_active_memory()
        backend.block_until_ready(fn())
        return mx.get_peak_memory() - before, "mx.get_peak_memory"
    with PeakRSS() as rss:
        backend.block_until_ready(fn())
    return rss.peak_delta, rss.how
