"""Initialisation as in the paper's code, and the data-dependent bias initialisation.

Random draws come from NumPy's seeded generator, so a seed gives the same model on every
backend; the arrays are then handed to the backend."""

from __future__ import annotations

import numpy as np


def init_params(cfg, seed: int = 0) -> dict[str, np.ndarray]:
    """Name -> float64 NumPy array.  W_enc and W_router ~ U(-1/sqrt(d), 1/sqrt(d)) (PyTorch's
    nn.Linear default); W_dec[e] = W_enc[e].T with unit-norm rows; biases zero."""
    rng = np.random.default_rng(seed)
    d, n, m = cfg.d_in, cfg.n_experts, cfg.expert_width
    bound = 1.0 / np.sqrt(d)
    W_enc = rng.uniform(-bound, bound, size=(n, d, m))
    W_router = rng.uniform(-bound, bound, size=(n, d))
    W_dec = np.swapaxes(W_enc, 1, 2).copy()
    W_dec /= np.linalg.norm(W_dec, axis=-1, keepdims=True) + np.finfo(np.float32).eps
    params = {
        "b_pre": np.zeros(d),
        "b_router": np.zeros(d),
        "W_router": W_router,
        "W_enc": W_enc,
        "W_dec": W_dec,
    }
    if cfg.encoder_bias:
        params["b_enc"] = np.zeros((n, m))
    if cfg.shared_latents:  # drawn after the routed experts, which keep their numbers
        W_enc_shared = rng.uniform(-bound, bound, size=(d, cfg.shared_latents))
        W_dec_shared = W_enc_shared.T.copy()
        W_dec_shared /= np.linalg.norm(W_dec_shared, axis=-1, keepdims=True) + np.finfo(np.float32).eps
        params["W_enc_shared"], params["W_dec_shared"] = W_enc_shared, W_dec_shared
        if cfg.encoder_bias:
            params["b_enc_shared"] = np.zeros(cfg.shared_latents)
    return params


def geometric_median(points, xp, max_iter: int = 100, tol: float = 1e-5):
    """Weiszfeld's algorithm.  points: (n, d) -> (d,), the point minimising the summed distance."""
    guess = xp.mean(points, axis=0)
    for _ in range(max_iter):
        dist = xp.sqrt(xp.sum((points - guess) ** 2, axis=-1))
        weights = 1.0 / xp.maximum(dist, xp.full_like(dist, 1e-12))
        weights = weights / xp.sum(weights)
        new = xp.sum(weights[:, None] * points, axis=0)
        moved = float(xp.sqrt(xp.sum((new - guess) ** 2)))
        guess = new
        if moved < tol:
            break
    return guess
