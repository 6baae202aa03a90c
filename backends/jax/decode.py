"""The sparse decode on JAX: a row gather and a weighted sum over the k kept latents."""

from __future__ import annotations

import jax.numpy as jnp


def gather_decode(values, indices, table):
    """sum_j values[:, j] * table[indices[:, j]].  values, indices: (batch, k); table: (R, d).

    -> (batch, d).  Its gradient w.r.t. `table` is XLA's scatter-add into the selected rows
    (checked in tests/test_jax_backend.py), so no custom VJP is needed."""
    rows = jnp.take(table, indices, axis=0)
    return jnp.sum(values[:, :, None] * rows, axis=1)
