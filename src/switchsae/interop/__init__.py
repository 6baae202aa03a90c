"""SAE checkpoints of the ecosystem: load switchsae, SAELens and sparsify directories as a
`SwitchSAE`, and export a `SwitchSAE` for SAELens or sparsify (`export`).

`load` takes a switchsae checkpoint or training run, a SAELens SAE directory, a sparsify
SAE directory or a sparsify training run holding one hookpoint.  Foreign options are mapped
exactly or refused with an `InteropError` naming them (see `.saelens`, `.sparsify`).
"""

from __future__ import annotations

from pathlib import Path

from switchsae.checkpoint import is_native, resolve
from switchsae.checkpoint import load as load_native

from . import saelens, sparsify
from .export import FORMATS, export
from .fields import InteropError

__all__ = ["FORMATS", "InteropError", "export", "load", "read_foreign"]


def load(path, backend=None, dtype: str | None = None):
    """A `SwitchSAE` from any supported directory (see the module docstring) on `backend`
    (name, Backend or None: the active one).  dtype: default the stored one (float32 for
    foreign SAEs)."""
    from switchsae._active import get_backend
    from switchsae.model import SwitchSAE

    path = resolve(path)
    if is_native(path):
        return load_native(path, backend=backend, dtype=dtype)
    cfg, params = read_foreign(path)
    backend = get_backend(backend) if backend is None or isinstance(backend, str) else backend
    return SwitchSAE.from_params(cfg.replace(dtype=dtype or "float32"), params, backend)


def read_foreign(path) -> tuple:
    """(SwitchSAEConfig, NumPy float64 parameters) of a SAELens or sparsify directory."""
    path = Path(path)
    if sparsify.is_sparsify(path):
        return sparsify.read(path)
    if saelens.is_saelens(path):
        return saelens.read(path)
    found = sparsify.hookpoints(path)
    if len(found) == 1:
        return sparsify.read(found[0])
    if found:
        raise InteropError(f"{path} is a sparsify run with {len(found)} hookpoints; load one of them: "
                           + ", ".join(str(p) for p in found))
    raise InteropError(f"{path} is neither a switchsae checkpoint nor a SAELens ({saelens.WEIGHTS_FILE}) "
                       f"or sparsify ({sparsify.WEIGHTS_FILE}) SAE directory")
