"""One optimisation step of a Switch SAE, shared by every backend (backends may jit it)."""

from __future__ import annotations

from .constraints import DECODERS, normalize_decoder, remove_parallel_grad
from .optim import (OPTIMIZERS, adam_update, clip_by_global_norm, from_latent_rows, lazy_adam_update,
                    latent_rows, received_gradient)


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


def apply_lazy_update(xp, params: dict, grads: dict, opt_state, lr, max_grad_norm: float | None = 1.0,
                      betas=(0.9, 0.999)):
    """`apply_update` with lazy Adam (`core.optim` notes): the latents that received gradient
    (`received_gradient` of the raw gradients) are the only rows of W_enc, W_dec, b_enc and their
    moments that change; the clip norm is the exact global norm (the other rows' gradients are
    zero), and only their decoder rows are projected and renormalised; the rest as `apply_update`.
    -> (params, opt_state).  `Backend.lazy_update` defaults to this."""
    touched = received_gradient(grads, xp)
    if max_grad_norm is not None:
        grads = clip_by_global_norm(grads, max_grad_norm, xp)
    decoders = [name for name in DECODERS if name in params]
    grads = dict(grads, **{n: remove_parallel_grad(grads[n], params[n], xp) for n in decoders})
    params, opt_state = lazy_adam_update(params, grads, opt_state, lr, xp, betas=betas, touched=touched)
    renormalised = {n: normalize_decoder(params[n], xp) for n in decoders}
    if "W_dec" in renormalised:  # only the touched rows of the routed decoder
        rows = xp.where(touched[:, None], latent_rows("W_dec", renormalised["W_dec"], xp),
                        latent_rows("W_dec", params["W_dec"], xp))
        renormalised["W_dec"] = from_latent_rows("W_dec", rows, params["W_dec"].shape, xp)
    return dict(params, **renormalised), opt_state


def train_step(backend, cfg, params: dict, opt_state, x, lr, dead_mask=None, select_bias=None,
               max_grad_norm: float | None = 1.0, betas=(0.9, 0.999), optimizer: str = "adam"):
    """loss and gradients, then the backend's update (`apply_update`, possibly fused and in
    place: use the returned params and state).  x: (batch, d); dead_mask: (total_latents,) bool
    or None (AuxK); select_bias: (N, m) or None (`core.selection_bias`).  optimizer: "adam" (dense) or
    "lazy_adam" (row-sparse: `Backend.loss_and_row_grads` and `Backend.lazy_update`).
    -> (params, opt_state, ForwardOutput).  Same order as the paper's trainer (which
    renormalises before the next forward)."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    if optimizer == "lazy_adam":
        out, grads = backend.loss_and_row_grads(params, x, cfg, dead_mask, select_bias)
        params, opt_state = backend.lazy_update(params, grads, opt_state, lr, max_grad_norm, betas)
    else:
        out, grads = backend.loss_and_grads(params, x, cfg, dead_mask, select_bias)
        params, opt_state = backend.update(params, grads, opt_state, lr, max_grad_norm, betas)
    return params, opt_state, out
