"""Peak memory of a piece of work: the framework's counter on CUDA, process RSS on CPU."""

from __future__ import annotations

import threading
import time


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


class PeakRSS:
    """Context manager sampling the resident set size every `interval` seconds;
    `.peak_delta` is the peak above the RSS at entry (bytes)."""

    def __init__(self, interval: float = 0.001):
        self.interval = interval
        self.peak_delta = 0

    def __enter__(self):
        self._base = self._peak = _rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self._peak = max(self._peak, _rss_bytes())
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, _rss_bytes())
        self.peak_delta = self._peak - self._base


def peak_memory(fn, backend) -> tuple[int, str]:
    """Run fn() once; -> (peak bytes it needed, how it was measured)."""
    if backend.name == "torch" and backend.device_name().startswith("cuda"):
        import torch

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        backend.block_until_ready(fn())
        return torch.cuda.max_memory_allocated() - before, "torch.cuda.max_memory_allocated"
    with PeakRSS() as rss:
        backend.block_until_ready(fn())
    return rss.peak_delta, "process RSS peak delta"
