"""`DataSpec`: where a run's activations come from, as a JSON-able record, so a resumed run
rebuilds the very same sources.  Three kinds: a directory of activation shards, a text source
(`switchsae.data.texts`: text, JSON lines, CSV, parquet, a datasets folder) harvested through
a local transformers model, or (neither given) Python's own docs harvested through the
packaged MiniLM-L6.

Harvested text is split by document: every `holdout_every`-th text is held out for
evaluation.  Harvested activations are cached (shards + manifest) under
$SWITCHSAE_CACHE (default ~/.cache/switchsae), keyed by model, layer and texts."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from switchsae.data.models import model_dir, model_shape

from switchsae.data import (
    DEFAULT_LAYER,
    MANIFEST_NAME,
    DataError,
    HarvestSource,
    ShardSource,
    default_texts,
    read_texts,
)

EVAL_BATCH = 4096


@dataclass(frozen=True)
class DataSpec:
    """shards: activation shard directory; text: text source to harvest; model: local
    transformers model directory (None: MiniLM-L6); layer: hidden-state index;
    eval_shards: held-out shard directory; holdout_every: for text, every n-th document is
    held out (0: none, evaluate on training data); cache: reuse harvested activations;
    text_column, one_per_line: how `text` is read (`switchsae.data.read_texts`);
    max_length: tokens per window of a harvested text."""

    shards: str | None = None
    text: str | None = None
    model: str | None = None
    layer: int = DEFAULT_LAYER
    eval_shards: str | None = None
    holdout_every: int = 20
    cache: bool = True
    text_column: str = "text"
    one_per_line: bool = False
    max_length: int = 128

    def __post_init__(self) -> None:
        for name in ("shards", "text", "model", "eval_shards"):
            if not isinstance(getattr(self, name), (str, type(None))):
                raise DataError(f"data spec {name} must be a path string or null, got {getattr(self, name)!r}")
        if not isinstance(self.text_column, str):
            raise DataError(f"data spec text_column must be a string, got {self.text_column!r}")
        for name in ("layer", "holdout_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise DataError(f"data spec {name} must be an integer, got {value!r}")
        for name in ("cache", "one_per_line"):
            if not isinstance(getattr(self, name), bool):
                raise DataError(f"data spec {name} must be true or false, got {getattr(self, name)!r}")
        if self.shards and self.text:
            raise DataError("give either shards (--data) or a text file (--text), not both")
        if self.shards and self.model:
            raise DataError("--model only applies to harvested text, not to --data shards")
        if self.holdout_every < 0 or self.holdout_every == 1:
            raise DataError(f"holdout_every must be 0 (off) or >= 2, got {self.holdout_every}")
        if isinstance(self.max_length, bool) or not isinstance(self.max_length, int) or self.max_length < 2:
            raise DataError(f"max_length must be an integer >= 2, got {self.max_length!r}")
        if self.shards and (self.text_column != "text" or self.one_per_line):
            raise DataError("--text-column and --one-per-line apply to --text, not to --data shards")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> DataSpec:
        if not isinstance(data, dict):
            raise DataError(f"a data spec must be a JSON object / dict, got {type(data).__name__}")
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise DataError(f"unknown data spec fields {unknown}")
        return cls(**data)

    def describe(self) -> str:
        if self.shards:
            return f"shards {self.shards}"
        text = self.text or "Python docs (pydoc_data.topics)"
        return f"{text} through {self.model or 'MiniLM-L6'} layer {self.layer}"

    def d_in(self) -> int:
        """Activation width, found without harvesting (shard headers / transformers' config);
        held-out shards must have the same."""
        if self.shards:
            d_in = ShardSource(self.shards, 1, shuffle=False).d_in
            if self.eval_shards:
                ShardSource(self.eval_shards, 1, shuffle=False, expected_d_in=d_in)
            return d_in
        _require_harvest()
        if self.text:
            read_texts(self.text, text_column=self.text_column, one_per_line=self.one_per_line)  # readable, before the model loads
        return model_shape(self.model)[0]

    def texts(self) -> list[str]:
        """The documents to harvest."""
        if not self.text:
            return default_texts()
        return read_texts(self.text, text_column=self.text_column, one_per_line=self.one_per_line)

    def split_texts(self) -> tuple[list[str], list[str]]:
        """(training texts, held-out texts): every holdout_every-th document is held out."""
        texts, every = self.texts(), self.holdout_every
        held = [t for i, t in enumerate(texts) if every and i % every == every - 1]
        kept = [t for i, t in enumerate(texts) if not (every and i % every == every - 1)]
        if not held and every:
            raise DataError(f"only {len(texts)} texts: too few to hold out every {every}th; use holdout_every=0")
        return kept, held


def build_sources(spec: DataSpec, batch_size: int, seed: int, progress: bool = True, *,
                  device: str | None = None, harvest_batch_size: int = 32):
    """-> (training source, evaluation source, evaluation label).  device, harvest_batch_size:
    where and how many windows at a time harvesting runs the model (None: CUDA when present)."""
    if spec.shards:
        train = ShardSource(spec.shards, batch_size, seed)
        if spec.eval_shards:
            return train, ShardSource(spec.eval_shards, EVAL_BATCH, seed, shuffle=False), "held-out shards"
        return train, ShardSource(spec.shards, EVAL_BATCH, seed, shuffle=False), "training data"
    _require_harvest()
    kept, held = spec.split_texts()
    every, n_texts = spec.holdout_every, len(kept) + len(held)
    run = {"device": device, "harvest_batch_size": harvest_batch_size}
    train = _harvest(spec, kept, batch_size, seed, progress, **run)
    if not held:
        return train, _harvest(spec, kept, EVAL_BATCH, seed, progress, shuffle=False, **run), "training data"
    return train, _harvest(spec, held, EVAL_BATCH, seed, progress, shuffle=False, **run), \
        f"held-out texts (every {every}th, {len(held)} of {n_texts})"


def _require_harvest() -> None:
    missing = [m for m in ("torch", "transformers") if importlib.util.find_spec(m) is None]
    if missing:
        raise DataError(f"harvesting activations from text needs {' and '.join(missing)} "
                        "(pip install 'switchsae[harvest]'); or train on shards with --data DIR")


def cache_root() -> Path:
    return Path(os.environ.get("SWITCHSAE_CACHE", Path.home() / ".cache" / "switchsae"))


def _harvest(spec: DataSpec, texts: list, batch_size: int, seed: int, progress: bool, shuffle=True, *,
             device=None, harvest_batch_size=32):
    """A HarvestSource over `texts`, cached under a directory named by model, layer, window
    length and texts."""
    cache_dir = None
    if spec.cache:
        model = str(model_dir(spec.model).resolve())
        key = [model, spec.layer, spec.max_length, "windows", texts]
        digest = hashlib.sha256(json.dumps(key).encode()).hexdigest()[:20]
        cache_dir = cache_root() / "activations" / digest
        if cache_dir.is_dir() and not (cache_dir / MANIFEST_NAME).is_file():
            shutil.rmtree(cache_dir)  # an interrupted harvest: no manifest means incomplete
    return HarvestSource(spec.model, texts, spec.layer, batch_size, seed, cache_dir=cache_dir,
                         progress=progress, shuffle=shuffle, max_length=spec.max_length, device=device,
                         harvest_batch_size=harvest_batch_size)
