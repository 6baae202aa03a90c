"""Checks at the library's edges (command-line arguments, paths, files read, memory), in one
place, each raising the library's own error with a one-line message before any work.

Field checks of the configs live with them (`switchsae.core.config.check_int` and
`check_number`); this module builds on those for everything that is not a config field."""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

from switchsae.core.config import ConfigError, SwitchSAEConfig


class PathError(ValueError):
    """A path the user named cannot be read or written as asked."""


def library_errors() -> tuple:
    """Every error class the library raises for bad input or a failed run; the CLI reports
    them as one line, anything else is a bug and keeps its traceback."""
    from switchsae.backends import BackendError
    from switchsae.checkpoint import CheckpointError
    from switchsae.data import DataError
    from switchsae.interop import InteropError
    from switchsae.model import InputError
    from switchsae.training import TrainingError

    return (BackendError, CheckpointError, ConfigError, DataError, InputError, InteropError,
            PathError, TrainingError)


# -- command-line arguments -----------------------------------------------------------------
class OneLineParser(argparse.ArgumentParser):
    """argparse, with its errors as one line (`switchsae <command>: error: ...`, exit 2)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def int_at_least(minimum: int):
    """An argparse `type`: an integer >= minimum (argparse reports the error as one line)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {value}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


positive_int = int_at_least(1)
nonnegative_int = int_at_least(0)


def finite_float(text: str) -> float:
    """An argparse `type`: a finite real number (no nan / inf)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


# -- paths --------------------------------------------------------------------------------
def check_output_dir(path, what: str = "output directory") -> Path:
    """`path` if it is a directory, or could be created as one, that this process may write
    to; creates nothing.  Raises PathError naming the obstacle."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise PathError(f"{what} {path} exists and is not a directory")
    ancestor = path
    while not ancestor.exists():
        if ancestor.parent == ancestor:
            break
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise PathError(f"cannot create {what} {path}: {ancestor} is not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        verb = "write to" if ancestor == path else "create"
        raise PathError(f"cannot {verb} {what} {path}: no write permission on {ancestor}")
    return path


def inside(base, name: str, what: str) -> Path:
    """base / name, if `name` is a plain relative path that stays inside `base` (no absolute
    path, no '..'); else PathError.  For file names read from a manifest or a config."""
    if not isinstance(name, str) or not name:
        raise PathError(f"{what}: expected a file name, got {name!r}")
    rel = Path(name)
    if rel.is_absolute() or ".." in rel.parts:
        raise PathError(f"{what}: {name!r} points outside {base} (absolute or '..' paths are refused)")
    return Path(base) / rel


# -- memory -------------------------------------------------------------------------------
_ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}


def physical_memory() -> int | None:
    """Bytes of RAM of this machine (None where it cannot be told)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def check_fits_in_memory(cfg: SwitchSAEConfig, copies: int = 1, what: str = "the model") -> None:
    """ConfigError stating the bytes needed when `copies` of the parameters (1: the model;
    3: training, with Adam's two moments) cannot fit in this machine's RAM."""
    n = sum(math.prod(shape) for shape in cfg.param_shapes().values())
    need = n * _ITEMSIZE[cfg.dtype] * copies
    have = physical_memory()
    if have is not None and need > have:
        raise ConfigError(f"{what} needs {format_bytes(need)} ({n:,} parameters x {copies} in {cfg.dtype}), "
                          f"more than this machine's {format_bytes(have)} of memory")


# -- files read ---------------------------------------------------------------------------
def read_utf8(path, error=PathError) -> str:
    """The text of `path`, or `error` naming the file and the first byte that is not UTF-8."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise error(f"cannot read {path}: {e.strerror or e}") from e
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{path} is not UTF-8 text (byte {e.start} is 0x{data[e.start]:02x}); "
                    "convert it, e.g. iconv -f latin1 -t utf-8") from e


_WEIGHT_FILES = ("*.safetensors", "pytorch_model*.bin", "tf_model.h5", "flax_model.msgpack")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json",
                    "tokenizer.model", "spiece.model", "sentencepiece.bpe.model")


def check_model_dir(path, error=PathError) -> Path:
    """A local transformers model directory: config.json, weights and a tokenizer; else
    `error` naming what is missing (found before loading anything)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise error(f"model {path} is not a local transformers model directory (no config.json)")
    missing = [what for what, patterns in (("weights", _WEIGHT_FILES), ("tokenizer", _TOKENIZER_FILES))
               if not any(next(path.glob(p), None) for p in patterns)]
    if missing:
        raise error(f"model {path} has a config.json but no {' and no '.join(missing)} files "
                    f"(need e.g. model.safetensors and tokenizer.json)")
    return path
