"""Top-k on MLX: `mx.argpartition` with the spec's tie rule (`switchsae.core.topk`)."""

from __future__ import annotations

import mlx.core as mx

from .namespace import INDEX_DTYPE


def topk(acts, k: int):
    """The k largest entries per row, descending, ties towards the lower index.

    acts: (batch, m) -> values (batch, k), indices (batch, k) int32.
    `mx.argpartition` orders by (value, index) on CPU (its comparator breaks ties by index) and
    Metal (a stable merge sort), so the k smallest of -acts are exactly the spec's set; the k
    candidates are then put in index order and stably sorted by value."""
    candidates = mx.sort(mx.argpartition(-acts, kth=k - 1, axis=-1)[:, :k], axis=-1)
    order = mx.argsort(-mx.take_along_axis(acts, candidates, axis=-1), axis=-1)
    indices = mx.stop_gradient(mx.take_along_axis(candidates, order, axis=-1).astype(INDEX_DTYPE))
    return mx.take_along_axis(acts, indices, axis=-1), indices
