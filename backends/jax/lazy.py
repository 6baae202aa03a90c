"""Lazy Adam on JAX (`core.optim`'s row-sparse Adam) under `jit`, without a dense (M, d)
gradient: the latent-row gradients come as `Rows` over the C latents the step touched, and the
update reads and writes only those rows of W_enc, W_dec, b_enc and their moments.

Static shapes: C, the row capacity, is a power of two at least the touched count (or the bound
min(M, batch * (k + aux_k)), which no step exceeds).  The count is known only after the forward
pass, so `compile.compile_step` runs the step at its current capacity and reads the count back:
a step whose count exceeds C changes nothing (`lazy_update` under `overflow`) and runs again at
the next power of two; C shrinks when a power of two a quarter its size would do.  The step
compiles once per capacity used, a few times in a run.  `JaxBackend.loss_and_row_grads` has the
fused encoder (`encode.encode_topk_rows`) and the decode (`decode.decode_rows`) write their
gradients into zero "sink" arrays of C rows, differentiated instead of W_enc, W_dec and b_enc."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from switchsae.core.constraints import normalize_decoder, remove_parallel_grad
from switchsae.core.optim import LATENT_ROW_PARAMS, AdamState, adam_rows, clip_by_global_norm
from switchsae.core.train_step import apply_update


class Rows(NamedTuple):
    """A latent-row parameter's gradient at C latents.  ids: (C,) int32, the touched latents
    ascending, then M (no latent) past `count`; values: (C, d) (W_enc, W_dec) or (C,) (b_enc);
    count: () int32, the number of touched latents (more than C: the step overflowed)."""

    ids: jax.Array
    values: jax.Array
    count: jax.Array


class StepTrace:
    """What one trace of a compiled step records: `capacity` requested (None: the bound); set by
    `JaxBackend.loss_and_row_grads` when the step runs lazy Adam: `used` () the C it used,
    `bound` () its bound, `count` () the touched count (arrays of the trace).  `dead_cap`: the
    static cap on the experts' dead counts (`auxk`; None: unknown); `dead_shape`: (N, m), set when
    the step's AuxK could use one."""

    def __init__(self, capacity: int | None, dead_cap: int | None = None):
        self.capacity, self.dead_cap = capacity, dead_cap
        self.used = self.bound = self.count = None
        self.dead_shape = None

    def outputs(self):
        """(count, used, bound), or None for a step without row gradients."""
        return None if self.count is None else (self.count, self.used, self.bound)


def row_bound(n_latents: int, batch: int, kept: int) -> int:
    """The most latents a step of `batch` tokens keeping `kept` latents each can touch."""
    return min(n_latents, batch * kept)


def next_capacity(capacity: int | None, count: int, used: int, bound: int) -> int | None:
    """The capacity for the next step after one that used C = `used` (requested `capacity`) and
    touched `count` latents: the power of two >= count when count > C (grow) or when it is at most
    C / 4 (shrink), else unchanged; None (the bound) where that power reaches the bound."""
    fit = 1 << max(0, count - 1).bit_length()
    fit = None if fit >= bound else fit
    if count > used or (fit is not None and 4 * fit <= used):
        return fit
    return capacity


def touched_ids(latents, valid, n_latents: int, capacity: int):
    """latents: (batch, K) global ids of the kept entries; valid: (batch, K) bool, the entries that
    carry gradient (a positive kept value) -> ids (capacity,) the distinct valid latents ascending
    (n_latents past them; the smallest `capacity` when more), count () their number."""
    flat = jnp.sort(jnp.where(valid, latents, n_latents).reshape(-1).astype(jnp.int32))
    first = jnp.concatenate([flat[:1] < n_latents, (flat[1:] != flat[:-1]) & (flat[1:] < n_latents)])
    slot = jnp.where(first, jnp.cumsum(first) - 1, capacity)
    ids = jnp.full(capacity, n_latents, jnp.int32).at[slot].set(flat, mode="drop")
    return ids, jnp.sum(first, dtype=jnp.int32)


def row_of(ids, latents):
    """The row of `ids` (C,) holding each latent (any shape; a latent not listed gets some row,
    which the callers only give a zero gradient)."""
    return jnp.minimum(jnp.searchsorted(ids, latents.astype(ids.dtype)), ids.shape[0] - 1).astype(jnp.int32)


def gather_rows(name: str, a, ids):
    """Rows `ids` (C,) of a latent-row parameter or moment (W_enc (N, d, m): columns) -> (C, d) or
    (C,); zeros for the id M."""
    if name == "W_enc":
        m = a.shape[2]
        return a.at[ids // m, :, ids % m].get(mode="fill", fill_value=0)
    return _flat(name, a).at[ids].get(mode="fill", fill_value=0)


def scatter_rows(name: str, a, ids, rows):
    """`a` with its rows `ids` (C,) set to `rows` (ids M are skipped): the inverse of gather_rows."""
    if name == "W_enc":
        m = a.shape[2]
        return a.at[ids // m, :, ids % m].set(rows, mode="drop")
    return _flat(name, a).at[ids].set(rows, mode="drop").reshape(a.shape)


def _flat(name, a):
    return a.reshape(-1) if name == "b_enc" else a.reshape(-1, a.shape[-1])


def lazy_update(params: dict, grads: dict, state: AdamState, lr, max_grad_norm=1.0, betas=(0.9, 0.999),
                eps: float = 1e-8):
    """`core.train_step.apply_lazy_update` with the latent-row gradients as `Rows`: the touched
    latents are the rows with a non-zero gradient entry; clipping uses the exact global norm (the
    rows left out have zero gradient).  A step whose rows overflowed returns params and state
    unchanged (module notes).  -> (params, AdamState)."""
    latent = [n for n in LATENT_ROW_PARAMS if n in params]
    dense = [n for n in params if n not in latent]
    ids, count = grads["W_dec"].ids, grads["W_dec"].count
    overflow = count > ids.shape[0]
    touched = ids < 0
    for n in latent:
        nonzero = grads[n].values != 0
        touched = touched | (jnp.any(nonzero, axis=-1) if nonzero.ndim == 2 else nonzero)
    flat = {**{n: grads[n] for n in dense}, **{n: grads[n].values for n in latent}}
    if max_grad_norm is not None:
        flat = clip_by_global_norm(flat, max_grad_norm, jnp)

    def part(state_part, names):
        return {n: state_part[n] for n in names}

    new_dense, dense_state = apply_update(jnp, part(params, dense), part(flat, dense),
                                          AdamState(state.step, part(state.m, dense), part(state.v, dense)),
                                          lr, None, betas)
    keep = lambda old, new: jax.tree.map(lambda a, b: jnp.where(overflow, a, b), old, new)
    new_params = keep(part(params, dense), new_dense)
    new_m, new_v = keep(part(state.m, dense), dense_state.m), keep(part(state.v, dense), dense_state.v)
    written = jnp.where(touched & ~overflow, ids, ids.dtype.type(jnp.iinfo(ids.dtype).max))
    for n in latent:
        p, m, v = (gather_rows(n, t[n], ids) for t in (params, state.m, state.v))
        g = remove_parallel_grad(flat[n], p, jnp) if n == "W_dec" else flat[n]
        p, m, v = adam_rows(p, g, m, v, dense_state.step, lr, jnp, betas, eps)
        if n == "W_dec":
            p = normalize_decoder(p, jnp).astype(p.dtype)
        new_params[n], new_m[n], new_v[n] = (scatter_rows(n, t[n], written, r)
                                             for t, r in ((params, p), (state.m, m), (state.v, v)))
    step = jnp.where(overflow, state.step, dense_state.step)
    return new_params, AdamState(step, new_m, new_v)
