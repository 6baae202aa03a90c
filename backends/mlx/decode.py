"""The sparse decode on MLX: gather the k kept rows per token, one small product each."""

from __future__ import annotations

import mlx.core as mx


def decode(values, indices, W_dec_flat):
    """sum_j values[:, j] * W_dec_flat[indices[:, j]]: gather k rows per token, then a
    (1, k) @ (k, d) product per token.  values, indices: (batch, k); W_dec_flat: (N*m, d)
    -> (batch, d)."""
    batch, k = values.shape
    rows = mx.take(W_dec_flat, mx.stop_gradient(indices).reshape(batch * k), axis=0)
    rows = rows.reshape(batch, k, W_dec_flat.shape[-1])
    return (values[:, None, :] @ rows)[:, 0, :]
