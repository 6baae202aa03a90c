"""`export`: a Switch SAE as a SAELens or sparsify SAE directory, written atomically.

    switchsae.export(sae_or_checkpoint, "out/sae", format="saelens")   # or "sparsify"

N = 1 without a shared expert becomes the peer's own TopK SAE (loadable with the peer
alone: `sae_lens.SAE.load_from_disk`, `sparsify.SparseCoder.load_from_disk`).  Any other
Switch SAE goes to SAELens as architecture "switch", loadable once
`switchsae.integrations.saelens` is imported; sparsify has no such registry, so it is refused.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.numpy import save as safetensors_bytes

from switchsae.files import atomic_write_dir

from . import saelens, sparsify
from .fields import CFG_FILE, InteropError

FORMATS = ("saelens", "sparsify")


def export(sae, out, format: str = "saelens", metadata: dict | None = None) -> Path:
    """Write `sae` (a SwitchSAE, or a path `switchsae.load` reads) to the new directory `out`
    for `format` ("saelens" or "sparsify"); returns `out`.  metadata: extra SAELens metadata
    (e.g. {"model_name": ..., "hook_name": ...}).  `out` must not exist or be empty."""
    from switchsae.model import SwitchSAE

    from . import load

    if format not in FORMATS:
        raise InteropError(f"format must be one of {FORMATS}, got {format!r}")
    if metadata is not None and not isinstance(metadata, dict):
        raise InteropError(f"metadata must be a dict, got {type(metadata).__name__}")
    out = Path(out)
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        raise InteropError(f"{out} already exists; export writes a new directory (remove it or pick another)")
    if not isinstance(sae, SwitchSAE):
        sae = load(sae, backend="numpy")
    cfg, params = sae.cfg, sae.numpy_params()
    if format == "sparsify":
        weights, config, name = sparsify.tensors(cfg, params), sparsify.cfg_json(cfg), sparsify.WEIGHTS_FILE
    else:
        weights, config = saelens.tensors(cfg, params), saelens.cfg_json(cfg, metadata or {})
        name = saelens.WEIGHTS_FILE
    files = {CFG_FILE: (json.dumps(config, indent=1) + "\n").encode(), name: safetensors_bytes(weights)}
    return atomic_write_dir(out, files)
