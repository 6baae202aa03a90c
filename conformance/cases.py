"""Conformance cases: configs, weights and inputs with known properties (edge cases included).

Every case is built in float64 NumPy, so each backend starts from identical numbers."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from switchsae.core.config import SwitchSAEConfig
from switchsae.core.init import init_params


@dataclass
class Case:
    name: str
    cfg: SwitchSAEConfig
    params: dict
    x: np.ndarray
    dead_mask: np.ndarray | None = None
    select_bias: np.ndarray | None = None  # (N, m), the main TopK's selection bias


def _base(name, seed=0, batch=48, d=16, **cfg_kw):
    cfg_kw = {"n_latents": 64, "n_experts": 4, "k": 4, "lb_coef": 0.5, **cfg_kw}
    cfg = SwitchSAEConfig(d_in=d, dtype="float64", **cfg_kw)
    rng = np.random.default_rng(seed)
    params = init_params(cfg, seed)
    params["W_router"] *= 4.0  # decisive routing: top-2 probabilities well apart
    params["b_pre"] = 0.1 * rng.normal(size=d)
    params["b_router"] = 0.1 * rng.normal(size=d)
    if cfg.encoder_bias:
        params["b_enc"] = 0.05 * rng.normal(size=params["b_enc"].shape)
    x = rng.normal(size=(batch, d))
    return cfg, params, x, rng


def _direction(d, rng):
    u = rng.normal(size=d)
    return u / np.linalg.norm(u)


def empty_expert() -> Case:
    """Expert 3 scores below expert 0 on every token, so it receives none."""
    cfg, params, x, rng = _base("empty_expert", seed=1)
    u = _direction(cfg.d_in, rng)
    params["b_router"] = np.zeros(cfg.d_in)
    x = x + u * (1.0 - np.minimum(x @ u, 0.0))[:, None]   # x . u >= 1 for every token
    params["W_router"][3] = params["W_router"][0] - 0.5 * u
    return Case("empty_expert", cfg, params, x)


def one_expert() -> Case:
    """Every token goes to expert 0."""
    cfg, params, x, rng = _base("one_expert", seed=2)
    u = _direction(cfg.d_in, rng)
    params["b_router"] = np.zeros(cfg.d_in)
    x = x + u * (1.0 - np.minimum(x @ u, 0.0))[:, None]
    params["W_router"] *= 0.01
    params["W_router"][0] = 20.0 * u
    return Case("one_expert", cfg, params, x)


def ties() -> Case:
    """Latents 2j and 2j+1 of every expert are identical (encoder columns and decoder rows),
    so TopK meets exact ties; any valid tie-break gives the same x_hat."""
    cfg, params, x, _ = _base("ties", seed=3, n_latents=32, n_experts=2, k=5)
    params["W_enc"][:, :, 1::2] = params["W_enc"][:, :, 0::2]
    params["W_dec"][:, 1::2, :] = params["W_dec"][:, 0::2, :]
    return Case("ties", cfg, params, x)


def auxk() -> Case:
    cfg, params, x, rng = _base("auxk", seed=4, auxk_coef=0.5, k_aux=6)
    return Case("auxk", cfg, params, x, dead_mask=rng.random(cfg.total_latents) < 0.4)


def all_variants() -> Case:
    """Two experts per token, a shared expert and AuxK at once."""
    cfg, params, x, rng = _base("all_variants", seed=6, experts_per_token=2, shared_latents=8,
                                shared_k=2, k=6, auxk_coef=0.5, k_aux=5)
    return Case("all_variants", cfg, params, x, dead_mask=rng.random(cfg.total_latents) < 0.4)


def _selection_bias(cfg, rng):
    """Half the latents biased by up to about the k-th act (acts here are ~0.1-0.5), the rest 0."""
    shape = (cfg.n_experts, cfg.expert_width)
    return np.where(rng.random(shape) < 0.5, 0.4 * rng.random(shape), 0.0)


def selection_bias() -> Case:
    """The main TopK chosen with a selection bias (`core.selection_bias`)."""
    cfg, params, x, rng = _base("selection_bias", seed=7, encoder_bias=True)
    return Case("selection_bias", cfg, params, x, select_bias=_selection_bias(cfg, rng))


def selection_bias_auxk() -> Case:
    """The selection bias with AuxK on (the fused encode chooses both) and the hard router."""
    cfg, params, x, rng = _base("selection_bias_auxk", seed=9, auxk_coef=0.5, k_aux=6, router_scale="hard")
    return Case("selection_bias_auxk", cfg, params, x, dead_mask=rng.random(cfg.total_latents) < 0.4,
                select_bias=_selection_bias(cfg, rng))


def build(name: str) -> Case:
    simple = {
        "base": {},
        "k_equals_m": {"n_latents": 32, "k": 8},
        "single_expert": {"n_experts": 1, "n_latents": 24, "k": 5},
        "encoder_bias": {"encoder_bias": True},
        "hard_router": {"router_scale": "hard"},
        "shared_expert": {"shared_latents": 12, "shared_k": 2, "k": 5, "encoder_bias": True},
        "two_experts_per_token": {"experts_per_token": 2, "k": 6},
    }
    if name in simple:
        cfg, params, x, _ = _base(name, seed=5 + len(name), **simple[name])
        return Case(name, cfg, params, x)
    named = {"empty_expert": empty_expert, "one_expert": one_expert, "ties": ties, "auxk": auxk,
             "all_variants": all_variants, "selection_bias": selection_bias,
             "selection_bias_auxk": selection_bias_auxk}
    return named[name]()


CASE_NAMES = [
    "base", "k_equals_m", "single_expert", "encoder_bias", "hard_router",
    "empty_expert", "one_expert", "ties", "auxk",
    "shared_expert", "two_experts_per_token", "all_variants", "selection_bias", "selection_bias_auxk",
]
