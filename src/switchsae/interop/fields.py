"""Reading a foreign SAE directory strictly: its cfg.json fields by type (never coerced) and
its safetensors tensors by name, rank and finiteness."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from switchsae.checkpoint import CheckpointError, read_safetensors

CFG_FILE = "cfg.json"  # the name SAELens and sparsify both give their config


class InteropError(ValueError):
    """A foreign SAE checkpoint this library cannot represent exactly, or a malformed one."""


def read_cfg(directory: Path) -> "Fields":
    """The JSON object in `directory`/cfg.json as `Fields`."""
    path = directory / CFG_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise InteropError(f"{path} is missing") from e
    except (OSError, UnicodeDecodeError) as e:
        raise InteropError(f"cannot read {path}: {e}") from e
    try:
        cfg = json.loads(text)
    except RecursionError as e:
        raise InteropError(f"{path} is nested too deeply to be an SAE config") from e
    except ValueError as e:
        raise InteropError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(cfg, dict):
        raise InteropError(f"{path} must hold a JSON object, not {type(cfg).__name__}")
    return Fields(cfg, path)


class Fields:
    """Typed access to a cfg.json object; every error names the file and the field."""

    def __init__(self, data: dict, path: Path):
        self.data, self.path = data, path

    def __contains__(self, name: str) -> bool:
        return name in self.data

    def error(self, message: str) -> InteropError:
        return InteropError(f"{self.path}: {message}")

    def _get(self, name, default, ok, what):
        if name not in self.data:
            return default
        value = self.data[name]
        if not ok(value):
            raise self.error(f"{name} must be {what}, got {value!r}")
        return value

    def int(self, name: str, default=None, minimum: int | None = None):
        value = self._get(name, default, lambda v: isinstance(v, int) and not isinstance(v, bool),
                          "an integer")
        if value is not None and minimum is not None and value < minimum:
            raise self.error(f"{name} must be >= {minimum}, got {value!r}")
        return value

    def bool(self, name: str, default=None):
        return self._get(name, default, lambda v: isinstance(v, bool), "true or false (a JSON boolean)")

    def str(self, name: str, default=None, choices=None):
        value = self._get(name, default, lambda v: isinstance(v, str), "a string")
        if value is not None and choices is not None and value not in choices:
            raise self.error(f"{name} must be one of {list(choices)}, got {value!r}")
        return value

    def dict(self, name: str, default=None) -> "Fields | None":
        value = self._get(name, default, lambda v: isinstance(v, dict), "a JSON object")
        return None if value is None else Fields(value, f"{self.path} {name}")


def read_tensors(path: Path, ranks: dict, optional: dict | None = None) -> dict:
    """The tensors of a safetensors file as float64, checked: exactly the names of `ranks`
    (name -> number of dimensions) plus any of `optional`, each of its rank and finite."""
    optional = optional or {}
    try:
        arrays, _ = read_safetensors(path)
    except CheckpointError as e:
        raise InteropError(str(e)) from e
    missing = sorted(set(ranks) - set(arrays))
    unknown = sorted(set(arrays) - set(ranks) - set(optional))
    if missing or unknown:
        raise InteropError(f"{path}: missing tensors {missing}, unexpected tensors {unknown}")
    out = {}
    for name, a in arrays.items():
        rank = {**ranks, **optional}[name]
        if a.ndim != rank:
            raise InteropError(f"{path}: tensor {name} has shape {a.shape}, expected {rank} dimensions")
        if a.dtype.kind != "f":
            raise InteropError(f"{path}: tensor {name} has dtype {a.dtype}, expected floating point")
        if not np.all(np.isfinite(a)):
            raise InteropError(f"{path}: tensor {name} holds NaN or inf")
        out[name] = a.astype(np.float64)
    return out


def check_shapes(path, arrays: dict, shapes: dict) -> None:
    """Each named array of `arrays` must have the shape given in `shapes`."""
    for name, shape in shapes.items():
        if name in arrays and arrays[name].shape != tuple(shape):
            raise InteropError(f"{path}: tensor {name} has shape {arrays[name].shape}, expected {tuple(shape)}")
