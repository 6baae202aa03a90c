"""Backend registry: `switchsae.use(name)` picks one; each lives in its own subpackage."""

from __future__ import annotations

import importlib
import importlib.util

# name -> (module holding `Backend`, modules it needs, pip extra)
REGISTRY = {
    "numpy": ("switchsae.backends.numpy", ("numpy",), ""),
    "torch": ("switchsae.backends.torch", ("torch",), "torch"),
    "jax": ("switchsae.backends.jax", ("jax",), "jax"),
    "mlx": ("switchsae.backends.mlx", ("mlx.core",), "mlx"),  # a bare "mlx" folder is no MLX
}


class BackendError(ValueError):
    """Unknown or uninstalled backend."""


def _found(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a dotted name whose parent is missing
        return False


def _requirements_met(name: str) -> bool:
    module, needs, _ = REGISTRY[name]
    return all(_found(req) for req in needs) and _found(module)


def installed_backends() -> list[str]:
    """Names of the backends whose framework is importable here."""
    return [name for name in REGISTRY if _requirements_met(name)]


_cache: dict = {}


def load_backend(name: str):
    """Instantiate backend `name` (cached), or raise BackendError naming what is installed."""
    name = name.strip().lower()
    if name in _cache:
        return _cache[name]
    if name not in REGISTRY:
        raise BackendError(
            f"unknown backend {name!r}; known: {sorted(REGISTRY)}; installed: {installed_backends()}"
        )
    module, _, extra = REGISTRY[name]
    if not _requirements_met(name):
        raise BackendError(
            f"backend {name!r} is not installed (pip install 'switchsae[{extra}]'); "
            f"installed: {installed_backends()}"
        )
    _cache[name] = importlib.import_module(module).Backend()
    return _cache[name]
