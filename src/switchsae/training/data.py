"""`DataSpec`: where a run's activations come from, as a JSON-able record, so a resumed run
rebuilds the very same sources.  Three kinds: a directory of activation shards, a text file
harvested through a local transformers model, or (neither given) Python's own docs harvested
through the packaged MiniLM-L6.

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

from switchsae.data import (
    DEFAULT_LAYER,
    MANIFEST_NAME,
    DataError,
    HarvestSource,
    ShardSource,
    default_model_path,
    default_texts,
    read_texts,
)
from switchsae.validation import check_model_dir

EVAL_BATCH = 4096


@dataclass(frozen=True)
class DataSpec:
    """shards: activation shard directory; text: text file to harvest; model: local
    transformers model directory (None: MiniLM-L6); layer: hidden-state index;
    eval_shards: held-out shard directory; holdout_every: for text, every n-th document is
    held out (0: none, evaluate on training data); cache: reuse harvested activations."""

    shards: str | None = None
    text: str | None = None
    model: str | None = None
    layer: int = DEFAULT_LAYER
    eval_shards: str | None = None
    holdout_every: int = 20
    cache: bool = True

    def __post_init__(self) -> None:
        for name in ("shards", "text", "model", "eval_shards"):
            if not isinstance(getattr(self, name), (str, type(None))):
                raise DataError(f"data spec {name} must be a path string or null, got {getattr(self, name)!r}")
        for name in ("layer", "holdout_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise DataError(f"data spec {name} must be an integer, got {value!r}")
        if not isinstance(self.cache, bool):
            raise DataError(f"data spec cache must be true or false, got {self.cache!r}")
        if self.shards and self.text:
            raise DataError("give either shards (--data) or a text file (--text), not both")
        if self.shards and self.model:
            raise DataError("--model only applies to harvested text, not to --data shards")
        if self.holdout_every < 0 or self.holdout_every == 1:
            raise DataError(f"holdout_every must be 0 (off) or >= 2, got {self.holdout_every}")

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
        """Activation width, found without harvesting (shard headers / model config.json);
        held-out shards must have the same."""
        if self.shards:
            d_in = ShardSource(self.shards, 1, shuffle=False).d_in
            if self.eval_shards:
                ShardSource(self.eval_shards, 1, shuffle=False, expected_d_in=d_in)
            return d_in
        _require_harvest()
        if self.text:
            read_texts(self.text)  # readable UTF-8 text, found before the model loads
        model = check_model_dir(self.model or default_model_path(), DataError)
        config = model / "config.json"
        try:
            return int(json.loads(config.read_text())["hidden_size"])
        except (OSError, ValueError, KeyError) as e:
            raise DataError(f"cannot read hidden_size from {config}: {e}") from e


def build_sources(spec: DataSpec, batch_size: int, seed: int, progress: bool = True):
    """-> (training source, evaluation source, evaluation label)."""
    if spec.shards:
        train = ShardSource(spec.shards, batch_size, seed)
        if spec.eval_shards:
            return train, ShardSource(spec.eval_shards, EVAL_BATCH, seed, shuffle=False), "held-out shards"
        return train, ShardSource(spec.shards, EVAL_BATCH, seed, shuffle=False), "training data"
    _require_harvest()
    texts = read_texts(spec.text) if spec.text else default_texts()
    every = spec.holdout_every
    held = [t for i, t in enumerate(texts) if every and i % every == every - 1]
    kept = [t for i, t in enumerate(texts) if not (every and i % every == every - 1)]
    if not held and every:
        raise DataError(f"only {len(texts)} texts: too few to hold out every {every}th; use holdout_every=0")
    train = _harvest(spec, kept, batch_size, seed, progress)
    if not held:
        return train, _harvest(spec, kept, EVAL_BATCH, seed, progress, shuffle=False), "training data"
    return train, _harvest(spec, held, EVAL_BATCH, seed, progress, shuffle=False), \
        f"held-out texts (every {every}th, {len(held)} of {len(texts)})"


def _require_harvest() -> None:
    missing = [m for m in ("torch", "transformers") if importlib.util.find_spec(m) is None]
    if missing:
        raise DataError(f"harvesting activations from text needs {' and '.join(missing)} "
                        "(pip install 'switchsae[harvest]'); or train on shards with --data DIR")


def cache_root() -> Path:
    return Path(os.environ.get("SWITCHSAE_CACHE", Path.home() / ".cache" / "switchsae"))


def _harvest(spec: DataSpec, texts: list, batch_size: int, seed: int, progress: bool, shuffle=True):
    """A HarvestSource over `texts`, cached under a directory named by model, layer and texts."""
    cache_dir = None
    if spec.cache:
        model = str(Path(spec.model or default_model_path()).resolve())
        digest = hashlib.sha256(json.dumps([model, spec.layer, texts]).encode()).hexdigest()[:20]
        cache_dir = cache_root() / "activations" / digest
        if cache_dir.is_dir() and not (cache_dir / MANIFEST_NAME).is_file():
            shutil.rmtree(cache_dir)  # an interrupted harvest: no manifest means incomplete
    return HarvestSource(spec.model, texts, spec.layer, batch_size, seed, cache_dir=cache_dir,
                         progress=progress, shuffle=shuffle)
