"""Timing with warm-up and repeats; median and spread.  torch on CUDA is timed with CUDA events
on the device's stream; everything else by the wall clock around the call and a wait for its
results (`Backend.block_until_ready`)."""

from __future__ import annotations

import statistics
import time

# dictionary_learning's ActivationBuffer batch of 8192 activations, which the paper's trainer
# uses: the benchmarks' default batch
PAPER_BATCH = 8192


def timer_name(backend) -> str:
    return "cuda events" if _on_cuda(backend) else "wall clock"


def measure(fn, backend, warmup: int = 2, repeats: int = 5, min_time: float = 0.0) -> dict:
    """Run `fn()` `warmup` times, then `repeats` timed calls (at least `min_time` seconds in
    all) on `backend`'s device.  -> seconds: median, min, max, and the number of calls."""
    time_call = _cuda_events(backend) if _on_cuda(backend) else _wall_clock(backend)
    for _ in range(warmup):
        backend.block_until_ready(fn())
    times = []
    start = time.perf_counter()
    while len(times) < repeats or time.perf_counter() - start < min_time:
        times.append(time_call(fn))
    return {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "repeats": len(times),
    }


def _on_cuda(backend) -> bool:
    return backend.name.startswith("torch") and backend.device_name().startswith("cuda")


def _wall_clock(backend):
    def time_call(fn) -> float:
        t0 = time.perf_counter()
        backend.block_until_ready(fn())
        return time.perf_counter() - t0

    return time_call


def _cuda_events(backend):
    import torch

    stream = torch.cuda.current_stream(backend.device)

    def time_call(fn) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        fn()
        end.record(stream)
        end.synchronize()
        return start.elapsed_time(end) / 1e3  # ms -> s

    return time_call
