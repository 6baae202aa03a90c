"""The Switch SAE forward pass and loss: the specification every backend must reproduce.

For x: (batch, d), with m = M / N latents per expert:
  1. p = softmax((x - b_router) @ W_router.T)           (batch, N); e = argmax(p)
  2. a = relu((x - b_pre) @ W_enc[e] (+ b_enc[e]))       (batch, m); keep the top k
  3. top_values = gate * kept activations, gate = p[e] ("soft") or 1 ("hard")
     x_hat = sum_j top_values[:, j] * W_dec[e, i_j] + b_pre
Loss = mse + lb_coef * N * sum_i f_i P_i (+ auxk_coef * AuxK when a dead mask is given).
"""

from __future__ import annotations

from typing import NamedTuple

from . import losses as L
from .router import choose_experts, gate_values, router_probs


class ForwardOutput(NamedTuple):
    """x_hat: (batch, d); expert: (batch,); router_probs: (batch, N);
    top_values: (batch, k) gated activations; top_indices: (batch, k) global latent ids
    e*m + i; losses: dict of scalars ("mse", "lb", "auxk", "total")."""

    x_hat: object
    expert: object
    router_probs: object
    top_values: object
    top_indices: object
    losses: dict


class Trace(NamedTuple):
    """Every intermediate of the forward pass (for hand-derived gradients and debugging).

    pre: (batch, m) pre-activations of the chosen expert; local_indices: (batch, k) in [0, m);
    kept: (batch, k) ungated activations; aux_* the AuxK counterparts (None when off)."""

    out: ForwardOutput
    x_centered: object
    gate: object
    pre: object
    local_indices: object
    kept: object
    aux_local_indices: object
    aux_kept: object
    aux_recon: object
    n_dead: object


def trace(params: dict, x, cfg, backend, dead_mask=None) -> Trace:
    """Run the spec on `backend`'s arrays, keeping intermediates.  dead_mask: (M,) bool or None."""
    xp = backend.xp
    n, m = cfg.n_experts, cfg.expert_width
    W_dec_flat = xp.reshape(params["W_dec"], (n * m, cfg.d_in))

    probs = router_probs(x, params["b_router"], params["W_router"], xp)
    expert = choose_experts(probs, xp)
    gate = gate_values(probs, expert, cfg.router_scale, xp)

    x_centered = x - params["b_pre"]
    pre = backend.encode(x_centered, params["W_enc"], params.get("b_enc"), expert)
    acts = xp.maximum(pre, xp.zeros_like(pre))
    kept, local_indices = backend.topk(acts, cfg.k)
    offset = xp.astype(expert, local_indices.dtype)[:, None] * m
    top_indices = local_indices + offset
    top_values = gate[:, None] * kept
    x_hat = backend.decode(top_values, top_indices, W_dec_flat) + params["b_pre"]

    mse = L.mse_loss(x, x_hat, xp)
    lb = L.load_balance_loss(probs, expert, xp)
    total = mse + cfg.lb_weight * lb
    aux = _auxk(x, x_hat, acts, gate, expert, offset, W_dec_flat, cfg, backend, dead_mask)
    if aux is None:
        auxk = xp.zeros_like(mse)
        aux = (None, None, None, None)
    else:
        auxk = aux[-1]
        total = total + cfg.auxk_coef * auxk
        aux = aux[:-1]
    out = ForwardOutput(
        x_hat, expert, probs, top_values, top_indices,
        {"mse": mse, "lb": lb, "auxk": auxk, "total": total},
    )
    return Trace(out, x_centered, gate, pre, local_indices, kept, *aux)


def forward(params: dict, x, cfg, backend, dead_mask=None) -> ForwardOutput:
    """The spec's forward pass and losses.  x: (batch, d) native array."""
    return trace(params, x, cfg, backend, dead_mask).out


def _auxk(x, x_hat, acts, gate, expert, offset, W_dec_flat, cfg, backend, dead_mask):
    """AuxK term, or None when off: the top k_aux dead latents of each token's expert
    reconstruct the detached residual x - x_hat (scaled by the gate like the main decode)."""
    if dead_mask is None or cfg.auxk_coef == 0:
        return None
    xp = backend.xp
    dead_local = xp.take(xp.reshape(dead_mask, (cfg.n_experts, cfg.expert_width)), expert, axis=0)
    dead_acts = xp.where(dead_local, acts, xp.zeros_like(acts))
    aux_kept, aux_local = backend.topk(dead_acts, cfg.aux_k)
    aux_recon = backend.decode(gate[:, None] * aux_kept, aux_local + offset, W_dec_flat)
    residual = backend.stop_gradient(x - x_hat)
    n_dead = xp.sum(xp.astype(dead_mask, x.dtype))
    loss = L.auxk_loss(aux_recon, residual, n_dead, float(cfg.aux_k), x, xp)
    return aux_local, aux_kept, aux_recon, n_dead, loss
