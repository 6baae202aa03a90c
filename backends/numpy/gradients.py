"""Hand-derived gradients of the Switch SAE loss (the reference the autograd backends match).

Notation as in `core.spec`: G = d loss / d x_hat; candidates c = gate_j * relu(pre_j) over the
e chosen experts (e*m per token); top_values = the kept candidates."""

from __future__ import annotations

import numpy as np

from switchsae.core.spec import Trace


def loss_gradients(params: dict, x: np.ndarray, cfg, t: Trace, dead_mask=None) -> dict[str, np.ndarray]:
    """Gradients of `t.out.losses["total"]` w.r.t. every parameter.  x: (batch, d);
    dead_mask: (total_latents,) bool, the one the trace was made with."""
    batch, d = x.shape
    n, m, e = cfg.n_experts, cfg.expert_width, cfg.experts_per_token
    out, experts, gates = t.out, t.experts, t.gates
    W_dec_flat = params["W_dec"].reshape(n * m, d)
    grads = {name: np.zeros_like(p) for name, p in params.items()}
    grad_W_dec = grads["W_dec"].reshape(n * m, d)  # a view: writes land in grads["W_dec"]
    acts = t.acts                                  # (batch, e*m)
    slot_of = np.repeat(np.arange(e), m)           # candidate position -> slot
    routed = slice(0, cfg.routed_k)

    # reconstruction: x_hat = sum top_values * W_dec[ids] (+ shared decode) + b_pre
    G = (2.0 / batch) * (out.x_hat - x)
    grads["b_pre"] += G.sum(axis=0)
    grad_values = _decode_backward(G, out.top_values[:, routed], out.top_indices[:, routed],
                                   W_dec_flat, grad_W_dec)
    grad_cand = np.zeros_like(acts)
    np.put_along_axis(grad_cand, t.cand_indices, grad_values, axis=-1)

    if t.aux_recon is not None:  # AuxK: residual is detached, only aux_recon carries gradient
        scale = min(float(t.n_dead) / cfg.aux_k, 1.0)
        tv = np.sum((x - x.mean(axis=0)) ** 2)
        G_aux = cfg.auxk_coef * scale * 2.0 * (t.aux_recon - (x - out.x_hat)) / tv
        dead_cand = np.concatenate([dead_mask[: cfg.n_latents].reshape(n, m)[experts[:, j]]
                                    for j in range(e)], axis=-1)
        aux_ids = np.take_along_axis(experts, t.aux_cand_indices // m, -1) * m + t.aux_cand_indices % m
        aux_values = np.take_along_axis(acts * gates[:, slot_of] * dead_cand, t.aux_cand_indices, -1)
        grad_aux = _decode_backward(G_aux, aux_values, aux_ids, W_dec_flat, grad_W_dec)
        aux_grad_cand = np.zeros_like(acts)
        np.put_along_axis(aux_grad_cand, t.aux_cand_indices, grad_aux, axis=-1)
        grad_cand += aux_grad_cand * dead_cand  # live latents entered AuxK as constant 0

    # candidates = gate_slot * relu(pre): to the gates and through relu to the encoders
    grad_gates = (grad_cand * acts).reshape(batch, e, m).sum(axis=-1)
    grad_pre = grad_cand * gates[:, slot_of] * (acts > 0)
    grad_x_centered = np.zeros_like(x)
    for j in range(e):
        pre_grad_j = grad_pre[:, j * m:(j + 1) * m]
        for i in range(n):
            rows = experts[:, j] == i
            if not rows.any():
                continue
            grads["W_enc"][i] += t.x_centered[rows].T @ pre_grad_j[rows]
            grad_x_centered[rows] += pre_grad_j[rows] @ params["W_enc"][i].T
            if "b_enc" in grads:
                grads["b_enc"][i] += pre_grad_j[rows].sum(axis=0)

    if cfg.shared_latents:
        grad_x_centered += _shared_backward(params, grads, G, out, t, cfg)
    grads["b_pre"] -= grad_x_centered.sum(axis=0)

    # router: through the soft gates p[e_j] and through P_i in the balancing loss
    probs = out.router_probs
    grad_probs = np.zeros_like(probs)
    if cfg.router_scale == "soft":
        np.add.at(grad_probs, (np.arange(batch)[:, None], experts), grad_gates)
    f = np.bincount(experts.reshape(-1), minlength=n) / experts.size
    grad_probs += cfg.lb_weight * n * f[None, :] / batch
    grad_logits = probs * (grad_probs - np.sum(grad_probs * probs, axis=-1, keepdims=True))
    grads["W_router"] = grad_logits.T @ (x - params["b_router"])
    grads["b_router"] = -(grad_logits @ params["W_router"]).sum(axis=0)
    return grads


def _shared_backward(params, grads, G, out, t, cfg):
    """Gradients of the shared expert's own TopK decode; returns its d/d x_centered."""
    shared = slice(cfg.routed_k, cfg.k)
    grad_values = _decode_backward(G, out.top_values[:, shared], t.shared_indices,
                                   params["W_dec_shared"], grads["W_dec_shared"])
    grad_pre = np.zeros_like(t.shared_pre)
    np.put_along_axis(grad_pre, t.shared_indices, grad_values, axis=-1)
    grad_pre *= t.shared_pre > 0
    grads["W_enc_shared"] += t.x_centered.T @ grad_pre
    if "b_enc_shared" in grads:
        grads["b_enc_shared"] += grad_pre.sum(axis=0)
    return grad_pre @ params["W_enc_shared"].T


def _decode_backward(G, values, indices, W_dec_flat, grad_W_dec_flat):
    """Backward of r = sum_j values_j W_dec_flat[idx_j]: accumulates into grad_W_dec_flat
    (duplicate rows add up) and returns d/d values.  G: (batch, d); values, indices: (batch, k)."""
    batch, k = values.shape
    np.add.at(grad_W_dec_flat, indices.reshape(-1), (values[:, :, None] * G[:, None, :]).reshape(batch * k, -1))
    return np.einsum("bd,bkd->bk", G, W_dec_flat[indices])
