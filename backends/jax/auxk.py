"""AuxK over each expert's dead latents as dense per-tile products (the "tiles" dispatch).

AuxK keeps up to aux_k = d / 2 entries per token, but only at its expert's dead latents, a few
of the m.  With `cap` >= every expert's dead count (static: `compile.compile_step` reads the
count back and buckets it, `dead_cap`), the dead latents of expert e are listed in
cols[e] (cap,), and a tile of one expert's tokens holds AuxK's entries as a dense (rows, cap)
matrix over those columns: its decode is one (rows, cap) @ (cap, d) product, its backward two,
and the encoder's AuxK TopK runs over cap columns instead of m (`encode`), or is skipped when
aux_k >= cap (every dead latent kept, in column order: `Backend.encode_topk_aux` allows any
order).  The row gathers and outer-product scatters of the generic sparse decode become GEMMs;
the result is the same."""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from . import dispatch as D

CAP_STEP = 64  # the cap's bucket: a multiple of this (a recompile per bucket the dead count visits)


class DeadColumns(NamedTuple):
    """cols: (N, cap) int32, each expert's dead local latents ascending, then padding (some
    latent that is not dead: its entries are 0); pos: (N, m) int32, each latent's column in
    cols, cap for a latent that is not dead."""

    cols: jax.Array
    pos: jax.Array

    @property
    def cap(self) -> int:
        return self.cols.shape[1]


def dead_columns(dead, cap: int) -> DeadColumns:
    """dead: (N, m) bool with at most `cap` dead latents per expert -> DeadColumns."""
    cols = jnp.argsort(~dead, axis=1, stable=True)[:, :cap].astype(jnp.int32)
    pos = jnp.where(dead, jnp.cumsum(dead, axis=1, dtype=jnp.int32) - 1, cap).astype(jnp.int32)
    return DeadColumns(cols, pos)


def dead_cap(count: int, m: int, previous: int | None = None) -> int:
    """The cap for a step whose experts have at most `count` dead latents: the previous cap while
    it fits and is at most one bucket too large (few recompiles), else `count` rounded up to a
    multiple of CAP_STEP; never more than m."""
    fit = min(m, CAP_STEP * max(1, -(-count // CAP_STEP)))
    if previous is not None and count <= previous <= fit + CAP_STEP:
        return previous
    return fit


def dense_entries(values, positions, cap: int):
    """values, positions: (T, j), positions in [0, cap] (cap: no column) -> (T, cap), the values
    summed at their positions."""
    rows = jnp.arange(values.shape[0], dtype=jnp.int32)[:, None]
    return jnp.zeros((values.shape[0], cap), values.dtype).at[rows, positions].add(values, mode="drop")


def decode_dead(values, indices, expert, dead, table, cap: int):
    """AuxK's part of `Backend.decode_with_aux` on the tiles: sum_j values[:, j] * table[expert * m + indices[:, j]]
    -> (batch, d), as one dense product per tile of an expert's tokens over its dead columns.
    values, indices: (batch, j) local ids, an entry at a latent that is not dead of value 0;
    expert: (batch,); dead: (N, m) bool, at most cap dead per expert; table: (N * m, d)."""
    return _decode_dead(cap, values, indices, expert, dead, table)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _decode_dead(cap, values, indices, expert, dead, table):
    return _decode_dead_fwd(cap, values, indices, expert, dead, table)[0]


def _expert_rows(table, columns: DeadColumns, group, m):
    """The (cap, d) rows of `table` at expert `group`'s dead columns."""
    return table.at[group * m + columns.cols[group]].get(mode=D._GRID)


def _decode_dead_fwd(cap, values, indices, expert, dead, table):
    n, m = dead.shape
    columns = dead_columns(dead, cap)
    plan = D.plan_tiles(expert, n)
    v, i = D.to_tiles(values, plan), D.to_tiles(indices, plan)

    def tile(group, vt, it):
        dense = dense_entries(vt, columns.pos[group].at[it].get(mode=D._GRID), cap)
        return dense @ _expert_rows(table, columns, group, m).astype(dense.dtype), dense

    out, dense = D.map_tiles(tile, plan, v, i)
    return D.from_tiles(out, plan), (plan, columns, dense, i, values, table)


def _decode_dead_bwd(cap, res, grad_out):
    plan, columns, dense, i, values, table = res
    n, m = columns.pos.shape
    g = D.to_tiles(grad_out, plan)
    acc_dtype = jnp.promote_types(table.dtype, jnp.float32)

    def value_grads(group, gt, it):
        grad_dense = gt @ _expert_rows(table, columns, group, m).astype(gt.dtype).T  # (rows, cap)
        return jnp.take_along_axis(grad_dense, jnp.minimum(columns.pos[group].at[it].get(mode=D._GRID), cap - 1),
                                   axis=1)

    grad_values = D.from_tiles(D.map_tiles(value_grads, plan, g, i), plan)

    def rows(acc, group, dt, gt):  # acc: (N, cap, d), each expert's dead rows
        return acc.at[group].add(jnp.matmul(dt.T, gt, preferred_element_type=acc_dtype), mode=D._GRID)

    grad_rows = D.accumulate_tiles(rows, jnp.zeros((n, cap, table.shape[1]), acc_dtype), plan, dense, g)
    # one scatter after the loop (the padding columns' rows are 0): XLA folds it into the sum with
    # the main decode's gradient table, so AuxK adds no (N * m, d) table of its own
    dead_rows = (jnp.arange(n, dtype=jnp.int32)[:, None] * m + columns.cols).reshape(-1)
    grad_table = jnp.zeros(table.shape, acc_dtype).at[dead_rows].add(grad_rows.reshape(n * cap, -1),
                                                                      mode=D._GRID)
    # entries at latents that are not dead have value 0 (the contract): gradient 0 is allowed
    grad_values = jnp.where(values != 0, grad_values, jnp.zeros((), grad_values.dtype))
    return (D.cotangent_like(grad_values.astype(values.dtype), values), None, None, None,
            D.cotangent_like(grad_table.astype(table.dtype), table))


_decode_dead.defvjp(_decode_dead_fwd, _decode_dead_bwd)
