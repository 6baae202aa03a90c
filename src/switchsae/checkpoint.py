"""Backend-neutral Switch SAE checkpoints, written atomically.

A checkpoint is a directory:

    cfg.json                  {"format": "switchsae", "format_version": 1, <SwitchSAEConfig fields>,
                              "sha256": {file name: digest of every other file}}
    sae_weights.safetensors   the spec's parameter names -> arrays (bfloat16 models as float32);
                              always the model for *raw* activations (any scaling folded in)
    optimizer.safetensors     (resumable checkpoints) "m.<name>", "v.<name>": Adam moments;
                              header metadata "step"
    trainer_state.json        (resumable checkpoints) step, data-source position, dead-latent
                              counters, activation scale, TrainConfig, ...

It is built in a hidden temporary directory beside the target (every file fsynced) and moved
into place with one rename (`switchsae.files.atomic_write_dir`), so a reader never sees a
half-written checkpoint, and a replace killed between its renames is completed by the next
reader.  Reading verifies every file against its digest in cfg.json.  A training run keeps
its checkpoints in `<run>/checkpoints/step_<n>`; `load(<run>)` takes the newest.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from switchsae.core.config import ConfigError, SwitchSAEConfig
from switchsae.files import atomic_write_dir, recover_dir

FORMAT = "switchsae"
FORMAT_VERSION = 1
CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "trainer_state.json"
DIGESTS_KEY = "sha256"
CHECKPOINTS_DIR = "checkpoints"
_STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, inconsistent, or would be written corrupt."""


@dataclass
class Checkpoint:
    """What a checkpoint directory holds, as NumPy arrays and plain dicts.

    optimizer: {"step": int, "m": {name: array}, "v": {name: array}} or None."""

    path: Path
    cfg: SwitchSAEConfig
    params: dict
    optimizer: dict | None = None
    trainer_state: dict | None = None


# -- writing ------------------------------------------------------------------------------
def write_checkpoint(path, cfg: SwitchSAEConfig, params: dict, *, optimizer: dict | None = None,
                     trainer_state: dict | None = None, overwrite: bool = False) -> Path:
    """Write a checkpoint directory atomically; returns its path.

    params: name -> NumPy array (raw-space model).  Refuses non-finite arrays (naming the
    tensor) so nothing corrupt is ever saved.  overwrite: replace an existing checkpoint."""
    _check_arrays(params, cfg.param_shapes(), "parameter")
    files = {WEIGHTS_FILE: _safetensors_bytes(params, {"format": FORMAT, "dtype": cfg.dtype})}
    if optimizer is not None:
        moments = {}
        for kind in ("m", "v"):
            _check_arrays(optimizer[kind], cfg.param_shapes(), f"Adam {kind}")
            moments.update({f"{kind}.{name}": a for name, a in optimizer[kind].items()})
        files[OPTIMIZER_FILE] = _safetensors_bytes(
            moments, {"format": FORMAT, "step": str(int(optimizer["step"]))})
    if trainer_state is not None:
        files[STATE_FILE] = _json_bytes(trainer_state)
    digests = {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}
    files[CFG_FILE] = _json_bytes({"format": FORMAT, "format_version": FORMAT_VERSION, **cfg.to_dict(),
                                   DIGESTS_KEY: digests})
    path = Path(path)
    if path.is_dir() and not any(path.iterdir()):
        path.rmdir()  # an empty directory holds nothing to lose
    recover_dir(path)
    if path.exists() and not (overwrite and is_native(path)):
        what = ("a switchsae checkpoint (pass overwrite=True)" if is_native(path)
                else "not a switchsae checkpoint")
        raise CheckpointError(f"{path} already exists and is {what}; not overwriting")
    return atomic_write_dir(path, files)


def save(sae, path, overwrite: bool = True) -> Path:
    """Save a `SwitchSAE` (config + weights) to directory `path`, loadable by every backend.

    An existing switchsae checkpoint at `path` is replaced when `overwrite`, an empty
    directory always; any other file or directory is left alone with an error."""
    return write_checkpoint(path, sae.cfg, sae.numpy_params(), overwrite=overwrite)


def _check_arrays(arrays: dict, shapes: dict, what: str, where: str = "refusing to save") -> None:
    """Raise CheckpointError unless `arrays` has exactly the config's names, shapes, finite values."""
    missing, unknown = sorted(set(shapes) - set(arrays)), sorted(set(arrays) - set(shapes))
    if missing or unknown:
        raise CheckpointError(f"{where}: {what}s do not match the config: missing {missing}, "
                              f"unexpected {unknown}")
    for name, a in arrays.items():
        if tuple(a.shape) != shapes[name]:
            raise CheckpointError(f"{where}: {what} {name} has shape {tuple(a.shape)}, "
                                  f"the config needs {shapes[name]}")
        if not np.all(np.isfinite(a)):
            raise CheckpointError(f"{where}: {what} {name} holds NaN or inf")


def _in_config_order(arrays: dict, shapes: dict) -> dict:
    """`arrays` keyed in the config's parameter order (safetensors stores names sorted): sums
    over parameters, such as the global gradient norm, then add in the order of a live run, which
    is what makes a resumed run exact."""
    return {name: arrays[name] for name in shapes}


def _json_bytes(obj) -> bytes:
    return (json.dumps(obj, indent=1, allow_nan=False) + "\n").encode()


def _safetensors_bytes(arrays: dict, metadata: dict) -> bytes:
    from safetensors.numpy import save as st_save

    return st_save({k: np.ascontiguousarray(v) for k, v in arrays.items()}, metadata=metadata)


# -- reading ------------------------------------------------------------------------------
def is_native(path: Path) -> bool:
    try:
        return json.loads((Path(path) / CFG_FILE).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError, RecursionError):
        return False


def list_checkpoints(run_dir) -> list[Path]:
    """Complete checkpoints of a training run, oldest first."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := _STEP_DIR.match(p.name)) and (p / CFG_FILE).is_file()]
    return [p for _, p in sorted(found)]


def resolve(path) -> Path:
    """A checkpoint directory, or a run directory -> its newest checkpoint."""
    path = Path(path)
    if not path.exists():
        recover_dir(path, clean=False)  # a replace killed between its two renames
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if (path / CFG_FILE).is_file() or not (path / CHECKPOINTS_DIR).is_dir():
        return path
    found = list_checkpoints(path)
    if not found:
        raise CheckpointError(f"run directory {path} holds no complete checkpoint")
    return found[-1]


def read_checkpoint(path, *, training_state: bool = True) -> Checkpoint:
    """Read a native checkpoint (or a run directory's newest) into NumPy arrays.

    training_state: also read optimizer.safetensors / trainer_state.json when present."""
    path = resolve(path)
    if not is_native(path):
        raise CheckpointError(f"{path} is not a switchsae checkpoint (no {CFG_FILE} with format {FORMAT!r})")
    raw = _read_json(path / CFG_FILE)
    version = raw.pop("format_version", None)
    raw.pop("format")
    digests = raw.pop(DIGESTS_KEY, {})
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(f"{path / CFG_FILE}: format_version {version!r} is not supported "
                              f"(this switchsae reads up to {FORMAT_VERSION})")
    try:
        cfg = SwitchSAEConfig.from_dict(raw)
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{path / CFG_FILE}: invalid config: {e}") from e
    shapes = cfg.param_shapes()
    _verify(path, WEIGHTS_FILE, digests)
    params, _ = read_safetensors(path / WEIGHTS_FILE)
    _check_arrays(params, shapes, "parameter", str(path / WEIGHTS_FILE))
    params = _in_config_order(params, shapes)
    ckpt = Checkpoint(path, cfg, params)
    if training_state and (path / OPTIMIZER_FILE).is_file():
        _verify(path, OPTIMIZER_FILE, digests)
        moments, meta = read_safetensors(path / OPTIMIZER_FILE)
        opt = {"step": int(meta.get("step", -1))}
        for kind in ("m", "v"):
            opt[kind] = {k[len(kind) + 1:]: a for k, a in moments.items() if k.startswith(kind + ".")}
            _check_arrays(opt[kind], shapes, f"Adam {kind}", str(path / OPTIMIZER_FILE))
            opt[kind] = _in_config_order(opt[kind], shapes)
        ckpt.optimizer = opt
    if training_state and (path / STATE_FILE).is_file():
        _verify(path, STATE_FILE, digests)
        ckpt.trainer_state = _read_json(path / STATE_FILE)
    return ckpt


def load(path, backend=None, dtype: str | None = None):
    """Load a native checkpoint as a `SwitchSAE` on `backend` (name, Backend, or None: the
    active one).  `path`: a switchsae checkpoint or a training run directory (its newest
    checkpoint); `switchsae.load` also reads SAELens and sparsify SAEs (`switchsae.interop`).
    dtype: override the stored dtype (e.g. "float32" to load a bfloat16 model on NumPy)."""
    from ._active import get_backend
    from .model import SwitchSAE

    backend = get_backend(backend) if backend is None or isinstance(backend, str) else backend
    ckpt = read_checkpoint(path, training_state=False)
    cfg = ckpt.cfg if dtype is None else ckpt.cfg.replace(dtype=dtype)
    if cfg.dtype not in backend.dtypes:
        raise CheckpointError(f"{path} holds a {cfg.dtype} model, which backend {backend.name!r} does not "
                              f"support; load it with dtype= one of {list(backend.dtypes)}")
    return SwitchSAE.from_params(cfg, ckpt.params, backend)


def _verify(path: Path, name: str, digests) -> None:
    """CheckpointError unless file `name` matches its digest in cfg.json (checkpoints written
    before digests were recorded have none: nothing to verify)."""
    if not isinstance(digests, dict):
        raise CheckpointError(f"{path / CFG_FILE}: {DIGESTS_KEY!r} must map file names to digests")
    if name not in digests:
        return
    if not (path / name).is_file():
        raise CheckpointError(f"checkpoint file {path / name} is missing")
    h = hashlib.sha256()
    try:
        with open(path / name, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                h.update(block)
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint file {path / name}: {e.strerror or e}") from e
    if h.hexdigest() != digests[name]:
        raise CheckpointError(f"{path / name} is corrupt: its sha256 does not match the one recorded in "
                              f"{CFG_FILE} when it was saved (changed or damaged since)")


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise CheckpointError(f"checkpoint file {path} is missing") from e
    except (OSError, ValueError, RecursionError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    return data


def read_safetensors(path) -> tuple[dict, dict]:
    """(name -> NumPy array, header metadata) of a safetensors file; BF16 tensors come back as
    float32 (NumPy has no bfloat16).  Raises CheckpointError for a missing or corrupt file."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} is missing")
    try:
        with safe_open(str(path), framework="numpy") as f:
            names = list(f.keys())
            bf16 = [k for k in names if f.get_slice(k).get_dtype() == "BF16"]
            arrays = {k: f.get_tensor(k) for k in names if k not in bf16}
            metadata = dict(f.metadata() or {})
        if bf16:
            arrays.update(_read_bf16(path, bf16))
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise CheckpointError(f"cannot read {path} (corrupt or not safetensors): {e}") from e
    return arrays, metadata


def _read_bf16(path: Path, names: list) -> dict:
    """BF16 tensors of a safetensors file as float32: the high 16 bits of each float32."""
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_len))
        data = f.read()
    out = {}
    for name in names:
        start, stop = header[name]["data_offsets"]
        bits = np.frombuffer(data[start:stop], dtype="<u2").astype(np.uint32) << 16
        out[name] = bits.view(np.float32).reshape(header[name]["shape"])
    return out
