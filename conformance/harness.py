"""Run a conformance case on a backend and bring every result back as NumPy float64,
next to the NumPy float64 reference.  Tolerances per dtype are stated here, once."""

from __future__ import annotations

import functools

import numpy as np

from switchsae.backends import load_backend
from switchsae.core import spec
from switchsae.core.optim import AdamState, adam_init
from switchsae.core.train_step import train_step

# Tolerances against the float64 reference, as (rtol, atol relative to the quantity's max |value|).
# float32: eps 1.2e-7; sums over <= 64 terms in a different order (grouped matmuls, gathers)
#   give ~1e-6 relative error, so 1e-4 leaves a 100x margin.
# bfloat16: eps 7.8e-3 (8-bit mantissa) on inputs, weights and products; errors of a few eps
#   accumulate over d = 16 terms, so 6e-2 relative.
TOLERANCE = {"float64": (1e-9, 1e-9), "float32": (1e-4, 1e-4), "bfloat16": (6e-2, 6e-2)}
# bfloat16 gradients are compared by direction: cosine with the reference >= this.
BF16_GRAD_COSINE = 0.98


def to_np(backend, a) -> np.ndarray:
    return np.asarray(backend.to_numpy(a), dtype=np.float64) if a is not None else None


def native(backend, case, dtype):
    params = {n: backend.asarray(p, dtype) for n, p in case.params.items()}
    x = backend.asarray(case.x, dtype)
    dead = None if case.dead_mask is None else backend.asarray(case.dead_mask)
    bias = None if case.select_bias is None else backend.asarray(case.select_bias, dtype)
    return params, x, dead, bias


def forward(backend_name: str, case, dtype: str) -> dict:
    """Forward outputs of `case` on a backend in `dtype`, as float64 NumPy."""
    backend = load_backend(backend_name)
    cfg = case.cfg.replace(dtype=dtype)
    params, x, dead, bias = native(backend, case, dtype)
    out = spec.forward(params, x, cfg, backend, dead, bias)
    result = {f: to_np(backend, getattr(out, f)) for f in ("x_hat", "router_probs", "top_values")}
    result["expert"] = np.asarray(backend.to_numpy(out.expert)).astype(np.int64)
    result["top_indices"] = np.asarray(backend.to_numpy(out.top_indices)).astype(np.int64)
    result["losses"] = {k: float(to_np(backend, v)) for k, v in out.losses.items()}
    return result


def gradients(backend_name: str, case, dtype: str) -> dict:
    backend = load_backend(backend_name)
    params, x, dead, bias = native(backend, case, dtype)
    _, grads = backend.loss_and_grads(params, x, case.cfg.replace(dtype=dtype), dead, bias)
    return {n: to_np(backend, g) for n, g in grads.items()}


def trajectory(backend_name: str, case, dtype: str, steps: int, lr: float, seed: int = 0,
               optimizer: str = "adam"):
    """`steps` shared train steps, compiled as the backend compiles them for training, on fresh
    batches -> (per-step total loss, final params)."""
    backend = load_backend(backend_name)
    cfg = case.cfg.replace(dtype=dtype)
    params, _, dead, bias = native(backend, case, dtype)
    opt = adam_init(params, backend.xp)
    step = backend.compile_step(functools.partial(train_step, backend, cfg, optimizer=optimizer))
    rng = np.random.default_rng(seed)
    losses = []
    for _ in range(steps):
        batch = case.x + 0.3 * rng.normal(size=case.x.shape)
        params, opt, out = step(params, opt, backend.asarray(batch, dtype), lr, dead, bias)
        losses.append(float(to_np(backend, out.losses["total"])))
    return np.array(losses), {n: to_np(backend, p) for n, p in params.items()}


def warm_step(backend_name: str, case, dtype: str, lr: float, optimizer: str, start: int = 5, seed: int = 0):
    """One compiled train step on case.x from an Adam state that has run `start` steps: moments
    m ~ N(0, 1e-2) and v ~ U(0, 1e-4) for every parameter (the same on every backend).
    -> (before, after): each (params, m, v) as float64 NumPy."""
    backend = load_backend(backend_name)
    cfg = case.cfg.replace(dtype=dtype)
    params, x, dead, bias = native(backend, case, dtype)
    rng = np.random.default_rng(seed)
    m = {n: backend.asarray(1e-2 * rng.normal(size=p.shape), dtype) for n, p in case.params.items()}
    v = {n: backend.asarray(1e-4 * rng.random(size=p.shape), dtype) for n, p in case.params.items()}
    before = tuple({n: to_np(backend, a) for n, a in t.items()} for t in (params, m, v))
    step = backend.compile_step(functools.partial(train_step, backend, cfg, optimizer=optimizer))
    params, opt, _ = step(params, AdamState(start, m, v), x, lr, dead, bias)
    return before, tuple({n: to_np(backend, a) for n, a in t.items()} for t in (params, opt.m, opt.v))


def assert_close(actual, expected, dtype: str, what: str, scale: float | None = None):
    """|actual - expected| <= atol * scale + rtol * |expected|, scale = max |expected|."""
    rtol, atol = TOLERANCE[dtype]
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != reference {expected.shape}"
    scale = float(np.max(np.abs(expected))) if scale is None else scale
    err = np.abs(actual - expected)
    bound = atol * max(scale, 1e-12) + rtol * np.abs(expected)
    worst = np.unravel_index(np.argmax(err - bound), err.shape) if err.size else ()
    assert np.all(err <= bound), (
        f"{what} ({dtype}): max error {err.max():.3e} at {worst} exceeds tolerance "
        f"(rtol {rtol}, atol {atol} x scale {scale:.3e})"
    )


def cosine(a, b) -> float:
    a, b = np.ravel(a), np.ravel(b)
    denom = np.linalg.norm(a) * np.linalg.norm(b)
    return 1.0 if denom == 0 else float(a @ b / denom)
