"""A description of the machine a benchmark ran on (CPU/GPU model, cores, library versions)."""

from __future__ import annotations

import importlib.metadata
import os
import platform


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe(backends=()) -> dict:
    """JSON-ready machine record; `backends`: Backend objects whose devices to name."""
    versions = {}
    for package in ("switchsae", "numpy", "torch", "jax", "jaxlib", "mlx", "triton"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            continue
    return {
        "cpu": cpu_model(),
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "devices": {b.name: b.device_name() for b in backends},
        "versions": versions,
    }
