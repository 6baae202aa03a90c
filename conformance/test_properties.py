"""Invariants every backend keeps, on random configs and inputs (hypothesis)."""

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from switchsae.core.config import SwitchSAEConfig
from switchsae.core.init import init_params
from switchsae.core.spec import forward

from . import harness as H


@st.composite
def models(draw):
    n = draw(st.sampled_from([1, 2, 3, 4]))
    m = draw(st.integers(2, 12))
    k = draw(st.integers(1, m))
    d = draw(st.integers(2, 10))
    batch = draw(st.integers(1, 20))
    seed = draw(st.integers(0, 2**16))
    cfg = SwitchSAEConfig(d_in=d, n_latents=n * m, n_experts=n, k=k, lb_coef=1.0)
    rng = np.random.default_rng(seed)
    params = init_params(cfg, seed)
    params["W_router"] *= 3.0
    return cfg, params, rng.normal(size=(batch, d)), rng


def _run(backend, cfg, params, x):
    native = {n: backend.asarray(p, "float32") for n, p in params.items()}
    out = forward(native, backend.asarray(x, "float32"), cfg, backend)
    return {f: H.to_np(backend, getattr(out, f)) for f in ("x_hat", "router_probs", "top_values")} | {
        "expert": np.asarray(backend.to_numpy(out.expert)).astype(int),
        "top_indices": np.asarray(backend.to_numpy(out.top_indices)).astype(int),
    }


# the backend fixture is stateless, so sharing it across examples is safe
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(models())
def test_one_expert_and_at_most_k_nonzeros_per_token(backend, model):
    cfg, params, x, _ = model
    out = _run(backend, cfg, params, x)
    m = cfg.expert_width
    assert out["expert"].shape == (x.shape[0],)
    assert np.all((out["expert"] >= 0) & (out["expert"] < cfg.n_experts))
    assert out["top_indices"].shape == (x.shape[0], cfg.k)
    assert np.all(out["top_indices"] // m == out["expert"][:, None]), "latents outside the chosen expert"
    assert all(len(set(row)) == cfg.k for row in out["top_indices"]), "a latent selected twice"
    assert np.all(out["top_values"] >= 0) and np.all(np.count_nonzero(out["top_values"], -1) <= cfg.k)
    np.testing.assert_allclose(out["router_probs"].sum(-1), 1.0, rtol=1e-5)


# the backend fixture is stateless, so sharing it across examples is safe
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(models())
def test_permuting_experts_permutes_nothing_else(backend, model):
    cfg, params, x, rng = model
    perm = rng.permutation(cfg.n_experts)            # new expert j = old expert perm[j]
    permuted = dict(params, W_router=params["W_router"][perm], W_enc=params["W_enc"][perm],
                    W_dec=params["W_dec"][perm])
    a, b = _run(backend, cfg, params, x), _run(backend, cfg, permuted, x)
    probs = a["router_probs"]
    top2 = np.sort(probs, -1)[:, -2:]
    clear = (top2[:, -1] - top2[:, 0]) > 1e-4 if cfg.n_experts > 1 else np.ones(len(x), bool)
    np.testing.assert_allclose(b["router_probs"], probs[:, perm], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(perm[b["expert"][clear]], a["expert"][clear])
    np.testing.assert_allclose(b["x_hat"][clear], a["x_hat"][clear], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.sort(b["top_values"][clear], -1), np.sort(a["top_values"][clear], -1),
                               rtol=1e-4, atol=1e-6)
