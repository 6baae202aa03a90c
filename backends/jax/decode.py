"""The sparse decode on JAX: sum_j values[:, j] * table[indices[:, j]], no dense activation.

"ragged" dispatch (TPU/GPU): a row gather and a weighted sum; XLA's gradient of the gather is a
scatter-add into the selected rows.  "tiles" (CPU): tokens sorted by their first latent (which
groups a Switch SAE's tokens by expert) and cut into tiles, one k-column of row gathers at a
time, so each tile reads and writes one expert's block of the table while it is in cache; a
custom VJP with the same structure (`dispatch.sampled_dot` for the values, `scatter_outer` for
the table)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from . import dispatch as D
from . import lazy as L


def decode(values, indices, table, mode: str = "tiles"):
    """values, indices: (batch, k); table: (R, d) -> (batch, d).  mode: see `dispatch`."""
    if mode == "ragged":
        return gather_decode(values, indices, table)
    return _tiled_decode(values, indices, table)


def gather_decode(values, indices, table):
    """The gather form: (batch, k, d) selected rows, weighted and summed over k."""
    rows = jnp.take(table, indices, axis=0)
    return jnp.sum(values[:, :, None] * rows, axis=1)


def _plan(indices):
    return D.plan_tiles(jnp.zeros(indices.shape[0], jnp.int32), 1, sort_key=indices[:, 0] if indices.shape[1] else None)


@jax.custom_vjp
def _tiled_decode(values, indices, table):
    return _tiled_decode_fwd(values, indices, table)[0]


def _tiled_decode_fwd(values, indices, table):
    plan = _plan(indices)
    v, i = D.to_tiles(values, plan), D.to_tiles(indices, plan)  # empty slots: weight 0, row 0
    out = D.from_tiles(D.map_tiles(lambda _, vt, it: D.gather_sum(vt, it, table), plan, v, i), plan)
    return out, (plan, v, i, table, values)


def _tiled_decode_bwd(res, grad_out):
    plan, v, i, table, values = res
    grad_values, grad_table = _tiled_grads(plan, v, i, table, grad_out, table.shape[0], lambda rows: rows)
    return (D.cotangent_like(grad_values.astype(v.dtype), values), None,
            D.cotangent_like(grad_table.astype(table.dtype), table))


def _tiled_grads(plan, v, i, table, grad_out, n_rows, row_of):
    """-> grad_values (batch, k); the table's gradient summed into n_rows rows by
    row_of(table rows) (batch-tiled indices -> [0, n_rows))."""
    g = D.to_tiles(grad_out, plan)
    grad_values = D.from_tiles(D.map_tiles(lambda _, gt, it, vt: D.sampled_dot(gt, it, table, vt), plan, g, i, v), plan)
    acc_dtype = jnp.promote_types(table.dtype, jnp.float32)
    grad_table = D.accumulate_tiles(lambda acc, _, rt, vt, gt: D.scatter_outer(acc, rt, vt, gt),
                                    jnp.zeros((n_rows, table.shape[1]), acc_dtype), plan, row_of(i), v, g)
    return grad_values, grad_table


_tiled_decode.defvjp(_tiled_decode_fwd, _tiled_decode_bwd)


# -- the same, with the table's gradient as rows (lazy Adam) ----------------------------------
@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def decode_rows(mode, values, indices, table, ids, sink):
    """`decode`, for `JaxBackend.loss_and_row_grads`: the table gets no gradient; instead the
    zero array `sink` (C, d) receives its gradient at the rows `ids` (C,) lists (every row an
    entry with a non-zero value selects must be listed)."""
    return decode(values, indices, table, mode)


def _decode_rows_fwd(mode, values, indices, table, ids, sink):
    if mode == "ragged":
        return gather_decode(values, indices, table), (None, values, indices, table, ids)
    out, (plan, v, i, _, _) = _tiled_decode_fwd(values, indices, table)
    return out, (plan, v, i, table, ids)


def _decode_rows_bwd(mode, res, grad_out):
    plan, v, i, table, ids = res
    row_of = lambda rows: L.row_of(ids, rows)
    if plan is None:  # ragged: the (batch, k) entries at once
        grad_values = jnp.sum(grad_out[:, None, :] * jnp.take(table, i, axis=0), axis=-1)
        acc_dtype = jnp.promote_types(table.dtype, jnp.float32)
        grad_rows = jnp.zeros((ids.shape[0], table.shape[1]), acc_dtype).at[row_of(i).reshape(-1)].add(
            (v[:, :, None] * grad_out[:, None, :]).reshape(-1, table.shape[1]).astype(acc_dtype), mode="drop")
    else:
        grad_values, grad_rows = _tiled_grads(plan, v, i, table, grad_out, ids.shape[0], row_of)
    return grad_values.astype(v.dtype), None, None, None, grad_rows.astype(table.dtype)


decode_rows.defvjp(_decode_rows_fwd, _decode_rows_bwd)
