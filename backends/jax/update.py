"""Dense Adam on CPU in blocks of latent rows (`JaxBackend.update`): `core.train_step.apply_update`
computed block by block, so XLA's loops run on data in cache.

XLA's CPU backend emits one loop per output over whole arrays: for W_dec the projection off the
rows, the moments, the step and the renormalisation each stream the (M, d) arrays through memory,
and for W_enc each moment reads the gradient, which the encoder's backward builds as an (M, d)
latent table, transposed (strided).  Here one `fori_loop` takes BLOCK_ROWS latents at a time:
their W_dec rows, gradient rows, moments (clipped, projected, Adam, renormalised), and their W_enc
columns with the table's rows transposed in cache, written back in place into the donated buffers.
The moments are written before the step reads them back (`adam_moments`, then `adam_step`): XLA
would otherwise recompute them in the step's loop from the old ones, which the in-place writes
overwrite, and copy whole arrays per block.  The values are `apply_update`'s, op for op."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from switchsae.core.constraints import normalize_decoder, remove_parallel_grad
from switchsae.core.optim import AdamState, adam_moments, adam_step, clip_scale, latent_rows
from switchsae.core.train_step import apply_update

BLOCK_ROWS = 32  # latents per block; measured (d 768, M 24576, one core): 16 and 64-512 slower
BLOCKED = ("W_enc", "W_dec")


def block_rows(params: dict) -> int | None:
    """The block height for these parameters (a divisor of the expert width m), or None when the
    blocked update does not apply (no W_enc / W_dec, or m with no divisor of 8 or more in
    BLOCK_ROWS)."""
    if not all(n in params for n in BLOCKED):
        return None
    rows = math.gcd(params["W_enc"].shape[2], BLOCK_ROWS)
    return rows if rows >= 8 else None


def blocked_update(params: dict, grads: dict, opt_state: AdamState, lr, max_grad_norm, betas, rows: int):
    """`apply_update` with W_enc (N, d, m) and W_dec (N, m, d) updated `rows` latents at a time
    (module notes); the other parameters as `apply_update` with the same clip scale.
    -> (params, opt_state)."""
    table = {n: latent_rows(n, grads[n], jnp) if n in BLOCKED else g for n, g in grads.items()}  # (M, d) each
    scale = None if max_grad_norm is None else clip_scale(table, max_grad_norm, jnp)
    rest = [n for n in params if n not in BLOCKED]
    new, state = apply_update(jnp, {n: params[n] for n in rest},
                              {n: grads[n] if scale is None else grads[n] * scale for n in rest},
                              AdamState(opt_state.step, {n: opt_state.m[n] for n in rest},
                                        {n: opt_state.v[n] for n in rest}), lr, None, betas)
    n, d, m = params["W_enc"].shape
    step = state.step
    clipped = lambda g: g if scale is None else g * scale

    def block(b, arrays):
        enc, dec = arrays[:3], arrays[3:]  # (p, m, v) of W_enc (N, d, m) and of W_dec (M, d)
        row = b * rows
        expert, first = row // m, row % m
        take = lambda a: jax.lax.dynamic_slice_in_dim(a, row, rows, 0)
        put = lambda a, x: jax.lax.dynamic_update_slice_in_dim(a, x, row, 0)
        p = take(dec[0])
        moments = adam_moments(remove_parallel_grad(clipped(take(table["W_dec"])), p, jnp), take(dec[1]),
                               take(dec[2]), jnp, betas)
        dec_m, dec_v = (put(a, x) for a, x in zip(dec[1:], moments))
        dec_p = put(dec[0], normalize_decoder(adam_step(p, take(dec_m), take(dec_v), step, lr, jnp, betas), jnp))
        take_enc = lambda a: jax.lax.dynamic_slice(a, (expert, 0, first), (1, d, rows))
        put_enc = lambda a, x: jax.lax.dynamic_update_slice(a, x, (expert, 0, first))
        moments = adam_moments(clipped(take(table["W_enc"])).T[None], take_enc(enc[1]), take_enc(enc[2]), jnp, betas)
        enc_m, enc_v = (put_enc(a, x) for a, x in zip(enc[1:], moments))
        enc_p = put_enc(enc[0], adam_step(take_enc(enc[0]), take_enc(enc_m), take_enc(enc_v), step, lr, jnp, betas))
        return enc_p, enc_m, enc_v, dec_p, dec_m, dec_v

    flat = lambda a: a.reshape(n * m, d)
    arrays = (params["W_enc"], opt_state.m["W_enc"], opt_state.v["W_enc"],
              flat(params["W_dec"]), flat(opt_state.m["W_dec"]), flat(opt_state.v["W_dec"]))
    enc_p, enc_m, enc_v, *dec = jax.lax.fori_loop(0, n * m // rows, block, arrays)
    dec_p, dec_m, dec_v = (a.reshape(params["W_dec"].shape) for a in dec)
    return (dict(new, W_enc=enc_p, W_dec=dec_p),
            AdamState(step, dict(state.m, W_enc=enc_m, W_dec=dec_m), dict(state.v, W_enc=enc_v, W_dec=dec_v)))
