"""Activation sources: endless, resumable streams of ``(batch, d_in)`` NumPy arrays.

Every source presents its rows as one infinite *row stream*: epoch 0 in a
shuffled order, then epoch 1 in a fresh order, and so on.  ``next_batch()``
cuts the next ``batch_size`` rows off that stream (a batch may straddle an
epoch boundary), so every row appears exactly once per epoch.  Orders are
pure functions of ``(seed, epoch)``, hence ``state_dict()`` is a handful of
integers and a restored source yields bit-identical batches.

* :class:`ArraySource` - an in-memory array from any backend.
* :class:`ShardSource` - a directory of ``.npy`` / ``.safetensors`` shards,
  memory-mapped / sliced lazily and mixed through a bounded shuffle buffer.
* :class:`ShardWriter` - writes such a directory (atomic files + manifest).

Output arrays are NumPy, in the stored floating dtype (float16/32/64) unless a
``dtype`` is given; backends convert later.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from switchsae.files import atomic_write, atomic_write_bytes, atomic_write_json
from switchsae.validation import PathError, inside

__all__ = ["DataError", "ActivationSource", "ArraySource", "ShardSource",
           "ShardWriter", "to_numpy", "MANIFEST_NAME"]

MANIFEST_NAME = "manifest.json"
SUPPORTED_DTYPES = ("float16", "float32", "float64")
_ST_DTYPES = {"F16": np.float16, "F32": np.float32, "F64": np.float64}
_SHARD_EXTS = (".npy", ".safetensors")
_STATE_VERSION = 1


class DataError(ValueError):
    """Bad activation data or arguments (missing files, wrong shape/dtype, ...)."""


# ----------------------------------------------------------------- helpers
def to_numpy(x: Any) -> np.ndarray:
    """Convert a NumPy / torch / jax / mlx array to NumPy without importing those libraries."""
    if isinstance(x, np.ndarray):
        return x
    try:
        return np.asarray(x)
    except Exception:  # torch tensors needing grad / on GPU, bfloat16, ...
        pass
    if hasattr(x, "detach"):
        t = x.detach().cpu()
        try:
            return t.numpy()
        except TypeError:  # e.g. torch.bfloat16 has no NumPy equivalent
            return t.float().numpy()
    return np.array(x)


def _check_dtype(dtype: np.dtype, what: str) -> np.dtype:
    dtype = np.dtype(dtype)
    if dtype.kind != "f" or dtype.newbyteorder("=").name not in SUPPORTED_DTYPES:
        raise DataError(f"{what}: unsupported dtype {dtype} (supported: {', '.join(SUPPORTED_DTYPES)})")
    return dtype.newbyteorder("=")


def _check_batch_size(batch_size: int) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise DataError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    return int(batch_size)


def _check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise DataError(f"seed must be an integer >= 0, got {seed!r}")
    return int(seed)


def _check_d_in(d_in: int, expected: int | None, what: str) -> None:
    if expected is not None and int(expected) != d_in:
        raise DataError(f"{what}: activation width d_in={d_in} does not match expected_d_in={expected}")


def _rng(seed: int, tag: int, epoch: int, window: int = 0) -> np.random.Generator:
    return np.random.default_rng([seed, tag, epoch, window])


# ------------------------------------------------------------------- base
class ActivationSource:
    """Protocol of every source: an endless iterator of ``(batch_size, d_in)`` arrays.

    Attributes: ``d_in`` (int), ``dtype`` (np.dtype of the yielded arrays),
    ``batch_size`` (int), ``n_rows`` (rows per epoch).
    """

    d_in: int
    dtype: np.dtype
    batch_size: int
    n_rows: int

    def next_batch(self, rows: slice | None = None) -> np.ndarray:
        """Return the next ``(batch_size, d_in)`` array, or only its ``rows`` (a slice of
        ``range(batch_size)``, e.g. one process's share: the others are not read, and the
        stream still advances by a whole batch)."""
        raise NotImplementedError

    def __iter__(self) -> Iterator[np.ndarray]:
        while True:
            yield self.next_batch()

    def __next__(self) -> np.ndarray:
        return self.next_batch()

    def state_dict(self) -> dict:
        """JSON-serialisable stream position; see :meth:`load_state_dict`."""
        raise NotImplementedError

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where the source that produced ``state`` was."""
        raise NotImplementedError


class _RowStream(ActivationSource):
    """Shared stream logic. Subclasses provide ``_rows(epoch, start, stop)`` (rows of one
    epoch's order, ``0 <= start < stop <= n_rows``) and config (de)serialisation."""

    epoch: int = 0
    offset: int = 0  # rows of the current epoch already served

    def _init_stream(self, batch_size: int, seed: int, shuffle: bool, out_dtype) -> None:
        self.batch_size = _check_batch_size(batch_size)
        self.seed = _check_seed(seed)
        self.shuffle = bool(shuffle)
        self.dtype = self.dtype if out_dtype is None else _check_dtype(out_dtype, "dtype argument")
        self.epoch, self.offset = 0, 0

    def _rows(self, epoch: int, start: int, stop: int) -> np.ndarray:
        raise NotImplementedError

    def _config(self) -> dict:
        return {}

    def _apply_config(self, cfg: dict) -> None:
        pass

    def next_batch(self, rows: slice | None = None) -> np.ndarray:
        lo, hi, step = (rows or slice(0, self.batch_size)).indices(self.batch_size)
        if step != 1 or lo >= hi:
            raise DataError(f"rows must be a non-empty contiguous slice of the batch's {self.batch_size}, got {rows}")
        parts, done = [], 0  # done: rows of this batch passed so far
        while done < self.batch_size:
            take = min(self.batch_size - done, self.n_rows - self.offset)
            a, b = max(lo, done), min(hi, done + take)  # the wanted rows in this stretch
            if a < b:
                parts.append(self._rows(self.epoch, self.offset + a - done, self.offset + b - done))
            self.offset += take
            done += take
            if self.offset == self.n_rows:
                self.epoch, self.offset = self.epoch + 1, 0
        out = parts[0] if len(parts) == 1 else np.concatenate(parts)
        return out.astype(self.dtype, copy=False)

    def state_dict(self) -> dict:
        return {"type": type(self).__name__, "version": _STATE_VERSION, "epoch": self.epoch,
                "offset": self.offset, "seed": self.seed, "shuffle": self.shuffle,
                "n_rows": self.n_rows, "d_in": self.d_in, **self._config()}

    def load_state_dict(self, state: dict) -> None:
        name = type(self).__name__
        if state.get("type") != name or state.get("version") != _STATE_VERSION:
            raise DataError(f"state is for {state.get('type')!r} v{state.get('version')}, "
                            f"not {name} v{_STATE_VERSION}")
        missing = {"epoch", "offset", "seed", "shuffle", "n_rows", "d_in", *self._config()} - set(state)
        if missing:
            raise DataError(f"state is missing keys {sorted(missing)}")
        for key in ("n_rows", "d_in"):
            if state[key] != getattr(self, key):
                raise DataError(f"state does not match this data: {key}={state[key]} in state, "
                                f"{getattr(self, key)} here")
        epoch, offset = int(state["epoch"]), int(state["offset"])
        if epoch < 0 or not 0 <= offset < self.n_rows:
            raise DataError(f"invalid position in state: epoch={epoch}, offset={offset}")
        self.seed, self.shuffle = _check_seed(state["seed"]), bool(state["shuffle"])
        self._apply_config(state)
        self.epoch, self.offset = epoch, offset


# ------------------------------------------------------------ ArraySource
class ArraySource(_RowStream):
    """Serve batches from an in-memory ``(n_rows, d_in)`` array (NumPy, torch, jax, mlx; not copied).

    Each epoch is a permutation of all rows drawn from ``(seed, epoch)``
    (identity order when ``shuffle=False``). ``dtype`` casts the output.
    """

    def __init__(self, array: Any, batch_size: int, seed: int = 0, shuffle: bool = True, *,
                 expected_d_in: int | None = None, dtype=None):
        arr = to_numpy(array)
        if arr.ndim != 2:
            raise DataError(f"array must be 2-D (n_rows, d_in), got shape {arr.shape}")
        if arr.shape[0] < 1 or arr.shape[1] < 1:
            raise DataError(f"array has no data: shape {arr.shape}")
        self.dtype = _check_dtype(arr.dtype, "array")
        _check_d_in(arr.shape[1], expected_d_in, "array")
        self.array, self.n_rows, self.d_in = arr, arr.shape[0], arr.shape[1]
        self._init_stream(batch_size, seed, shuffle, dtype)
        self._perm_epoch, self._perm = -1, None

    def _rows(self, epoch: int, start: int, stop: int) -> np.ndarray:
        if not self.shuffle:
            return np.array(self.array[start:stop])
        if self._perm_epoch != epoch:
            self._perm, self._perm_epoch = _rng(self.seed, 0, epoch).permutation(self.n_rows), epoch
        return self.array[self._perm[start:stop]]

    def _apply_config(self, cfg: dict) -> None:
        self._perm_epoch = -1


# ------------------------------------------------------------ ShardSource
@dataclass
class _Shard:
    path: Path
    rows: int
    key: str | None  # tensor name for .safetensors, None for .npy


def _inspect_npy(path: Path) -> tuple[tuple, np.dtype]:
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        reader = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                  else np.lib.format.read_array_header_2_0)
        shape, _fortran, dtype = reader(f)
        data_start = f.tell()
    if dtype.hasobject:
        raise DataError(f"shard {path}: unsupported dtype {dtype} (supported: {', '.join(SUPPORTED_DTYPES)})")
    need = data_start + int(np.prod(shape)) * dtype.itemsize
    if os.path.getsize(path) < need:
        raise ValueError(f"file is truncated ({os.path.getsize(path)} bytes, header says {need})")
    return tuple(shape), dtype


def _inspect_safetensors(path: Path) -> tuple[tuple, np.dtype, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        keys = list(f.keys())
        if "activations" in keys:
            key = "activations"
        elif len(keys) == 1:
            key = keys[0]
        else:
            raise DataError(f"shard {path}: expected one tensor or one named 'activations', found {keys}")
        sl = f.get_slice(key)
        shape, st_dtype = tuple(sl.get_shape()), sl.get_dtype()
    if st_dtype not in _ST_DTYPES:
        raise DataError(f"shard {path}: unsupported dtype {st_dtype} (supported: F16, F32, F64)")
    return shape, np.dtype(_ST_DTYPES[st_dtype]), key


class ShardSource(_RowStream):
    """Serve batches from a directory of 2-D activation shards without loading it into RAM.

    Shards are ``*.npy`` (memory-mapped) or ``*.safetensors`` (one tensor, or the one
    named ``"activations"``; read with ``get_slice``), listed by ``manifest.json`` if
    present, else every such file in name order. Mixing: all rows are cut into chunks
    of ``chunk_rows`` contiguous rows; each epoch visits the chunks in a random order
    (across all shards), ``shuffle_buffer // chunk_rows`` chunks at a time are read into
    a buffer whose rows are permuted and served. So at most ~``shuffle_buffer`` rows
    are held in memory, no row is lost or repeated within an epoch, and the position
    is fully described by ``(epoch, offset)``.
    """

    def __init__(self, directory: str | os.PathLike, batch_size: int, seed: int = 0, *,
                 shuffle_buffer: int = 65536, chunk_rows: int | None = None, shuffle: bool = True,
                 expected_d_in: int | None = None, dtype=None):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise DataError(f"activation directory {self.directory} does not exist or is not a directory")
        if isinstance(shuffle_buffer, bool) or not isinstance(shuffle_buffer, (int, np.integer)) or shuffle_buffer < 1:
            raise DataError(f"shuffle_buffer must be an integer >= 1, got {shuffle_buffer!r}")
        chunk_rows = max(1, shuffle_buffer // 64) if chunk_rows is None else chunk_rows
        if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, (int, np.integer)) or chunk_rows < 1:
            raise DataError(f"chunk_rows must be an integer >= 1, got {chunk_rows!r}")
        self.chunk_rows = int(chunk_rows)
        self.window_chunks = max(1, int(shuffle_buffer) // self.chunk_rows)
        self.manifest = self._read_manifest()
        self.shards = self._scan(expected_d_in)
        self._init_stream(batch_size, seed, shuffle, dtype)
        self._reset_caches()

    # -- discovery / validation
    def _read_manifest(self) -> dict | None:
        path = self.directory / MANIFEST_NAME
        if not path.exists():
            return None
        try:
            manifest = json.loads(path.read_text())
            listed = [(s["name"], s["rows"]) for s in manifest["shards"]]
        except Exception as e:
            raise DataError(f"cannot read manifest {path}: {e!r}") from e
        seen = set()
        for name, rows in listed:
            try:
                inside(self.directory, name, f"manifest {path}")
            except PathError as e:
                raise DataError(str(e)) from None
            if isinstance(rows, bool) or not isinstance(rows, int) or rows < 0:
                raise DataError(f"manifest {path}: shard {name!r} has rows={rows!r}, expected an integer >= 0")
            if os.path.normpath(name) in seen:
                raise DataError(f"manifest {path} lists shard {name!r} twice (its rows would be served twice)")
            seen.add(os.path.normpath(name))
        return manifest

    def _scan(self, expected_d_in: int | None) -> list[_Shard]:
        if self.manifest is not None:
            listed = [(self.directory / s["name"], int(s["rows"])) for s in self.manifest["shards"]]
            for p, _ in listed:
                if not p.is_file():
                    raise DataError(f"shard {p} listed in {MANIFEST_NAME} is missing")
        else:
            listed = [(p, None) for p in sorted(self.directory.iterdir())
                      if p.suffix in _SHARD_EXTS and not p.name.startswith(".") and p.is_file()]
        if not listed:
            raise DataError(f"no activation shards (*.npy, *.safetensors) in {self.directory}")
        shards, first, self.d_in, self.dtype = [], None, None, None
        for path, rows in listed:
            try:
                if path.suffix == ".npy":
                    (shape, dtype), key = _inspect_npy(path), None
                else:
                    shape, dtype, key = _inspect_safetensors(path)
            except DataError:
                raise
            except Exception as e:
                raise DataError(f"cannot read shard {path} (corrupt or not a {path.suffix} file): {e}") from e
            if len(shape) != 2:
                raise DataError(f"shard {path} must be 2-D (rows, d_in), got shape {shape}")
            dtype = _check_dtype(dtype, f"shard {path}")
            if first is None:
                first, self.d_in, self.dtype = path, int(shape[1]), dtype
            elif shape[1] != self.d_in:
                raise DataError(f"inconsistent d_in across shards: {path.name} has d_in={shape[1]}, "
                                f"{first.name} has d_in={self.d_in}")
            elif dtype != self.dtype:
                raise DataError(f"inconsistent dtype across shards: {path} is {dtype}, others {self.dtype}")
            if rows is not None and rows != shape[0]:
                raise DataError(f"shard {path} has {shape[0]} rows but {MANIFEST_NAME} says {rows}")
            if shape[0] > 0:
                shards.append(_Shard(path, int(shape[0]), key))
        if self.manifest is not None and "d_in" in self.manifest and self.manifest["d_in"] != self.d_in:
            raise DataError(f"{MANIFEST_NAME} says d_in={self.manifest['d_in']} but shards have d_in={self.d_in}")
        _check_d_in(self.d_in, expected_d_in, f"shards in {self.directory}")
        self.n_rows = sum(s.rows for s in shards)
        if self.n_rows == 0:
            raise DataError(f"activation shards in {self.directory} contain no rows")
        return shards

    # -- reading
    def _reset_caches(self) -> None:
        # chunk table: (shard index, start row, stop row) of every chunk of contiguous rows
        self._chunks = np.array([(i, a, min(a + self.chunk_rows, sh.rows)) for i, sh in enumerate(self.shards)
                                 for a in range(0, sh.rows, self.chunk_rows)], dtype=np.int64)
        self._mmaps: dict[int, np.memmap] = {}
        self._plan_epoch, self._order, self._starts = -1, None, None
        self._win_key, self._win = None, None

    def _apply_config(self, cfg: dict) -> None:
        self.chunk_rows, self.window_chunks = int(cfg["chunk_rows"]), int(cfg["window_chunks"])
        if self.chunk_rows < 1 or self.window_chunks < 1:
            raise DataError(f"invalid chunk_rows/window_chunks in state: {self.chunk_rows}/{self.window_chunks}")
        self._reset_caches()

    def _config(self) -> dict:
        return {"chunk_rows": self.chunk_rows, "window_chunks": self.window_chunks}

    def _read(self, i: int, start: int, stop: int) -> np.ndarray:
        shard = self.shards[i]
        if shard.key is None:
            if i not in self._mmaps:
                self._mmaps[i] = np.load(shard.path, mmap_mode="r")
            return np.array(self._mmaps[i][start:stop])
        from safetensors import safe_open

        with safe_open(str(shard.path), framework="numpy") as f:
            return np.asarray(f.get_slice(shard.key)[start:stop])

    def _plan(self, epoch: int) -> None:
        """Chunk order of ``epoch`` and the row offsets where its buffer windows start."""
        if self._plan_epoch == epoch:
            return
        n, k = len(self._chunks), self.window_chunks
        self._order = _rng(self.seed, 0, epoch).permutation(n) if self.shuffle else np.arange(n)
        ends = np.cumsum(self._chunks[self._order, 2] - self._chunks[self._order, 1])
        last_chunk = np.minimum(np.arange(k - 1, n + k - 1, k), n - 1)  # last chunk of each window
        self._starts = np.concatenate([[0], ends[last_chunk]]).astype(np.int64)
        self._plan_epoch = epoch

    def _window(self, epoch: int, w: int) -> np.ndarray:
        if self._win_key != (epoch, w):
            self._win = None  # free the old buffer before reading the new one
            ids = self._order[w * self.window_chunks:(w + 1) * self.window_chunks]
            buf = np.concatenate([self._read(*self._chunks[c]) for c in ids])
            if self.shuffle:
                buf = buf[_rng(self.seed, 1, epoch, w).permutation(len(buf))]
            self._win_key, self._win = (epoch, w), buf
        return self._win

    def _rows(self, epoch: int, start: int, stop: int) -> np.ndarray:
        self._plan(epoch)
        parts = []
        while start < stop:
            w = int(np.searchsorted(self._starts, start, side="right")) - 1
            ws, we = self._starts[w], self._starts[w + 1]
            end = min(stop, we)
            parts.append(self._window(epoch, w)[start - ws:end - ws])
            start = end
        return parts[0] if len(parts) == 1 else np.concatenate(parts)


# ------------------------------------------------------------- ShardWriter
class ShardWriter:
    """Append ``(n, d_in)`` arrays; writes ``shard_00000.npy`` ... of ``shard_tokens`` rows each
    and, on ``close()``, the final partial shard then ``manifest.json``::

        {"format_version": 1, "model": ..., "layer": ..., "dtype": "float32", "d_in": 384,
         "total_tokens": N, "format": "npy", "shards": [{"name": ..., "rows": ...}, ...],
         "metadata": {...}}

    ``model``/``layer`` come from ``metadata``. Every file is written atomically. Used as a
    context manager, an exception skips the manifest (a manifest means "complete").
    """

    def __init__(self, directory: str | os.PathLike, shard_tokens: int = 65536,
                 metadata: dict | None = None, format: str = "npy", dtype=None, overwrite: bool = False):
        if format not in ("npy", "safetensors"):
            raise DataError(f"format must be 'npy' or 'safetensors', got {format!r}")
        if isinstance(shard_tokens, bool) or not isinstance(shard_tokens, (int, np.integer)) or shard_tokens < 1:
            raise DataError(f"shard_tokens must be an integer >= 1, got {shard_tokens!r}")
        self.directory, self.format, self.shard_tokens = Path(directory), format, int(shard_tokens)
        self.metadata = dict(metadata or {})
        json.dumps(self.metadata)  # fail early if not JSON-serialisable
        self.dtype = None if dtype is None else _check_dtype(dtype, "dtype argument")
        self.directory.mkdir(parents=True, exist_ok=True)
        old = [p for p in self.directory.iterdir()
               if p.name == MANIFEST_NAME or (p.name.startswith("shard_") and p.suffix in _SHARD_EXTS)]
        if old and not overwrite:
            raise DataError(f"{self.directory} already contains activation data ({old[0].name}); "
                            "pass overwrite=True or use an empty directory")
        for p in old:
            p.unlink()
        self.d_in: int | None = None
        self.shards: list[dict] = []
        self.total_tokens = 0
        self._pending: list[np.ndarray] = []
        self._pending_rows = 0
        self.closed = False

    def append(self, array: Any) -> None:
        """Add rows; ``array`` has shape ``(n, d_in)`` (any backend)."""
        if self.closed:
            raise DataError("ShardWriter is closed")
        arr = to_numpy(array)
        if arr.ndim != 2:
            raise DataError(f"ShardWriter.append expects a 2-D (n, d_in) array, got shape {arr.shape}")
        dtype = _check_dtype(arr.dtype, "ShardWriter.append")
        if self.d_in is None:
            self.d_in = arr.shape[1]
            self.dtype = dtype if self.dtype is None else self.dtype
        elif arr.shape[1] != self.d_in:
            raise DataError(f"ShardWriter.append: d_in={arr.shape[1]} differs from earlier d_in={self.d_in}")
        if arr.shape[0] == 0:
            return
        self._pending.append(np.ascontiguousarray(arr, dtype=self.dtype))
        self._pending_rows += arr.shape[0]
        while self._pending_rows >= self.shard_tokens:
            self._flush(self.shard_tokens)

    def _flush(self, rows: int) -> None:
        buf = np.concatenate(self._pending) if len(self._pending) > 1 else self._pending[0]
        shard, rest = buf[:rows], buf[rows:]
        self._pending, self._pending_rows = ([rest] if len(rest) else []), len(rest)
        name = f"shard_{len(self.shards):05d}.{self.format}"
        if self.format == "npy":
            atomic_write(self.directory / name, lambda f: np.save(f, shard, allow_pickle=False))
        else:
            from safetensors.numpy import save

            atomic_write_bytes(self.directory / name, save({"activations": np.ascontiguousarray(shard)},
                                                           metadata={"dtype": str(shard.dtype)}))
        self.shards.append({"name": name, "rows": int(rows)})
        self.total_tokens += int(rows)

    def close(self) -> dict:
        """Flush the last partial shard, write ``manifest.json`` last; return the manifest."""
        if self.closed:
            return self.manifest
        if self._pending_rows:
            self._flush(self._pending_rows)
        self.manifest = {"format_version": 1, "model": self.metadata.get("model"),
                         "layer": self.metadata.get("layer"),
                         "dtype": None if self.dtype is None else self.dtype.name, "d_in": self.d_in,
                         "total_tokens": self.total_tokens, "format": self.format,
                         "shards": self.shards, "metadata": self.metadata}
        atomic_write_json(self.directory / MANIFEST_NAME, self.manifest, indent=1)
        self.closed = True
        return self.manifest

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.closed = True  # leave no manifest for an incomplete dataset
