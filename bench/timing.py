"""Wall-clock timing with warm-up and repeats; median and spread."""

from __future__ import annotations

import statistics
import time


def measure(fn, sync, warmup: int = 2, repeats: int = 5, min_time: float = 0.0) -> dict:
    """Run `fn()` `warmup` times, then `repeats` timed calls (at least `min_time` seconds in
    all); `sync(result)` waits for asynchronous devices.  -> seconds: median, min, max, all."""
    for _ in range(warmup):
        sync(fn())
    times = []
    start = time.perf_counter()
    while len(times) < repeats or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        sync(fn())
        times.append(time.perf_counter() - t0)
    return {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "repeats": len(times),
    }
