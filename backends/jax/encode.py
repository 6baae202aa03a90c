"""The expert encoder on JAX: each token through its own expert only (`dispatch`: tiles on CPU,
one `ragged_dot` on TPU/GPU), with a sparse backward.

`encode_topk` fuses encode, ReLU and TopK.  After ReLU and TopK the gradient reaching the
pre-activations is non-zero only at each token's k kept entries, so its backward is made of
sums over those (batch, k) entries (Gao et al. 2024), with c = expert * m + i the global latent:
  dW_enc[:, c] = sum_t g[t, j] x_c[t]      (scattered into an (M, d) table, one expert's tiles
                                            at a time on CPU; transposed once to (N, d, m))
  db_enc[c]    = sum_t g[t, j]             (per-latent sums)
  db_pre       = -sum_c db_enc[c] W_enc[:, c]
  dx[t]        = sum_j g[t, j] W_enc[:, c]  (only when x needs a gradient; dropped by jit else)
No (batch, m) gradient exists.  With keep_acts (AuxK reads acts) the acts' gradient is dense
and the backward takes the dense per-tile products.

GPU note: on GPU, XLA may run `ragged_dot` as a zero-padded (N, batch, ...) expansion instead
of a grouped GEMM.  JAX's Pallas/Triton lowering avoids that; `use_pallas_ragged_dot()`
switches it on (it needs a JAX build that ships the kernel).
"""

from __future__ import annotations

import functools
import importlib.util

import jax
import jax.numpy as jnp

from . import auxk as A
from . import dispatch as D
from . import lazy as L

_PALLAS_FLAG = "jax_ragged_dot_use_gpu_pallas_triton_lowering"
_PALLAS_MODULE = "jax._src.lax.pallas_lowerings.gpu.ragged_dot"


def grouped_encode(x, W_enc, b_enc, group_ids, mode: str = "tiles"):
    """Each token times its own group's encoder.  x: (batch, d); W_enc: (G, d, m); b_enc:
    (G, m) or None; group_ids: (batch,) int -> (batch, m).  Tokens whose id lies outside
    [0, G) get zero rows (the expert-parallel path uses this for tokens another device owns).
    mode: "tiles" or "ragged" (`dispatch`)."""
    if mode == "ragged":
        return _ragged_encode(x, W_enc, b_enc, group_ids)
    return _tiled_encode(x, W_enc, b_enc, group_ids)


def encode_topk(x, b_pre, W_enc, b_enc, expert, k: int, keep_acts: bool = True, mode: str = "tiles",
                dead=None, aux_k: int = 0, dead_cap: int | None = None):
    """relu((x - b_pre) @ W_enc[expert] (+ b_enc[expert])) and its TopK (spec tie rule), and
    with `dead` AuxK's TopK from the same activations (scale's `Backend.encode_topk_aux`).
    x: (batch, d); b_pre: (d,); W_enc: (N, d, m); b_enc: (N, m) or None; expert: (batch,);
    dead: (N, m) bool or None -> acts (batch, m) (None without keep_acts), values (batch, k),
    local indices (batch, k), and with dead: aux_values, aux_indices (batch, j), the top
    aux_k of acts masked to the token's expert's dead latents (j = aux_k; min(aux_k, dead_cap)
    with dead_cap, at least every expert's dead count: on the tiles, AuxK's TopK then runs over
    the dead columns only and its backward is dense over them, `auxk`)."""
    if keep_acts:  # acts carry gradient themselves: the dense backward
        pre = grouped_encode(x - b_pre, W_enc, b_enc, expert, mode)
        acts = jnp.maximum(pre, jnp.zeros((), pre.dtype))
        values, indices = jax.lax.top_k(acts, k)
        if dead is None:
            return acts, values, indices
        return (acts, values, indices, *_dead_topk(acts, dead[expert], aux_k))
    cap = dead_cap if dead is not None and mode == "tiles" else None
    out = _sparse_encode_topk(k, aux_k if dead is not None else 0, mode, cap, x, b_pre, W_enc, b_enc, expert, dead)
    return (None, *out)


def _dead_topk(acts, dead_rows, aux_k):
    """TopK of acts (T, m) masked to dead_rows (T, m) bool."""
    return tuple(jax.lax.top_k(jnp.where(dead_rows, acts, jnp.zeros((), acts.dtype)), aux_k))


# -- the plain encoder (dense pre-activation gradient) --------------------------------------
def _ragged_encode(x, W_enc, b_enc, group_ids):
    """One `ragged_dot` over tokens sorted by group; autodiff gives its grouped backward."""
    n_groups = W_enc.shape[0]
    mine = (group_ids >= 0) & (group_ids < n_groups)
    key = jnp.where(mine, group_ids, n_groups).astype(jnp.int32)  # foreign tokens sort last
    order = jnp.argsort(key, stable=True)
    group_sizes = jnp.zeros(n_groups, jnp.int32).at[key].add(1, mode="drop")
    pre_sorted = jax.lax.ragged_dot(x[order], W_enc, group_sizes)
    inverse = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))
    pre = pre_sorted[inverse]
    if b_enc is not None:
        pre = pre + b_enc[jnp.minimum(key, n_groups - 1)]
    # ragged_dot leaves rows past sum(group_sizes) unspecified: zero them explicitly
    return jnp.where(mine[:, None], pre, jnp.zeros_like(pre))


def _expert(W, group):
    return jax.lax.dynamic_index_in_dim(W, group, keepdims=False)


def _tile_pre(W_enc, b_enc, group, x_tile):
    """(rows, d) tile of one group -> its pre-activations (rows, m)."""
    pre = x_tile @ _expert(W_enc, group)
    return pre if b_enc is None else pre + _expert(b_enc, group)


@jax.custom_vjp
def _tiled_encode(x, W_enc, b_enc, group_ids):
    return _tiled_encode_fwd(x, W_enc, b_enc, group_ids)[0]


def _tiled_encode_fwd(x, W_enc, b_enc, group_ids):
    plan = D.plan_tiles(group_ids, W_enc.shape[0])
    x_tiles = D.to_tiles(x, plan)
    pre = D.from_tiles(D.map_tiles(functools.partial(_tile_pre, W_enc, b_enc), plan, x_tiles), plan)
    return pre, (plan, x_tiles, x, W_enc, b_enc)


def _tiled_encode_bwd(res, grad_pre):
    plan, x_tiles, x, W_enc, b_enc = res
    grads = _dense_tile_grads(plan, x_tiles, D.to_tiles(grad_pre, plan), W_enc, b_enc is not None)
    return (*_like_primals(grads, (x, W_enc, b_enc)), None)


def _like_primals(cotangents, primals):
    return tuple(None if c is None else D.cotangent_like(c, p) for c, p in zip(cotangents, primals))


_tiled_encode.defvjp(_tiled_encode_fwd, _tiled_encode_bwd)


def _dense_tile_grads(plan, x_tiles, grad_tiles, W_enc, has_bias):
    """Gradients from a dense pre-activation gradient in tiles (n_tiles, rows, m):
    -> dx (batch, d), dW_enc (G, d, m), db_enc (G, m) or None."""
    acc_dtype = jnp.promote_types(W_enc.dtype, jnp.float32)
    grad_x = D.from_tiles(D.map_tiles(lambda g, gt: gt @ _expert(W_enc, g).T, plan, grad_tiles), plan)

    def add(acc, g, xt, gt):
        dW, db = acc
        dW = dW.at[g].add(jnp.matmul(xt.T, gt, preferred_element_type=acc_dtype))
        return dW, db.at[g].add(jnp.sum(gt.astype(acc_dtype), axis=0))

    zeros = (jnp.zeros(W_enc.shape, acc_dtype), jnp.zeros((W_enc.shape[0], W_enc.shape[2]), acc_dtype))
    dW, db = D.accumulate_tiles(add, zeros, plan, x_tiles, grad_tiles)
    return grad_x, dW.astype(W_enc.dtype), db.astype(W_enc.dtype) if has_bias else None


# -- the fused encoder + ReLU + TopK with the sparse backward --------------------------------
@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _sparse_encode_topk(k, aux_k, mode, cap, x, b_pre, W_enc, b_enc, expert, dead):
    return _sparse_encode_topk_fwd(k, aux_k, mode, cap, x, b_pre, W_enc, b_enc, expert, dead)[0]


def _kept(acts, dead_rows, k, aux_k):
    """TopK of acts (T, m), and AuxK's (of the dead_rows) when aux_k: 2 or 4 arrays (T, .)."""
    kept = tuple(jax.lax.top_k(acts, k))
    return kept + _dead_topk(acts, dead_rows, aux_k) if aux_k else kept


def _sparse_encode_topk_fwd(k, aux_k, mode, cap, x, b_pre, W_enc, b_enc, expert, dead):
    x_centered = x - b_pre
    relu = lambda pre: jnp.maximum(pre, jnp.zeros((), pre.dtype))
    aux = None  # with cap: (DeadColumns, each AuxK entry's column in them, in tiles)
    if mode == "ragged":
        acts = relu(_ragged_encode(x_centered, W_enc, b_enc, expert))
        out = _kept(acts, dead[expert] if aux_k else None, k, aux_k)
        plan, x_rows, tiled = None, x_centered, out
    else:
        plan = D.plan_tiles(expert, W_enc.shape[0])
        x_rows = D.to_tiles(x_centered, plan)
        columns = A.dead_columns(dead, cap) if cap else None

        def tile(group, xt):
            acts = relu(_tile_pre(W_enc, b_enc, group, xt))
            if columns is None:
                dead_rows = jnp.broadcast_to(_expert(dead, group), acts.shape) if aux_k else None
                return _kept(acts, dead_rows, k, aux_k)
            cols = columns.cols[group]
            dead_acts = jnp.where(_expert(dead, group)[cols], acts.at[:, cols].get(mode=D._GRID),
                                  jnp.zeros((), acts.dtype))
            if aux_k >= cap:  # every dead column is kept: no selection (AuxK's entries in any order)
                at = jnp.broadcast_to(jnp.arange(cap, dtype=jnp.int32), dead_acts.shape)
                return (*_kept(acts, None, k, 0), dead_acts, jnp.broadcast_to(cols, dead_acts.shape), at)
            aux_values, at = jax.lax.top_k(dead_acts, aux_k)
            return (*_kept(acts, None, k, 0), aux_values, cols.at[at].get(mode=D._GRID), at)

        tiled = D.map_tiles(tile, plan, x_rows)
        if columns is not None:
            aux, tiled = (columns, tiled[4]), tiled[:4]
        out = tuple(D.from_tiles(t, plan) for t in tiled)
    # the backward's entries: the kept values and their local ids, main TopK then AuxK's
    values, indices = jnp.concatenate(tiled[0::2], -1), jnp.concatenate(tiled[1::2], -1)
    return out, (plan, x_rows, values, indices, x, b_pre, W_enc, b_enc, expert, aux)


def _sparse_encode_topk_bwd(k, aux_k, mode, cap, res, cotangents):
    plan, x_rows, values, indices, x, b_pre, W_enc, b_enc, expert, aux = res
    n, d, m = W_enc.shape
    acc_dtype = jnp.promote_types(W_enc.dtype, jnp.float32)
    g, latents, table, sums = _entry_sums(plan, x_rows, values, indices, expert, cotangents, m, n * m,
                                          lambda latents: latents, aux)
    grad_W = jnp.transpose(table.reshape(n, m, d), (0, 2, 1)).astype(W_enc.dtype)
    # per-expert products summed (contracting n and m at once would transpose W_enc first)
    grad_b_pre = -jnp.sum(jnp.einsum("ndm,nm->nd", W_enc, sums.reshape(n, m).astype(W_enc.dtype),
                                     preferred_element_type=acc_dtype), 0).astype(W_enc.dtype)
    grad_b = sums.reshape(n, m).astype(b_enc.dtype) if b_enc is not None else None
    table_of_W = jnp.transpose(W_enc, (0, 2, 1)).reshape(n * m, d)
    if plan is None:
        grad_x = D.gather_sum(g, latents, table_of_W)
    else:
        grad_x = D.from_tiles(D.map_tiles(lambda _, gt, lt: D.gather_sum(gt, lt, table_of_W), plan, g, latents), plan)
    grads = _like_primals((grad_x.astype(x.dtype), grad_b_pre, grad_W, grad_b), (x, b_pre, W_enc, b_enc))
    return (*grads, None, None)  # jit drops grad_x when x needs none


def _entry_sums(plan, x_rows, values, indices, expert, cotangents, m, n_rows, row_of, aux=None):
    """The backward's sums over the kept entries (module notes).  cotangents: of the forward's
    outputs (values, indices, ...); row_of: global latent ids -> rows of the sums' tables (in
    [0, n_rows)); aux: None, or (DeadColumns, AuxK's columns in them (n_tiles, rows, j)), the
    last j entries AuxK's, whose part of the table is a dense product per tile (`auxk`).
    -> g (the kept entries' pre-activation gradient), their global latent ids
    (both (batch, K) or in tiles), table (n_rows, d) = sum g x_c per row, sums (n_rows,) = sum g."""
    d = x_rows.shape[-1]
    acc_dtype = jnp.promote_types(x_rows.dtype, jnp.float32)
    grad_values = jnp.concatenate(cotangents[0::2], -1)  # main TopK's, then AuxK's
    if plan is None:  # ragged: the (batch, K) entries at once
        g = grad_values * (values > 0)  # through relu: zero where the kept value is 0
        latents = expert[:, None].astype(indices.dtype) * m + indices
        table = jnp.zeros((n_rows, d), acc_dtype).at[row_of(latents).reshape(-1)].add(
            (g[:, :, None] * x_rows[:, None, :]).reshape(-1, d).astype(acc_dtype), mode="drop")
    else:  # tiles: one expert's tiles at a time, its rows of the table in cache
        g = D.to_tiles(grad_values, plan) * (values > 0)
        latents = plan.tile_group[:, None, None] * m + indices
        table = jnp.zeros((n_rows, d), acc_dtype)
        if aux is None:
            table = D.accumulate_tiles(lambda acc, _, rt, gt, xt: D.scatter_outer(acc, rt, gt, xt),
                                       table, plan, row_of(latents), g, x_rows)
        else:
            columns, at = aux
            n_main = indices.shape[-1] - at.shape[-1]

            def add(acc, group, rt, gt, xt, att):
                acc = D.scatter_outer(acc, rt[:, :n_main], gt[:, :n_main], xt)
                dense = A.dense_entries(gt[:, n_main:], att, columns.cap)  # (rows, cap)
                rows = row_of(group * m + columns.cols[group])
                return acc.at[rows].add(jnp.matmul(dense.T, xt, preferred_element_type=acc_dtype), mode=D._GRID)

            table = D.accumulate_tiles(add, table, plan, row_of(latents), g, x_rows, at)
    sums = jnp.zeros(n_rows, acc_dtype).at[row_of(latents).reshape(-1)].add(g.reshape(-1).astype(acc_dtype),
                                                                            mode="drop")
    return g, latents, table, sums


_sparse_encode_topk.defvjp(_sparse_encode_topk_fwd, _sparse_encode_topk_bwd)


# -- the same, with the latent-row gradients as rows (lazy Adam) ------------------------------
def encode_topk_rows(x, b_pre, W_enc, b_enc, expert, k: int, mode: str, dead, aux_k: int, sink: dict):
    """`encode_topk` without keep_acts, for `JaxBackend.loss_and_row_grads`: W_enc and b_enc get no
    gradient; instead the zero arrays `sink` ("W_enc": (C, d), "b_enc": (C,) when b_enc is given)
    receive theirs at the C latents `lazy.touched_ids` lists.  -> (values, indices[, aux_values,
    aux_indices]) as `encode_topk`, ids (C,), count ()."""
    return _rows_encode_topk(k, aux_k if dead is not None else 0, mode, x, b_pre, W_enc, b_enc, expert, dead,
                             sink["W_enc"], sink.get("b_enc"))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _rows_encode_topk(k, aux_k, mode, x, b_pre, W_enc, b_enc, expert, dead, sink_W, sink_b):
    return _rows_encode_topk_fwd(k, aux_k, mode, x, b_pre, W_enc, b_enc, expert, dead, sink_W, sink_b)[0]


def _rows_encode_topk_fwd(k, aux_k, mode, x, b_pre, W_enc, b_enc, expert, dead, sink_W, sink_b):
    out, res = _sparse_encode_topk_fwd(k, aux_k, mode, None, x, b_pre, W_enc, b_enc, expert, dead)
    n, _, m = W_enc.shape
    values, indices = jnp.concatenate(out[0::2], -1), jnp.concatenate(out[1::2], -1)
    ids, count = L.touched_ids(expert[:, None].astype(indices.dtype) * m + indices, values > 0, n * m,
                               sink_W.shape[0])
    return (out, ids, count), (res, ids)


def _rows_encode_topk_bwd(k, aux_k, mode, residuals, cotangents):
    (plan, x_rows, values, indices, x, b_pre, W_enc, b_enc, expert, _), ids = residuals
    n, _, m = W_enc.shape
    _, _, table, sums = _entry_sums(plan, x_rows, values, indices, expert, cotangents[0], m, ids.shape[0],
                                    lambda latents: L.row_of(ids, latents))
    grad_b_pre = -(sums @ L.gather_rows("W_enc", W_enc, ids).astype(sums.dtype))
    return (None, grad_b_pre.astype(b_pre.dtype), None, None, None, None, table.astype(W_enc.dtype),
            None if b_enc is None else sums.astype(b_enc.dtype))


_rows_encode_topk.defvjp(_rows_encode_topk_fwd, _rows_encode_topk_bwd)


# -- GPU lowering switch ---------------------------------------------------------------------
def use_pallas_ragged_dot(enabled: bool = True) -> None:
    """Switch JAX's Pallas/Triton GPU lowering of `ragged_dot` on or off (process-wide; it
    is part of the jit cache key, so functions recompile).  No effect on CPU/TPU.

    Raises RuntimeError if this JAX build lacks the kernel module (released wheels 0.10.0 to
    0.11.2 at least lack it: jax-ml/jax#40888)."""
    if enabled and not _pallas_kernel_available():
        raise RuntimeError(
            f"this JAX build ({jax.__version__}) does not ship {_PALLAS_MODULE}, so "
            f"{_PALLAS_FLAG} would fail at compile time (jax-ml/jax#40888); "
            "build JAX from source or keep the default XLA lowering"
        )
    jax.config.update(_PALLAS_FLAG, bool(enabled))


def _pallas_kernel_available() -> bool:
    try:
        return importlib.util.find_spec(_PALLAS_MODULE) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False
