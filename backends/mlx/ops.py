"""MLX fast paths for the spec hooks: native top-k, sorted-dispatch expert encode, sparse decode.

Each returns what its reference in `switchsae.core` (topk.py, experts.py) defines, including
the tie-breaking; integer index arrays are detached with `mx.stop_gradient`."""

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


def encode(x_centered, W_enc, b_enc, expert):
    """Pre-activations of each token's own expert, computing only that expert.

    x_centered: (batch, d); W_enc: (N, d, m); b_enc: (N, m) or None; expert: (batch,) int
    -> (batch, m).  Tokens are sorted by expert so `mx.gather_mm` multiplies contiguous runs by
    one expert matrix each (`sorted_indices=True`), then put back in their original order.
    MLX's CPU GatherMM is float32-only, so other dtypes are upcast there (Metal runs them
    natively, accumulating in float32 as the upcast does)."""
    if W_enc.dtype != mx.float32 and mx.default_device().type == mx.cpu:
        upcast = None if b_enc is None else b_enc.astype(mx.float32)
        pre = encode(x_centered.astype(mx.float32), W_enc.astype(mx.float32), upcast, expert)
        return pre.astype(W_enc.dtype)
    expert = mx.stop_gradient(expert)
    order = mx.stop_gradient(mx.argsort(expert))
    expert_sorted = expert[order]
    pre = mx.gather_mm(x_centered[order][:, None, :], W_enc,
                       rhs_indices=expert_sorted, sorted_indices=True)[:, 0, :]
    if b_enc is not None:
        pre = pre + b_enc[expert_sorted]
    return pre[mx.stop_gradient(mx.argsort(order))]


def decode(values, indices, W_dec_flat):
    """sum_j values[:, j] * W_dec_flat[indices[:, j]]: gather k rows per token, then a
    (1, k) @ (k, d) product per token.  values, indices: (batch, k); W_dec_flat: (N*m, d)
    -> (batch, d)."""
    batch, k = values.shape
    rows = mx.take(W_dec_flat, mx.stop_gradient(indices).reshape(batch * k), axis=0)
    rows = rows.reshape(batch, k, W_dec_flat.shape[-1])
    return (values[:, None, :] @ rows)[:, 0, :]
