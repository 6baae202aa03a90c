"""Shared training math: Adam and clipping equal PyTorch's; the decoder constraint; dead-latent
counters; the geometric median."""

import numpy as np
import torch

from switchsae.backends import load_backend
from switchsae.core.constraints import normalize_decoder, remove_parallel_grad
from switchsae.core.dead_latents import dead_mask, update_tokens_since_fired
from switchsae.core.init import geometric_median
from switchsae.core.optim import adam_init, adam_update, clip_by_global_norm, lazy_adam_update

xp = load_backend("numpy").xp


def test_adam_equals_torch_adam():
    rng = np.random.default_rng(0)
    p0 = {"a": rng.normal(size=(3, 4)), "b": rng.normal(size=5)}
    grads = [{k: rng.normal(size=v.shape) for k, v in p0.items()} for _ in range(5)]
    tp = {k: torch.tensor(v, requires_grad=True) for k, v in p0.items()}
    opt = torch.optim.Adam(list(tp.values()), lr=1e-2, betas=(0.9, 0.999), eps=1e-8)
    params, state = dict(p0), adam_init(p0, xp)
    for g in grads:
        for k, t in tp.items():
            t.grad = torch.tensor(g[k])
        opt.step()
        params, state = adam_update(params, g, state, 1e-2, xp)
    for k in p0:
        np.testing.assert_allclose(params[k], tp[k].detach().numpy(), rtol=1e-12, atol=1e-14)


def test_lazy_adam_equals_torch_sparse_adam():
    """Lazy Adam's rows and step counter are torch.optim.SparseAdam's: rows without gradient keep
    their values and moments, an updated row uses the global step's bias correction.  W_dec's 6
    latent rows get gradient on changing subsets (row 5 never); b_pre is dense.  eps 1e-12: the
    two place eps differently (inside vs outside the bias correction of sqrt(v)), which is then
    far below the 1e-9 tolerance."""
    rng = np.random.default_rng(3)
    p0 = {"W_dec": rng.normal(size=(2, 3, 4)), "b_pre": rng.normal(size=4)}
    row_sets = [[0, 1, 2, 3, 4], [1, 3], [0, 4], [3]]
    sparse_param = torch.tensor(p0["W_dec"].reshape(6, 4), requires_grad=True)
    dense_param = torch.tensor(p0["b_pre"], requires_grad=True)
    sparse_opt = torch.optim.SparseAdam([sparse_param], lr=1e-2, eps=1e-12)
    dense_opt = torch.optim.Adam([dense_param], lr=1e-2, eps=1e-12)
    params, state = dict(p0), adam_init(p0, xp)
    for rows in row_sets:
        g_rows = rng.normal(size=(len(rows), 4))
        g_b = rng.normal(size=4)
        sparse_param.grad = torch.sparse_coo_tensor([rows], torch.tensor(g_rows), (6, 4), check_invariants=True)
        dense_param.grad = torch.tensor(g_b)
        sparse_opt.step()
        dense_opt.step()
        g_dec = np.zeros((6, 4))
        g_dec[rows] = g_rows
        before = params["W_dec"].copy()
        params, state = lazy_adam_update(params, {"W_dec": g_dec.reshape(2, 3, 4), "b_pre": g_b}, state,
                                         1e-2, xp, eps=1e-12)
        skipped = np.setdiff1d(np.arange(6), rows)
        assert np.array_equal(params["W_dec"].reshape(6, 4)[skipped], before.reshape(6, 4)[skipped])
    assert state.step == len(row_sets)
    np.testing.assert_allclose(params["W_dec"].reshape(6, 4), sparse_param.detach().numpy(), rtol=1e-9)
    np.testing.assert_allclose(params["b_pre"], dense_param.detach().numpy(), rtol=1e-9)
    assert np.array_equal(params["W_dec"].reshape(6, 4)[5], p0["W_dec"].reshape(6, 4)[5])


def test_clip_equals_torch_clip_grad_norm():
    rng = np.random.default_rng(1)
    g = {"a": 3 * rng.normal(size=(4, 4)), "b": rng.normal(size=3)}
    t = [torch.zeros(v.shape, dtype=torch.float64, requires_grad=True) for v in g.values()]
    for ti, v in zip(t, g.values()):
        ti.grad = torch.tensor(v)
    torch.nn.utils.clip_grad_norm_(t, 1.0)
    clipped = clip_by_global_norm(g, 1.0, xp)
    for ti, k in zip(t, g):
        np.testing.assert_allclose(clipped[k], ti.grad.numpy(), rtol=1e-12)


def test_decoder_constraint():
    rng = np.random.default_rng(2)
    W = normalize_decoder(rng.normal(size=(2, 5, 3)) * 4, xp)
    np.testing.assert_allclose(np.linalg.norm(W, axis=-1), 1.0, rtol=1e-6)
    g = remove_parallel_grad(rng.normal(size=W.shape), W, xp)
    # W is unit-norm only up to the 1.2e-7 guard in the denominator, so g . W is ~1e-7, not 0
    np.testing.assert_allclose(np.sum(g * W, -1), 0.0, atol=1e-6)


def test_dead_latent_counter():
    backend = load_backend("numpy")
    counter = np.array([0, 5, 5, 9])
    idx = np.array([[1, 3], [1, 0]])
    vals = np.array([[1.0, 0.0], [2.0, 0.0]])  # latent 3 and 0 "selected" with value 0: not fired
    new = update_tokens_since_fired(counter, idx, vals, backend)
    np.testing.assert_array_equal(new, [2, 0, 7, 11])
    np.testing.assert_array_equal(dead_mask(new, 7), [False, False, True, True])


def test_geometric_median_resists_outliers():
    pts = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [100.0, 100.0]])
    med = geometric_median(pts, xp)
    cost = lambda p: np.linalg.norm(pts - p, axis=-1).sum()  # noqa: E731
    deltas = np.random.default_rng(0).normal(size=(50, 2)) * 1e-2
    assert all(cost(med) <= cost(med + dl) + 1e-9 for dl in deltas), "not a minimum of summed distance"
    assert np.all(med < 1.0)   # the mean, (20.4, 20.4), is dragged off by the outlier
    sym = np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
    np.testing.assert_allclose(geometric_median(sym, xp), 0.0, atol=1e-6)
