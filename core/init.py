"""Initialisation as in the paper's code, and the data-dependent bias initialisation.

Random draws come from NumPy's seeded generator, so a seed gives the same model on every
backend; the arrays are then handed to the backend."""

from __future__ import annotations

import numpy as np


def init_params(cfg, seed: int = 0) -> dict[str, np.ndarray]:
    """Name -> NumPy array in the training dtype (`cfg.dtype`; float32 for bfloat16, which NumPy
    lacks).  W_enc and W_router ~ U(-1/sqrt(d), 1/sqrt(d)) (PyTorch's nn.Linear default);
    W_dec[e] = W_enc[e].T with unit-norm rows; biases zero.  Built expert by expert: each draw
    and normalisation is done in float64 on one (d, m) block and stored rounded, so the whole
    dictionary is never held in float64, and the values are those of drawing it at once."""
    rng = np.random.default_rng(seed)
    d, n, m = cfg.d_in, cfg.n_experts, cfg.expert_width
    dtype = np.dtype("float32" if cfg.dtype == "bfloat16" else cfg.dtype)
    bound = 1.0 / np.sqrt(d)
    W_enc, W_dec = np.empty((n, d, m), dtype), np.empty((n, m, d), dtype)
    for e in range(n):  # the draws of one (n, d, m) array, in the same order
        W_enc[e], W_dec[e] = _tied_pair(rng, bound, d, m)
    params = {
        "b_pre": np.zeros(d, dtype),
        "b_router": np.zeros(d, dtype),
        "W_router": rng.uniform(-bound, bound, size=(n, d)).astype(dtype),
        "W_enc": W_enc,
        "W_dec": W_dec,
    }
    if cfg.encoder_bias:
        params["b_enc"] = np.zeros((n, m), dtype)
    if cfg.shared_latents:  # drawn after the routed experts, which keep their numbers
        W_enc_shared, W_dec_shared = _tied_pair(rng, bound, d, cfg.shared_latents)
        params["W_enc_shared"], params["W_dec_shared"] = W_enc_shared.astype(dtype), W_dec_shared.astype(dtype)
        if cfg.encoder_bias:
            params["b_enc_shared"] = np.zeros(cfg.shared_latents, dtype)
    return params


def _tied_pair(rng, bound: float, d: int, m: int):
    """One encoder block W (d, m) ~ U(-bound, bound) and its decoder W.T with unit-norm rows
    (float64)."""
    W = rng.uniform(-bound, bound, size=(d, m))
    dec = W.T.copy()
    dec /= np.linalg.norm(dec, axis=-1, keepdims=True) + np.finfo(np.float32).eps
    return W, dec


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
