"""core.metrics and core.flops on hand-made cases whose answers are known, on NumPy and on
array-api-strict (the metrics are Array API code)."""

import array_api_compat.numpy as xnp
import array_api_strict as xps
import numpy as np
import pytest

from switchsae.core import metrics
from switchsae.core.config import SwitchSAEConfig
from switchsae.core.flops import forward_flops, train_flops

NAMESPACES = [pytest.param(xnp, id="numpy"), pytest.param(xps, id="array-api-strict")]


def _arr(xp, a, dtype="float64"):
    return xp.asarray(np.asarray(a, dtype=dtype))


@pytest.mark.parametrize("xp", NAMESPACES)
def test_reconstruction_and_sparsity_metrics(xp):
    x = _arr(xp, [[1.0, 0.0], [-1.0, 0.0]])           # mean 0, total variance 2
    x_hat = _arr(xp, [[0.5, 0.0], [-1.0, 0.0]])       # squared error 0.25
    assert float(metrics.fvu(x, x_hat, xp)) == pytest.approx(0.125, abs=1e-15)
    assert float(metrics.normalized_mse(x, x_hat, xp)) == pytest.approx(0.125, abs=1e-15)
    top_values = _arr(xp, [[2.0, 0.0, 1.0], [0.0, 0.0, 3.0]])
    assert float(metrics.l0(top_values, xp)) == pytest.approx(1.5)
    load = metrics.expert_load(_arr(xp, [0, 0, 1, 3], "int64"), 4, xp)
    np.testing.assert_allclose(np.asarray(load), [0.5, 0.25, 0.0, 0.25])
    expected = -(0.5 * np.log(0.5) + 2 * 0.25 * np.log(0.25))
    assert float(metrics.load_entropy(load, xp)) == pytest.approx(expected, rel=1e-6)
    assert float(metrics.dead_fraction(_arr(xp, [0, 10, 11, 3]), 10, xp)) == pytest.approx(0.5)


@pytest.mark.parametrize("xp", NAMESPACES)
def test_dense_fraction_counts_latents_above_threshold(xp):
    freq = _arr(xp, [0.0, 0.05, 0.1, 0.11, 0.9])
    assert float(metrics.dense_fraction(freq, xp)) == pytest.approx(0.4)   # 0.11, 0.9 (strict >)
    assert float(metrics.dense_fraction(freq, xp, threshold=0.01)) == pytest.approx(0.8)


def _planted_decoder():
    """(N=3, m=2, d=4), global ids e*2 + i.  Latents 0 (expert 0) and 3 (expert 1) point the
    same way (cos 1, norms differ); 1 (expert 0) and 2 (expert 1) have cos 0.95; 4 and 5 are
    parallel but both in expert 2, and orthogonal to everything else."""
    e = np.eye(4)
    tilt = 0.95 * e[1] + np.sqrt(1 - 0.95**2) * e[2]
    rows = [2 * e[0], e[1], tilt, 3 * e[0], e[3], e[3]]
    return np.stack(rows).reshape(3, 2, 4)


@pytest.mark.parametrize("xp", NAMESPACES)
def test_max_partner_cosine_and_duplication_on_planted_pairs(xp):
    W = _arr(xp, _planted_decoder())
    best = np.asarray(metrics.max_partner_cosine(W, xp))
    # across experts: 0<->3 cos 1; 1<->2 cos 0.95; 4, 5 (expert 2) only see e0, e1, tilt: cos 0
    np.testing.assert_allclose(best, [1.0, 0.95, 0.95, 1.0, 0.0, 0.0], atol=1e-12)
    assert float(metrics.duplication_fraction(W, xp)) == pytest.approx(4 / 6)
    assert float(metrics.duplication_fraction(W, xp, threshold=0.96)) == pytest.approx(2 / 6)
    # any other latent: 4 and 5 now duplicate each other
    any_best = np.asarray(metrics.max_partner_cosine(W, xp, across_experts=False))
    np.testing.assert_allclose(any_best, [1.0, 0.95, 0.95, 1.0, 1.0, 1.0], atol=1e-12)
    assert float(metrics.duplication_fraction(W, xp, across_experts=False)) == pytest.approx(1.0)


@pytest.mark.parametrize("block_elements", [1, 7, 36, 10**6])
def test_blockwise_max_partner_cosine_equals_full_matrix(block_elements):
    rng = np.random.default_rng(0)
    W = rng.normal(size=(4, 6, 5))
    unit = W.reshape(24, 5) / np.linalg.norm(W.reshape(24, 5), axis=-1, keepdims=True)
    sims = unit @ unit.T
    owner = np.arange(24) // 6
    sims[owner[:, None] == owner[None, :]] = -np.inf
    got = metrics.max_partner_cosine(W, xnp, block_elements=block_elements)
    np.testing.assert_allclose(got, sims.max(axis=-1), rtol=0, atol=1e-9)  # the 1e-12 norm guard


def test_single_expert_has_no_cross_expert_duplicates():
    W = np.ones((1, 3, 2))  # three identical rows, but one expert
    assert np.all(metrics.max_partner_cosine(W, xnp) == -np.inf)
    assert float(metrics.duplication_fraction(W, xnp)) == 0.0
    assert float(metrics.duplication_fraction(W, xnp, across_experts=False)) == 1.0


def test_flops_switch_counts():
    cfg = SwitchSAEConfig(d_in=10, n_latents=64, n_experts=4, k=3, auxk_coef=0.0)  # m = 16; AuxK counted below
    fwd = forward_flops(cfg)
    assert fwd == {"router": 80, "encoder": 320, "decoder": 60, "total": 460}
    tr = train_flops(cfg)
    assert tr["total"] == 460 + 4 * 10 * 4 + 4 * 10 * 3 + 4 * 3 * 10     # 6dN + 2dm + 10kd
    assert tr["total"] == 6 * 10 * 4 + 2 * 10 * 16 + 10 * 3 * 10


def test_flops_dense_topk_has_no_router_and_matches_flop_matched_switch():
    dense = SwitchSAEConfig(d_in=384, n_latents=1536, n_experts=1, k=32, auxk_coef=0.0)  # AuxK: next test
    switch = SwitchSAEConfig(d_in=384, n_latents=8 * 1536, n_experts=8, k=32, auxk_coef=0.0)  # same expert width
    assert forward_flops(dense) == {"router": 0, "encoder": 2 * 384 * 1536, "decoder": 2 * 32 * 384,
                                    "total": 2 * 384 * 1536 + 2 * 32 * 384}
    assert forward_flops(switch)["total"] - forward_flops(dense)["total"] == 2 * 384 * 8
    assert train_flops(dense)["total"] == 2 * 384 * 1536 + 10 * 32 * 384
    # at matched total width, the Switch encoder is N times cheaper
    width = SwitchSAEConfig(d_in=384, n_latents=1536, n_experts=8, k=32)
    assert forward_flops(width)["encoder"] * 8 == forward_flops(dense)["encoder"]


def test_flops_variants_shared_expert_multi_expert_and_auxk():
    cfg = SwitchSAEConfig(d_in=8, n_latents=32, n_experts=4, k=4, experts_per_token=2,
                          shared_latents=6, shared_k=1, auxk_coef=0.1, k_aux=3)
    fwd = forward_flops(cfg)
    assert fwd == {"router": 64, "encoder": 2 * 8 * 8 * 2, "shared_encoder": 96, "decoder": 64,
                   "total": 64 + 256 + 96 + 64}
    tr = train_flops(cfg)
    assert tr["auxk"] == 10 * 8 * 3
    assert tr["total"] == fwd["total"] + 4 * 8 * 4 + 4 * 8 * 4 + 4 * 4 * 8 + 240
