"""The sparse decode on JAX: sum_j values[:, j] * table[indices[:, j]], no dense activation.

"ragged" dispatch (TPU/GPU): a row gather and a weighted sum; XLA's gradient of the gather is a
scatter-add into the selected rows.  "tiles" (CPU): tokens sorted by their first latent (which
groups a Switch SAE's tokens by expert) and cut into tiles, one k-column of row gathers at a
time, so each tile reads and writes one expert's block of the table while it is in cache; a
custom VJP with the same structure (`dispatch.sampled_dot` for the values, `scatter_outer` for
the table)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from . import dispatch as D


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
    g = D.to_tiles(grad_out, plan)
    grad_values = D.from_tiles(D.map_tiles(lambda _, gt, it: D.sampled_dot(gt, it, table), plan, g, i), plan)
    acc_dtype = jnp.promote_types(table.dtype, jnp.float32)
    grad_table = D.accumulate_tiles(lambda acc, _, it, vt, gt: D.scatter_outer(acc, it, vt, gt),
                                    jnp.zeros(table.shape, acc_dtype), plan, i, v, g)
    return (D.cotangent_like(grad_values.astype(v.dtype), values), None,
            D.cotangent_like(grad_table.astype(table.dtype), table))


_tiled_decode.defvjp(_tiled_decode_fwd, _tiled_decode_bwd)
