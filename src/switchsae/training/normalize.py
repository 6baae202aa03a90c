"""Activation normalisation: train on s * x, ship a model for raw x.

SAELens-style ("expected_average_only_in"): s makes the mean squared norm of the training
activations ~d_in, so the learning rate and the load-balancing weight (paper: 3 * d_in) mean
the same for every model, whatever its activation scale.  Unlike SAELens, s is rounded to a
power of two: then folding s into the weights (`fold_scale`) and back (`unfold_scale`) is
exact in binary floating point, so every checkpoint can hold the *raw-space* model (usable
as is by any reader) and a resumed run still continues bit for bit.  The rounding leaves the
mean squared norm within a factor 2 of d_in, which is all the hyper-parameters need.
"""

from __future__ import annotations

import math

import numpy as np

from switchsae.data import DataError


class ScaleError(DataError):
    """Activations whose scale cannot be estimated (all zero or non-finite)."""


def estimate_scale(batch: np.ndarray) -> float:
    """Power of two s with mean ||s x||^2 closest (in log) to d_in.  batch: (n, d_in)."""
    mean_sq = float(np.mean(np.sum(np.asarray(batch, dtype=np.float64) ** 2, axis=-1)))
    if not math.isfinite(mean_sq) or mean_sq <= 0:
        raise ScaleError(f"cannot normalise activations with mean squared norm {mean_sq} (all zero?); "
                         "check the data, or train without normalisation")
    return float(2.0 ** round(0.5 * math.log2(batch.shape[-1] / mean_sq)))


def fold_scale(params: dict, scale: float) -> dict:
    """Parameters trained on s * x -> the same model acting on raw x (NumPy arrays).

    Pre-activations scale by 1/s (so TopK picks the same latents with values / s), router
    logits stay the same, and x_hat comes out / s; the decoder rows keep their unit norm."""
    return _rescale(params, scale)


def unfold_scale(params: dict, scale: float) -> dict:
    """Inverse of `fold_scale`: the raw-space model -> parameters acting on s * x."""
    return _rescale(params, 1.0 / scale)


def _rescale(params: dict, scale: float) -> dict:
    if scale == 1.0:
        return dict(params)
    out = dict(params)
    for name in ("b_pre", "b_router", "b_enc"):
        if name in out:
            out[name] = params[name] / scale
    out["W_router"] = params["W_router"] * scale
    return out
