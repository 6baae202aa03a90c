"""Token dispatch on JAX: every token multiplied by its own expert's weights, two ways.

"ragged": tokens sorted by expert, one `jax.lax.ragged_dot` (a grouped GEMM on TPU and GPU).
"tiles": tokens sorted by expert into tiles of a fixed number of rows, each tile wholly one
  expert's (each expert's run padded to a whole number of tiles), and a loop over the tiles
  with one (rows, d) @ (d, m) matmul each.  XLA's CPU backend lowers `ragged_dot` to a masked
  (N, batch, m) product, N times the work; tiles do the grouped GEMM's work plus padding.

The tile count is static, ceil(batch / rows) + N, enough for any routing, so no token is ever
dropped and nothing recompiles when the load changes; tiles past the last used one are
skipped.  Padding is at most N * rows rows (about N * rows / 2 in expectation).  One expert's
tiles are consecutive, so its weights stay in cache for its whole run, in the matmul and in
the sparse backward products (`scatter_outer`).

The mode is per platform ("ragged" on TPU/GPU, "tiles" elsewhere) and overridable:
$SWITCHSAE_JAX_DISPATCH = auto | tiles | ragged, or `JaxBackend(dispatch_mode=...)`.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import jax
import jax.numpy as jnp

MODES = ("tiles", "ragged")
ENV = "SWITCHSAE_JAX_DISPATCH"
TILE_ROWS = 256  # measured on a 2-core AVX-512 CPU, d 768, m 1536: 512 was slower; see `tile_rows`
_GRID = "promise_in_bounds"  # every index below is in range by construction


def choose_mode(requested: str | None = None, platform: str | None = None) -> str:
    """The dispatch to use: `requested`, else $SWITCHSAE_JAX_DISPATCH, else "auto", which is
    "ragged" on TPU and GPU (a real grouped GEMM there) and "tiles" elsewhere (CPU)."""
    mode = requested or os.environ.get(ENV) or "auto"
    if mode == "auto":
        platform = platform or jax.default_backend()
        return "ragged" if platform in ("tpu", "gpu", "cuda", "rocm") else "tiles"
    if mode not in MODES:
        source = "dispatch_mode" if requested else f"${ENV}"
        raise ValueError(f"{source} must be one of auto, {', '.join(MODES)}; got {mode!r}")
    return mode


class TilePlan(NamedTuple):
    """Where each token sits in the tiles (every field an array, so a plan can be a residual
    of a custom VJP).  slot_token:
    (n_tiles * rows,) the token at each slot (batch for an empty slot); token_slot: (batch,)
    each token's slot (n_tiles * rows for a token of no group); tile_group: (n_tiles,) the
    group (expert) of each tile; n_used: () the number of tiles holding tokens."""

    slot_token: jax.Array
    token_slot: jax.Array
    tile_group: jax.Array
    n_used: jax.Array

    @property
    def n_tiles(self) -> int:
        return self.tile_group.shape[0]

    @property
    def rows(self) -> int:
        """Tile height."""
        return self.slot_token.shape[0] // self.n_tiles


def tile_rows(batch: int, n_groups: int = 1) -> int:
    """TILE_ROWS, halved when the expected padding (half a tile per group) exceeds an eighth of the
    batch, or the batch rounded up to a power of two when that is smaller.  Measured (one core, d 768,
    batch 4096, the train step): N = 16 (m 1536) 9 % faster at 128 rows than at 256 (96 no better),
    N = 1 (m 24576) 7 % slower."""
    rows = TILE_ROWS if n_groups * TILE_ROWS <= batch // 4 else TILE_ROWS // 2
    return min(rows, 1 << max(0, (batch - 1).bit_length()))


def plan_tiles(group_ids, n_groups: int, sort_key=None) -> TilePlan:
    """group_ids: (batch,) int -> TilePlan.  Within a group tokens keep their batch order, or
    the order of sort_key (batch,) when given; ids outside [0, n_groups) (tokens another
    device owns) are placed in no tile."""
    batch = group_ids.shape[0]
    rows = tile_rows(batch, n_groups)
    n_tiles = -(-batch // rows) + n_groups
    key = jnp.where((group_ids >= 0) & (group_ids < n_groups), group_ids, n_groups).astype(jnp.int32)
    sizes = jnp.zeros(n_groups + 1, jnp.int32).at[key].add(1)  # the last counts foreign tokens
    tiles_per_group = (sizes[:n_groups] + rows - 1) // rows
    tile_end = jnp.cumsum(tiles_per_group)
    first_slot = jnp.concatenate([(tile_end - tiles_per_group) * rows, jnp.full((1,), n_tiles * rows, jnp.int32)])
    order = jnp.argsort(key, stable=True) if sort_key is None else jnp.lexsort((sort_key, key))
    order = order.astype(jnp.int32)  # sorted position -> token
    sorted_key = key[order]
    rank = jnp.arange(batch, dtype=jnp.int32) - (jnp.cumsum(sizes) - sizes)[sorted_key]
    slot = jnp.where(sorted_key < n_groups, first_slot[sorted_key] + rank, n_tiles * rows)
    token_slot = jnp.zeros(batch, jnp.int32).at[order].set(slot, mode=_GRID)
    slot_token = jnp.full(n_tiles * rows, batch, jnp.int32).at[slot].set(order, mode="drop")
    tile_group = jnp.minimum(jnp.searchsorted(tile_end, jnp.arange(n_tiles), side="right"), n_groups - 1)
    return TilePlan(slot_token, token_slot, tile_group.astype(jnp.int32), tile_end[-1])


def to_tiles(a, plan: TilePlan):
    """(batch, ...) -> (n_tiles, rows, ...): each slot's token row, zeros in empty slots."""
    padded = jnp.concatenate([a, jnp.zeros((1,) + a.shape[1:], a.dtype)])
    return padded.at[plan.slot_token].get(mode=_GRID).reshape((plan.n_tiles, plan.rows) + a.shape[1:])


def from_tiles(tiled, plan: TilePlan):
    """(n_tiles, rows, ...) -> (batch, ...): each token's row, zeros for tokens in no tile."""
    flat = tiled.reshape((-1,) + tiled.shape[2:])
    padded = jnp.concatenate([flat, jnp.zeros((1,) + flat.shape[1:], flat.dtype)])
    return padded.at[plan.token_slot].get(mode=_GRID)


def map_tiles(fn, plan: TilePlan, *tiled):
    """[fn(group, *tile_args) for each used tile], stacked; zeros for the unused tiles.
    tiled: arrays (n_tiles, rows, ...); fn(group: () int, *(rows, ...)) -> pytree."""
    shapes = jax.eval_shape(fn, plan.tile_group[0], *(t[0] for t in tiled))

    def zeros():
        return jax.tree.map(lambda s: _varying_like(jnp.zeros(s.shape, s.dtype), s), shapes)

    def one(args):
        i, group, *tile = args
        return jax.lax.cond(i < plan.n_used, lambda: fn(group, *tile), zeros)

    return jax.lax.map(one, (jnp.arange(plan.n_tiles), plan.tile_group, *tiled))


def accumulate_tiles(fn, init, plan: TilePlan, *tiled):
    """Fold fn(acc, group, *tile_args) -> acc over the used tiles, in order (for sums into
    a shared table, updated in place)."""
    shapes = jax.eval_shape(fn, init, plan.tile_group[0], *(t[0] for t in tiled))
    init = jax.tree.map(_varying_like, init, shapes)

    def one(acc, args):
        i, group, *tile = args
        return jax.lax.cond(i < plan.n_used, lambda: fn(acc, group, *tile), lambda: acc), None

    return jax.lax.scan(one, init, (jnp.arange(plan.n_tiles), plan.tile_group, *tiled))[0]


def _varying_like(value, *like):
    """value, marked as varying over every manual mesh axis the arrays or shape structs
    `like` vary over (inside `shard_map` a cond's two branches, and a scan's carry in and
    out, must agree; outside it this is the identity)."""
    axes = frozenset().union(*(_varying_axes(a if isinstance(a, jax.ShapeDtypeStruct) else jax.typeof(a)) for a in like))
    missing = tuple(axes - _varying_axes(jax.typeof(value)))
    return jax.lax.pcast(value, missing, to="varying") if missing else value


def cotangent_like(ct, primal):
    """A custom VJP's cotangent given the manual mesh axes of its primal: summed over the axes
    it varies over and the primal does not (inside `shard_map` an invariant input is broadcast
    to the varying computation, whose transpose is that sum); the identity outside."""
    extra = tuple(_varying_axes(jax.typeof(ct)) - _varying_axes(jax.typeof(primal)))
    return _varying_like(jax.lax.psum(ct, extra) if extra else ct, primal)


def _varying_axes(aval) -> frozenset:
    kind = aval.manual_axis_type  # None outside shard_map
    return frozenset() if kind is None else frozenset(kind.varying)


def scatter_outer(table, indices, weights, rows):
    """table (R, d) + sum_j weights[:, j, None] * rows at row indices[:, j], one k-column at a
    time (each a (rows, d) update), skipping the columns whose weights are all 0.
    indices, weights: (T, k); rows: (T, d)."""

    def column(acc, idx, w):
        return acc.at[idx].add((w[:, None] * rows).astype(acc.dtype), mode=_GRID)

    return _over_columns(column, _varying_like(table, indices, weights, rows), weights, indices, weights)


def gather_sum(weights, indices, table):
    """sum_j weights[:, j, None] * table[indices[:, j]] -> (T, d), one k-column at a time,
    skipping the columns whose weights are all 0.  weights, indices: (T, k); table: (R, d)."""

    def column(acc, idx, w):
        return acc + w[:, None].astype(acc.dtype) * table.at[idx].get(mode=_GRID)

    init = _varying_like(jnp.zeros((weights.shape[0], table.shape[1]), table.dtype), weights, indices, table)
    return _over_columns(column, init, weights, indices, weights)


def sampled_dot(grad_rows, indices, table, weights):
    """grad_rows[t] . table[indices[t, j]] -> (T, k), 0 in the columns whose weights (T, k), the
    decode's values, are all 0 (`Backend.decode`: an entry of value 0 may get gradient 0).
    grad_rows: (T, d); indices: (T, k)."""

    def column(acc, idx, _, c):
        dots = jnp.sum(grad_rows * table.at[idx].get(mode=_GRID), axis=-1)
        return jax.lax.dynamic_update_index_in_dim(acc, dots.astype(acc.dtype), c, 0)

    init = _varying_like(jnp.zeros(indices.shape[::-1], jnp.promote_types(grad_rows.dtype, table.dtype)),
                         grad_rows, indices, table)
    return _over_columns(column, init, weights, indices, weights, with_column=True).T


def _over_columns(fn, init, weights, *columns, with_column: bool = False):
    """Fold fn(acc, *(column c of each of `columns` (T, k)) [, c]) -> acc over the columns c where
    `weights` (T, k) has a non-zero entry, in order (a loop of that many steps: the rest cost
    nothing; TopK and AuxK keep their positive values first, so past some column a tile's
    weights are 0)."""
    active = jnp.any(weights != 0, axis=0)
    order = jnp.argsort(~active, stable=True).astype(jnp.int32)
    transposed = [a.T for a in columns]

    def body(j, acc):
        c = order[j]
        args = [jax.lax.dynamic_index_in_dim(a, c, 0, keepdims=False) for a in transposed]
        return fn(acc, *args, c) if with_column else fn(acc, *args)

    return jax.lax.fori_loop(0, jnp.sum(active, dtype=jnp.int32), body, init)
