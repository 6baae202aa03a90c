"""Token-aware activation collection: harvested activations plus the text of every token.

The activations come from :func:`switchsae.data.harvest.harvest` (the training data's
source, rows in text order); the tokens from the same model's tokenizer in the same windows
(`switchsae.data.models.tokenize`), so row ``i`` of the activations is token ``i``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from switchsae.data.harvest import DEFAULT_LAYER, default_texts, harvest
from switchsae.data.models import load_tokenizer, tokenize
from switchsae.data.sources import DataError


@dataclass
class Corpus:
    """Activations aligned with their tokens.

    acts: (n, d) float32.  tokens: n display strings, each the text from the previous
    token's end to this token's end (so a document's tokens concatenate to its text;
    special tokens appear as "[CLS]", "[SEP]").  doc: (n,) int, each token's document.
    """

    acts: np.ndarray
    tokens: list[str]
    doc: np.ndarray

    def __post_init__(self) -> None:
        self.acts = np.asarray(self.acts, dtype=np.float32)
        self.doc = np.asarray(self.doc, dtype=np.int64)
        n = len(self.acts)
        if self.acts.ndim != 2 or n == 0:
            raise DataError(f"acts must be a non-empty (n_tokens, d) array, got shape {self.acts.shape}")
        if len(self.tokens) != n or self.doc.shape != (n,):
            raise DataError(f"{n} activation rows but {len(self.tokens)} tokens and {self.doc.shape} doc ids")
        if n > 1 and np.any(np.diff(self.doc) < 0):
            raise DataError("doc ids must be non-decreasing (tokens in text order)")


def token_strings(tokenizer, texts: Sequence[str], max_length: int = 128,
                  skip_special_tokens: bool = False) -> tuple[list[str], np.ndarray]:
    """(display strings, document ids) of every token `harvest` yields a row for (long texts
    in windows of max_length tokens, as harvested)."""
    enc, windows_doc = tokenize(tokenizer, texts, max_length, return_offsets_mapping=True,
                                return_special_tokens_mask=True)
    tokens, doc, end, last = [], [], 0, -1
    for w, i in enumerate(windows_doc):
        text, end = texts[i], (end if i == last else 0)
        last = i
        pieces = tokenizer.convert_ids_to_tokens(enc["input_ids"][w])
        for piece, (a, b), special in zip(pieces, enc["offset_mapping"][w], enc["special_tokens_mask"][w]):
            if special:
                if not skip_special_tokens:
                    tokens.append(piece)
                    doc.append(i)
                continue
            tokens.append(text[end:b] if b > end else text[a:b])
            doc.append(i)
            end = max(end, b)
    return tokens, np.asarray(doc, dtype=np.int64)


def collect(model_path: str | os.PathLike | None = None, texts: Sequence[str] | None = None,
            layer: int = DEFAULT_LAYER, *, batch_size: int = 32, max_length: int = 128,
            device: str | None = None, max_texts: int | None = None, max_tokens: int | None = None,
            skip_special_tokens: bool = False, progress: bool = True) -> Corpus:
    """Harvest ``hidden_states[layer]`` of ``texts`` (default: Python's docs, as in training)
    and pair every row with its token.  Options as in :func:`switchsae.data.harvest.harvest`."""
    texts = default_texts() if texts is None else texts
    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
        raise DataError("texts must be a sequence of strings")
    texts = list(texts)[:max_texts]
    arrays = list(harvest(model_path, texts, layer, batch_size, max_length, device, progress,
                          max_tokens=max_tokens, skip_special_tokens=skip_special_tokens))
    acts = np.concatenate(arrays) if arrays else np.zeros((0, 0), np.float32)
    tokens, doc = token_strings(load_tokenizer(model_path), texts, max_length, skip_special_tokens)
    if max_tokens is not None:
        tokens, doc = tokens[:len(acts)], doc[:len(acts)]
    if len(tokens) != len(acts):
        raise DataError(f"tokenizer gave {len(tokens)} tokens but harvest {len(acts)} activation rows")
    return Corpus(acts, tokens, doc)
