"""Hand-derived gradients of the Switch SAE loss (the reference the autograd backends match).

Notation as in `core.spec`: G = d loss / d x_hat, r = decode before the bias, g the gate."""

from __future__ import annotations

import numpy as np

from switchsae.core.spec import Trace


def loss_gradients(params: dict, x: np.ndarray, cfg, t: Trace, dead_mask=None) -> dict[str, np.ndarray]:
    """Gradients of `t.out.losses["total"]` w.r.t. every parameter.  x: (batch, d);
    dead_mask: (M,) bool, the one the trace was made with."""
    batch, d = x.shape
    n, m = cfg.n_experts, cfg.expert_width
    out = t.out
    expert = out.expert
    W_dec_flat = params["W_dec"].reshape(n * m, d)
    grads = {name: np.zeros_like(p) for name, p in params.items()}
    grad_W_dec = grads["W_dec"].reshape(n * m, d)  # a view: writes land in grads["W_dec"]

    # reconstruction: x_hat = sum_j top_values_j W_dec[idx_j] + b_pre
    G = (2.0 / batch) * (out.x_hat - x)
    grads["b_pre"] += G.sum(axis=0)
    grad_values = _decode_backward(G, out.top_values, out.top_indices, W_dec_flat, grad_W_dec)
    grad_acts = np.zeros_like(t.pre)
    grad_gate = np.sum(grad_values * t.kept, axis=-1)
    np.put_along_axis(grad_acts, t.local_indices, grad_values * t.gate[:, None], axis=-1)

    if t.aux_recon is not None:  # AuxK: residual is detached, only aux_recon carries gradient
        scale = min(float(t.n_dead) / cfg.aux_k, 1.0)
        tv = np.sum((x - x.mean(axis=0)) ** 2)
        G_aux = cfg.auxk_coef * scale * 2.0 * (t.aux_recon - (x - out.x_hat)) / tv
        aux_values = t.gate[:, None] * t.aux_kept
        aux_idx = t.aux_local_indices + (expert * m)[:, None]
        grad_aux_values = _decode_backward(G_aux, aux_values, aux_idx, W_dec_flat, grad_W_dec)
        grad_gate += np.sum(grad_aux_values * t.aux_kept, axis=-1)
        aux_grad_acts = np.zeros_like(t.pre)
        np.put_along_axis(aux_grad_acts, t.aux_local_indices, grad_aux_values * t.gate[:, None], axis=-1)
        grad_acts += aux_grad_acts * dead_mask.reshape(n, m)[expert]  # live latents entered as 0

    # relu and the expert encoder
    grad_pre = grad_acts * (t.pre > 0)
    grad_x_centered = np.zeros_like(x)
    for e in range(n):
        rows = expert == e
        if not rows.any():
            continue
        grads["W_enc"][e] = t.x_centered[rows].T @ grad_pre[rows]
        grad_x_centered[rows] = grad_pre[rows] @ params["W_enc"][e].T
        if "b_enc" in grads:
            grads["b_enc"][e] = grad_pre[rows].sum(axis=0)
    grads["b_pre"] -= grad_x_centered.sum(axis=0)

    # router: through the soft gate p[e] and through P_i in the balancing loss
    probs = out.router_probs
    grad_probs = np.zeros_like(probs)
    if cfg.router_scale == "soft":
        grad_probs[np.arange(batch), expert] = grad_gate
    f = np.bincount(expert, minlength=n) / batch
    grad_probs += cfg.lb_weight * n * f[None, :] / batch
    grad_logits = probs * (grad_probs - np.sum(grad_probs * probs, axis=-1, keepdims=True))
    grads["W_router"] = grad_logits.T @ (x - params["b_router"])
    grads["b_router"] = -(grad_logits @ params["W_router"]).sum(axis=0)
    return grads


def _decode_backward(G, values, indices, W_dec_flat, grad_W_dec_flat):
    """Backward of r = sum_j values_j W_dec_flat[idx_j]: accumulates into grad_W_dec_flat
    (duplicate rows add up) and returns d/d values.  G: (batch, d); values, indices: (batch, k)."""
    batch, k = values.shape
    np.add.at(grad_W_dec_flat, indices.reshape(-1), (values[:, :, None] * G[:, None, :]).reshape(batch * k, -1))
    return np.einsum("bd,bkd->bk", G, W_dec_flat[indices])
