"""Per-feature statistics of a corpus's sparse codes: firing frequency, activation
histogram, top-activating tokens and the activations around them.

A latent "fires" on a token when it is among the token's top-k with a value > 0; values are
the gated activations of `ForwardOutput.top_values`.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class FeatureStats(NamedTuple):
    """Per latent (total latents,): count of tokens fired on, freq = count / n_tokens, max
    and mean activation when firing; hist: (total latents, bins) counts over [0, max]."""

    count: np.ndarray
    freq: np.ndarray
    max: np.ndarray
    mean: np.ndarray
    hist: np.ndarray


def _fires(codes):
    """(token rows, latent ids, values) of every firing, flattened."""
    rows = np.broadcast_to(np.arange(len(codes.values))[:, None], codes.values.shape)
    on = codes.values > 0
    return rows[on], codes.indices[on], codes.values[on].astype(np.float64)


def feature_stats(codes, n_latents: int, bins: int = 20) -> FeatureStats:
    """Frequencies, max / mean activations and `bins`-bin histograms of all `n_latents`."""
    _, latent, value = _fires(codes)
    count = np.bincount(latent, minlength=n_latents)
    total = np.bincount(latent, weights=value, minlength=n_latents)
    vmax = np.zeros(n_latents)
    np.maximum.at(vmax, latent, value)
    mean = np.divide(total, count, out=np.zeros(n_latents), where=count > 0)
    scale = np.where(vmax > 0, vmax, 1.0)[latent]
    b = np.minimum((value / scale * bins).astype(np.int64), bins - 1)
    hist = np.bincount(latent * bins + b, minlength=n_latents * bins).reshape(n_latents, bins)
    return FeatureStats(count, count / len(codes.values), vmax, mean, hist)


def top_activations(codes, n_latents: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The `n` strongest firings of every latent: (rows, values), both (n_latents, n),
    strongest first (ties: earlier token first); rows -1 / values 0 where it fired less."""
    row, latent, value = _fires(codes)
    order = np.lexsort((row, -value, latent))
    row, latent, value = row[order], latent[order], value[order]
    first = np.searchsorted(latent, np.arange(n_latents))
    rank = np.arange(len(latent)) - first[latent]
    keep = rank < n
    rows = np.full((n_latents, n), -1, dtype=np.int64)
    values = np.zeros((n_latents, n))
    rows[latent[keep], rank[keep]] = row[keep]
    values[latent[keep], rank[keep]] = value[keep]
    return rows, values


def context_windows(rows: np.ndarray, doc: np.ndarray, before: int, after: int):
    """Token ranges [start, stop) around each row, clipped to the row's document.
    rows: any shape of token rows (>= 0) -> (start, stop) of the same shape."""
    bounds = np.flatnonzero(np.diff(doc)) + 1
    doc_start = np.concatenate([[0], bounds])[doc[rows]]
    doc_stop = np.concatenate([bounds, [len(doc)]])[doc[rows]]
    return np.maximum(rows - before, doc_start), np.minimum(rows + after + 1, doc_stop)


def window_activations(codes, latents: np.ndarray, start: np.ndarray, stop: np.ndarray) -> list[np.ndarray]:
    """For each i, latent latents[i]'s activation on every token of [start[i], stop[i])."""
    lengths = stop - start
    pos = np.repeat(start - np.cumsum(lengths) + lengths, lengths) + np.arange(lengths.sum())
    who = np.repeat(latents, lengths)
    acts = np.sum(np.where(codes.indices[pos] == who[:, None], codes.values[pos], 0.0), axis=-1)
    return np.split(acts, np.cumsum(lengths)[:-1])
