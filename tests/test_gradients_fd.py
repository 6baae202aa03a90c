"""The NumPy reference's hand-derived gradients against central finite differences (float64),
for every parameter and every loss term."""

import numpy as np
import pytest

from switchsae.backends.numpy import Backend as NumpyBackend
from switchsae.core.config import SwitchSAEConfig
from switchsae.core.init import init_params
from switchsae.core.spec import forward


class FrozenResidual(NumpyBackend):
    """AuxK's residual is detached in the spec; finite differences must hold it fixed too."""

    frozen = None

    def stop_gradient(self, a):
        return a if self.frozen is None else self.frozen


CONFIGS = {
    "mse_and_lb": dict(),
    "encoder_bias": dict(encoder_bias=True),
    "hard_router": dict(router_scale="hard"),
    "auxk": dict(auxk_coef=0.5, k_aux=3),
    "mse_only": dict(lb_coef=0.0),
    "single_expert": dict(n_experts=1, n_latents=8),
    "two_experts_per_token": dict(experts_per_token=2, k=5),
    "shared_expert": dict(shared_latents=6, shared_k=2, k=4, encoder_bias=True),
    "all_variants_auxk": dict(experts_per_token=2, shared_latents=5, shared_k=1, k=4,
                              auxk_coef=0.5, k_aux=4, router_scale="soft"),
    "hard_two_experts": dict(experts_per_token=2, router_scale="hard"),
}


def numeric_grad(fn, p, h=1e-6):
    grad = np.zeros_like(p)
    flat, gflat = p.reshape(-1), grad.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + h
        plus = fn()
        flat[i] = old - h
        minus = fn()
        flat[i] = old
        gflat[i] = (plus - minus) / (2 * h)
    return grad


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_hand_gradients_match_finite_differences(name):
    kw = {"n_latents": 24, "n_experts": 3, "k": 3, "lb_coef": 2.0, **CONFIGS[name]}
    cfg = SwitchSAEConfig(d_in=6, dtype="float64", **kw)
    rng = np.random.default_rng(1)
    params = {n: v + 0.1 * rng.normal(size=v.shape) for n, v in init_params(cfg, 0).items()}
    x = rng.normal(size=(10, 6))
    dead = rng.random(cfg.total_latents) < 0.5 if cfg.auxk_coef else None
    backend = FrozenResidual()
    out, grads = backend.loss_and_grads(params, x, cfg, dead)
    if cfg.auxk_coef:
        assert float(out.losses["auxk"]) > 0, "AuxK term inactive: the case tests nothing"
    backend.frozen = x - out.x_hat
    total = lambda: float(forward(params, x, cfg, backend, dead).losses["total"])  # noqa: E731
    for pname, p in params.items():
        num = numeric_grad(total, p)
        # central differences in float64 with h = 1e-6: truncation O(h^2) and rounding
        # O(eps/h) ~ 1e-10, so 1e-6 relative to the largest entry leaves a wide margin
        np.testing.assert_allclose(grads[pname], num, rtol=0, atol=1e-6 * max(np.abs(num).max(), 1.0),
                                   err_msg=f"{name}: gradient of {pname}")
