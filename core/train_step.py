"""One optimisation step of a Switch SAE, shared by every backend (backends may jit it)."""

from __future__ import annotations

from .constraints import normalize_decoder, remove_parallel_grad
from .optim import adam_update, clip_by_global_norm


def train_step(backend, cfg, params: dict, opt_state, x, lr, dead_mask=None,
               max_grad_norm: float | None = 1.0, betas=(0.9, 0.999)):
    """loss and gradients -> clip global norm -> drop gradient parallel to decoder rows ->
    Adam -> renormalise decoder rows.  x: (batch, d).  -> (params, opt_state, ForwardOutput).

    Same order as the paper's trainer (which renormalises before the next forward)."""
    xp = backend.xp
    out, grads = backend.loss_and_grads(params, x, cfg, dead_mask)
    if max_grad_norm is not None:
        grads = clip_by_global_norm(grads, max_grad_norm, xp)
    grads = dict(grads, W_dec=remove_parallel_grad(grads["W_dec"], params["W_dec"], xp))
    params, opt_state = adam_update(params, grads, opt_state, lr, xp, betas=betas)
    params = dict(params, W_dec=normalize_decoder(params["W_dec"], xp))
    return params, opt_state, out
