"""Adam (PyTorch's formula) and global-norm gradient clipping, functional so every backend
(eager or jit-compiled) shares one implementation."""

from __future__ import annotations

from typing import NamedTuple

CLIP_EPS = 1e-6  # added to the global norm before dividing, as torch.nn.utils.clip_grad_norm_


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
    b1, b2 = betas
    step = state.step + 1
    c1 = 1.0 - b1**step
    c2 = 1.0 - b2**step
    new_params, new_m, new_v = {}, {}, {}
    for name, p in params.items():
        g = grads[name]
        m = xp.astype(b1 * state.m[name] + (1.0 - b1) * g, state.m[name].dtype)
        v = xp.astype(b2 * state.v[name] + (1.0 - b2) * (g * g), state.v[name].dtype)
        new_params[name] = xp.astype(p - lr * (m / c1) / (xp.sqrt(v / c2) + eps), p.dtype)
        new_m[name], new_v[name] = m, v
    return new_params, AdamState(step, new_m, new_v)


def global_norm(grads: dict, xp):
    return xp.sqrt(sum(xp.sum(g * g) for g in grads.values()))


def clip_by_global_norm(grads: dict, max_norm: float, xp) -> dict:
    """Scale all gradients by min(1, max_norm / ||g||), as torch.nn.utils.clip_grad_norm_."""
    norm = global_norm(grads, xp)
    scale = xp.minimum(max_norm / (norm + CLIP_EPS), xp.ones_like(norm))
    return {name: g * scale for name, g in grads.items()}
