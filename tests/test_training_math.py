"""Shared training math: Adam and clipping equal PyTorch's; the decoder constraint; dead-latent
counters; the geometric median."""

import numpy as np
import torch

from switchsae.backends import load_backend
from switchsae.core.constraints import normalize_decoder, remove_parallel_grad
from switchsae.core.dead_latents import dead_mask, update_tokens_since_fired
from switchsae.core.init import geometric_median
from switchsae.core.optim import adam_init, adam_update, clip_by_global_norm

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
