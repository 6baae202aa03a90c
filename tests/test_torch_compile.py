"""torch.compile over the torch backend's loss and gradients: the sparse kernels are custom ops
(opaque to the compiler), so tracing works and gives the eager numbers.  Graph breaks remain only
where sizes depend on data (nonzero in the encoder backward and the TopK tie fix).

Tolerance: the compiled graph may fuse and reorder float32 element-wise work: 1e-5 of scale."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from switchsae.backends import load_backend
from switchsae.core import SwitchSAEConfig, init_params


@pytest.mark.filterwarnings("ignore:Dynamo detected a call to a `functools.lru_cache`")  # array_api_compat's
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_compiled_loss_and_grads_equal_eager():
    be = load_backend("torch")
    cfg = SwitchSAEConfig(d_in=32, n_latents=256, n_experts=8, k=8, encoder_bias=True)
    params = {n: be.asarray(p, "float32") for n, p in init_params(cfg, 0).items()}
    x = be.asarray(np.random.default_rng(0).normal(size=(64, 32)), "float32")
    torch._dynamo.reset()
    compiled = torch.compile(lambda p, x: be.loss_and_grads(p, x, cfg))
    out_c, grads_c = compiled(params, x)
    out_e, grads_e = be.loss_and_grads(params, x, cfg)
    assert torch.equal(out_c.top_indices, out_e.top_indices)
    for name, g in grads_e.items():
        scale = g.abs().max().item()
        assert (grads_c[name] - g).abs().max().item() <= 1e-5 * scale, f"grad {name}"
    assert abs(out_c.losses["total"].item() - out_e.losses["total"].item()) <= 1e-5 * out_e.losses["total"].item()
