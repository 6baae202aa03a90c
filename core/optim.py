"""Adam (PyTorch's formula), row-sparse ("lazy") Adam and global-norm gradient clipping,
functional so every backend (eager or jit-compiled) shares one implementation.

Lazy Adam (`lazy_adam_update`, as TensorFlow Addons' LazyAdam and torch's SparseAdam) treats the
latent-indexed parameters `LATENT_ROW_PARAMS` row by row: latent j's row is W_enc[e, :, i], W_dec[e, i]
and b_enc[e, i] (j = e*m + i).  A latent *received gradient* this step when any entry of its rows'
gradients is non-zero; with TopK that is a subset of the latents some token kept with a positive
value in the main TopK or AuxK (every other latent's gradient is exactly zero).  Only those rows,
and their Adam moments, are read and written; every other row, with its moments, stays exactly as
it was: momentum does not move it.  The step counter is global: it counts every update, and a
row updated at step t uses the bias corrections 1 - beta^t of that global t, whatever it skipped
(SparseAdam's and LazyAdam's convention; no per-row counter).  Every other parameter (router,
b_pre, the shared expert) is updated densely, as by `adam_update`."""

from __future__ import annotations

from typing import NamedTuple

CLIP_EPS = 1e-6  # added to the global norm before dividing, as torch.nn.utils.clip_grad_norm_
OPTIMIZERS = ("adam", "lazy_adam")
LATENT_ROW_PARAMS = ("W_enc", "W_dec", "b_enc")  # parameters with one row per routed latent


class AdamState(NamedTuple):
    """step: scalar int count of updates; m, v: dicts of first/second moments like params."""

    step: int
    m: dict
    v: dict


def adam_init(params: dict, xp) -> AdamState:
    zeros = {name: xp.zeros_like(p) for name, p in params.items()}
    return AdamState(0, zeros, {name: xp.zeros_like(p) for name, p in params.items()})


def adam_update(params: dict, grads: dict, state: AdamState, lr, xp,
                betas=(0.9, 0.999), eps: float = 1e-8):
    """One Adam step: p -= lr * m_hat / (sqrt(v_hat) + eps).  -> (params, state).
    Results keep each parameter's dtype (an array lr would otherwise promote bfloat16)."""
    step = state.step + 1
    new_params, new_m, new_v = {}, {}, {}
    for name, p in params.items():
        new_params[name], new_m[name], new_v[name] = adam_rows(p, grads[name], state.m[name],
                                                               state.v[name], step, lr, xp, betas, eps)
    return new_params, AdamState(step, new_m, new_v)


def adam_rows(p, g, m, v, step, lr, xp, betas=(0.9, 0.999), eps: float = 1e-8):
    """Adam's update of one array (or some rows of it) at global step `step` (counted from 1).
    -> (p, m, v), each in its input's dtype."""
    m, v = adam_moments(g, m, v, xp, betas)
    return adam_step(p, m, v, step, lr, xp, betas, eps), m, v


def adam_moments(g, m, v, xp, betas=(0.9, 0.999)):
    """The first half of `adam_rows`: the moments after gradient g.  -> (m, v) in their dtypes."""
    b1, b2 = betas
    return xp.astype(b1 * m + (1.0 - b1) * g, m.dtype), xp.astype(b2 * v + (1.0 - b2) * (g * g), v.dtype)


def adam_step(p, m, v, step, lr, xp, betas=(0.9, 0.999), eps: float = 1e-8):
    """The second half of `adam_rows`: p after the step, from the updated moments m, v."""
    b1, b2 = betas
    return adam_step_corrected(p, m, v, 1.0 - b1**step, 1.0 - b2**step, lr, xp, eps)


def adam_step_corrected(p, m, v, c1, c2, lr, xp, eps: float = 1e-8):
    """`adam_step` given its bias corrections c1 = 1 - beta1^step and c2 = 1 - beta2^step (for a
    compiled kernel that takes them as scalars rather than computing powers per element)."""
    return xp.astype(p - lr * (m / c1) / (xp.sqrt(v / c2) + eps), p.dtype)


def latent_rows(name: str, a, xp):
    """A latent-row parameter (or its gradient / moment) as one row per latent: W_enc (N, d, m) ->
    (M, d), W_dec (N, m, d) -> (M, d), b_enc (N, m) -> (M,)."""
    if name == "W_enc":
        n, d, m = a.shape
        return xp.reshape(xp.permute_dims(a, (0, 2, 1)), (n * m, d))
    return xp.reshape(a, (a.shape[0] * a.shape[1], *a.shape[2:]))


def from_latent_rows(name: str, rows, shape, xp):
    """The inverse of `latent_rows`: (M, ...) -> the parameter's `shape`."""
    if name == "W_enc":
        n, d, m = shape
        return xp.permute_dims(xp.reshape(rows, (n, m, d)), (0, 2, 1))
    return xp.reshape(rows, shape)


def received_gradient(grads: dict, xp):
    """(M,) bool: the latents whose W_enc, W_dec or b_enc gradient has a non-zero entry."""
    touched = None
    for name in LATENT_ROW_PARAMS:
        if name in grads:
            rows = latent_rows(name, grads[name], xp)
            nonzero = rows != 0
            if rows.ndim == 2:  # count (not xp.any, which not every namespace has)
                nonzero = xp.sum(xp.astype(nonzero, rows.dtype), axis=-1) > 0
            touched = nonzero if touched is None else touched | nonzero
    return touched


def lazy_adam_update(params: dict, grads: dict, state: AdamState, lr, xp,
                     betas=(0.9, 0.999), eps: float = 1e-8, touched=None):
    """One lazy Adam step (module notes): the latent-row parameters change only at the latents in
    `touched` ((M,) bool; default `received_gradient(grads)`), their moments too; the rest as
    `adam_update`.  This reference computes every row and keeps the touched ones (a mask, so it
    jit-compiles); a backend's fast path reads and writes those rows only.  -> (params, state)."""
    touched = received_gradient(grads, xp) if touched is None else touched
    dense = [name for name in params if name not in LATENT_ROW_PARAMS]
    new_params, new_state = adam_update({n: params[n] for n in dense}, {n: grads[n] for n in dense},
                                        AdamState(state.step, {n: state.m[n] for n in dense},
                                                  {n: state.v[n] for n in dense}), lr, xp, betas, eps)
    new_m, new_v = dict(new_state.m), dict(new_state.v)
    for name in LATENT_ROW_PARAMS:
        if name not in params:
            continue
        old = [params[name], state.m[name], state.v[name]]
        stepped = adam_rows(*old[:1], grads[name], *old[1:], new_state.step, lr, xp, betas, eps)
        keep = touched if name == "b_enc" else touched[:, None]
        rows = [xp.where(keep, latent_rows(name, a, xp), latent_rows(name, b, xp)) for a, b in zip(stepped, old)]
        new_params[name], new_m[name], new_v[name] = (from_latent_rows(name, r, old[0].shape, xp) for r in rows)
    return new_params, AdamState(new_state.step, new_m, new_v)


def global_norm(grads: dict, xp):
    return xp.sqrt(sum(xp.sum(g * g) for g in grads.values()))


def clip_scale(grads: dict, max_norm: float, xp):
    """min(1, max_norm / ||g||) over all gradients (a scalar array), as torch.nn.utils.clip_grad_norm_."""
    norm = global_norm(grads, xp)
    return xp.minimum(max_norm / (norm + CLIP_EPS), xp.ones_like(norm))


def clip_by_global_norm(grads: dict, max_norm: float, xp) -> dict:
    """Scale all gradients by `clip_scale`, as torch.nn.utils.clip_grad_norm_."""
    scale = clip_scale(grads, max_norm, xp)
    return {name: g * scale for name, g in grads.items()}
