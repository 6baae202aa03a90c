"""The active backend: `use(name)`, else $SWITCHSAE_BACKEND, else numpy."""

from __future__ import annotations

import os

from switchsae.backends import BackendError, load_backend

_active = {"backend": None}


def use(name: str):
    """Make `name` ("numpy", "torch", "jax", "mlx") the active backend and return it."""
    if not isinstance(name, str):
        raise BackendError(f"use() takes a backend name (numpy, torch, jax or mlx), got {name!r}")
    _active["backend"] = load_backend(name)
    return _active["backend"]


def get_backend(name: str | None = None):
    """The backend called `name`, or the active one."""
    if name is not None and not isinstance(name, str):
        raise BackendError(f"a backend name (numpy, torch, jax or mlx) or None, got {name!r}")
    if name is not None:
        return load_backend(name)
    if _active["backend"] is None:
        _active["backend"] = load_backend(os.environ.get("SWITCHSAE_BACKEND", "numpy"))
    return _active["backend"]


def backend_name() -> str:
    """Name of the active backend."""
    return get_backend().name
