"""One optimisation step of a Switch SAE, shared by every backend (backends may jit it)."""

from __future__ import annotations

from .constraints import DECODERS, normalize_decoder, remove_parallel_grad
from .optim import adam_update, clip_by_global_norm


def apply_update(xp, params: dict, grads: dict, opt_state, lr, max_grad_norm: float | None = 1.0,
                 betas=(0.9, 0.999)):
    """clip the global gradient norm -> drop the gradient parallel to decoder rows -> Adam ->
    renormalise decoder rows.  -> (params, opt_state).  `Backend.update` defaults to this."""
    if max_grad_norm is not None:
        grads = clip_by_global_norm(grads, max_grad_norm, xp)
    decoders = [name for name in DECODERS if name in params]
    grads = dict(grads, **{n: remove_parallel_grad(grads[n], params[n], xp) for n in decoders})
    params, opt_state = adam_update(params, grads, opt_state, lr, xp, betas=betas)
    params = dict(params, **{n: normalize_decoder(params[n], xp) for n in decoders})
    return params, opt_state


def train_step(backend, cfg, params: dict, opt_state, x, lr, dead_mask=None,
               max_grad_norm: float | None = 1.0, betas=(0.9, 0.999)):
    """loss and gradients, then the backend's update (`apply_update`, possibly fused and in
    place: use the returned params and state).  x: (batch, d).
    -> (params, opt_state, ForwardOutput).  Same order as the paper's trainer (which
    renormalises before the next forward)."""
    out, grads = backend.loss_and_grads(params, x, cfg, dead_mask)
    params, opt_state = backend.update(params, grads, opt_state, lr, max_grad_norm, betas)
    return params, opt_state, out
