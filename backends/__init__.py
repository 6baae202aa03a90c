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


# name -> the parallel modes its `distributed.parallel_backend` trains with
PARALLEL_MODES = {"torch": ("data", "expert"), "jax": ("data", "expert"), "mlx": ("data",)}


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


def load_parallel_backend(name: str, mode: str, **kwargs):
    """Backend `name` training with `mode` ("data" | "expert") parallelism: torch over the
    processes of a torchrun launch, JAX over its devices in this process, MLX over the processes
    of an `mlx.launch` (data parallel only).  kwargs go to the backend's
    `distributed.parallel_backend`.  Raises BackendError naming what is possible."""
    name = name.strip().lower()
    load_backend(name)  # known and installed
    if mode not in PARALLEL_MODES.get(name, ()):
        offered = [f"{b} ({', '.join(m)})" for b, m in PARALLEL_MODES.items()]
        raise BackendError(f"backend {name!r} has no {mode!r} parallel training; parallel backends: "
                           f"{'; '.join(offered)}")
    return importlib.import_module(REGISTRY[name][0] + ".distributed").parallel_backend(mode, **kwargs)
