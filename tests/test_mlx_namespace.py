"""The Array API adapter over mlx.core (`switchsae.backends.mlx.namespace`).

Every function the spec calls is checked against NumPy's standard behaviour, then the spec's
own reference paths (core.topk / core.experts, via the base `Backend` hooks) are run on the
adapter and must agree with NumPy: the spec runs on MLX unchanged.  Integer and selection
results must be equal; float results use float32 round-off tolerances stated per test."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")

from switchsae.backends import load_backend  # noqa: E402
from switchsae.backends.mlx import namespace as xp  # noqa: E402
from switchsae.core import SwitchSAEConfig, init_params, trace  # noqa: E402
from switchsae.core.backend import Backend  # noqa: E402

CORE = Path(__file__).resolve().parents[1] / "core"


def np_(a):
    return np.array(a)


def test_adapter_supplies_every_name_core_uses():
    used = set()
    for path in CORE.glob("*.py"):
        used |= set(re.findall(r"\bxp\.([A-Za-z_][A-Za-z_0-9]*)", path.read_text()))
    assert used, "found no xp.<name> uses in core/"
    missing = sorted(name for name in used if not hasattr(xp, name))
    assert not missing, f"namespace lacks {missing}"


def test_argsort_descending_stable_matches_numpy():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 4, size=(7, 33)).astype(np.float32)  # many ties
    got = np_(xp.argsort(mx.array(a), axis=-1, descending=True, stable=True))
    np.testing.assert_array_equal(got, np.argsort(-a, axis=-1, kind="stable"))
    got0 = np_(xp.argsort(mx.array(a), axis=0, descending=True))
    np.testing.assert_array_equal(got0, np.argsort(-a, axis=0, kind="stable"))
    np.testing.assert_array_equal(np_(xp.argsort(mx.array(a), axis=-1)),
                                  np.argsort(a, axis=-1, kind="stable"))
    assert xp.argsort(mx.array(a)).dtype == mx.int32


def test_argmax_first_on_ties_and_signed():
    a = np.array([[0.0, 2.0, 2.0], [5.0, 5.0, 5.0], [1.0, 0.0, 3.0]], dtype=np.float32)
    got = xp.argmax(mx.array(a), axis=-1)
    assert got.dtype == mx.int32
    np.testing.assert_array_equal(np_(got), [1, 0, 2])


def test_take_and_take_along_axis():
    a = np.arange(12, dtype=np.float32).reshape(4, 3)
    idx = np.array([3, 0, 3])
    np.testing.assert_array_equal(np_(xp.take(mx.array(a), mx.array(idx), axis=0)), a[idx])
    idx2 = np.array([[2, 0], [1, 1], [0, 2], [2, 2]])
    np.testing.assert_array_equal(np_(xp.take_along_axis(mx.array(a), mx.array(idx2), axis=-1)),
                                  np.take_along_axis(a, idx2, axis=-1))


def test_gather_with_parameter_dependent_indices_is_differentiable():
    # the spec gathers rows of a constant table by the routed expert (argmax of the parameters);
    # the adapter detaches integer indices so mx.grad goes through (the gather VJP refuses them)
    table = mx.array([[1.0, 2.0], [3.0, 4.0]])

    def f(w):
        return xp.sum(xp.take(table, xp.argmax(w, axis=-1), axis=0) * w)

    g = mx.grad(f)(mx.array([[0.0, 1.0], [2.0, 0.0]]))
    np.testing.assert_array_equal(np_(g), [[3.0, 4.0], [1.0, 2.0]])


def test_shapes_and_reductions():
    a = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    m = mx.array(a)
    np.testing.assert_array_equal(np_(xp.permute_dims(m, (1, 0, 2))), np.transpose(a, (1, 0, 2)))
    np.testing.assert_array_equal(np_(xp.matrix_transpose(m)), np.swapaxes(a, -1, -2))
    np.testing.assert_array_equal(np_(xp.reshape(m, (6, -1))), a.reshape(6, -1))
    np.testing.assert_array_equal(np_(xp.mean(m, axis=0, keepdims=True)), a.mean(axis=0, keepdims=True))
    np.testing.assert_array_equal(np_(xp.max(m, axis=-1, keepdims=True)), a.max(axis=-1, keepdims=True))
    np.testing.assert_array_equal(np_(xp.sum(m, axis=-1)), a.sum(axis=-1))


def test_creation_and_casts():
    np.testing.assert_array_equal(np_(xp.arange(5)), np.arange(5))
    assert xp.arange(5).dtype == mx.int32
    np.testing.assert_allclose(np_(xp.arange(0.0, 1.0, 0.25)), [0, 0.25, 0.5, 0.75])
    x = mx.zeros((2, 3), dtype=mx.bfloat16)
    assert xp.ones((3,), dtype=xp.bfloat16, device=x.device).dtype == mx.bfloat16
    assert xp.ones_like(x, dtype=xp.float32).dtype == mx.float32
    assert xp.zeros_like(x).dtype == mx.bfloat16
    full = xp.full_like(mx.zeros((2,), dtype=mx.float32), 1e-12)
    assert full.dtype == mx.float32 and np_(full)[0] == np.float32(1e-12)
    assert xp.astype(mx.array([True, False]), xp.float32).dtype == mx.float32


def test_device_attribute_for_array_api_compat():
    from array_api_compat import device

    assert device(mx.zeros((2,))) == mx.default_device()
    assert xp.arange(3, device=device(mx.zeros(1))).shape == (3,)


class _ReferenceHooks(load_backend("mlx").__class__):
    """The MLX backend with the spec's standard-ops hooks instead of the fast paths."""

    topk = Backend.topk
    encode = Backend.encode
    decode = Backend.decode


def test_spec_reference_hooks_run_unchanged_on_the_adapter():
    # float32 vs the float64 NumPy reference: sums of <= 24 products of O(1) values, so
    # normwise errors ~1e-6; 2e-5 leaves margin and is far below any real formula error.
    cfg = SwitchSAEConfig(d_in=12, n_latents=48, n_experts=4, k=3, auxk_coef=0.5, k_aux=5,
                          encoder_bias=True)
    rng = np.random.default_rng(3)
    params = init_params(cfg, 3)
    params["b_enc"] = rng.normal(scale=0.1, size=params["b_enc"].shape)
    x = rng.normal(size=(24, 12))
    dead = rng.random(48) < 0.5
    ref_backend, ref = load_backend("numpy"), _ReferenceHooks()
    want = trace(params, x, cfg, ref_backend, dead).out
    out, grads = ref.loss_and_grads({k: ref.asarray(v, "float32") for k, v in params.items()},
                                    ref.asarray(x, "float32"), cfg, ref.asarray(dead))
    np.testing.assert_array_equal(np_(out.expert), want.expert)
    np.testing.assert_array_equal(np_(out.top_indices), want.top_indices)
    for name in ("x_hat", "top_values", "router_probs"):
        _close(np_(getattr(out, name)), getattr(want, name), 2e-5)
    for name, value in want.losses.items():
        _close(np_(out.losses[name]), value, 2e-5)
    ref_grads = ref_backend.loss_and_grads(params, x, cfg, dead)[1]
    for name, g in ref_grads.items():
        _close(np_(grads[name]), g, 2e-5)


def _close(actual, expected, rtol):
    """normwise: max |actual - expected| <= rtol * max |expected| (floored at 1e-6)."""
    scale = max(float(np.max(np.abs(expected))), 1e-6)
    err = float(np.max(np.abs(actual - expected)))
    assert err <= rtol * scale, f"max error {err:.3g} > {rtol:g} * {scale:.3g}"
