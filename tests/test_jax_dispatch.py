"""The JAX token dispatch (`backends/jax/dispatch.py`) and the sparse custom VJPs built on it
(`encode.encode_topk`, `encode.grouped_encode`, `decode.decode`), in both modes ("tiles", the
CPU default, and "ragged"), against the standard-ops definitions differentiated by JAX.

Tolerance (float32): the custom backwards sum the same products as autodiff of the dense
definition, in another order (per tile, per k-column), over at most d = 12 or batch = 70
terms: ~1e-6 relative; 1e-5 of the largest entry leaves a 10x margin and is far below a
missing or misrouted contribution (order 1e-1 of an entry)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from switchsae.backends.jax import Backend, decode, dispatch, encode
from switchsae.core.experts import decode_reference, encode_reference
from test_jax_backend import _equations  # tests/ is on sys.path under pytest

MODES = ("tiles", "ragged")
RTOL = 1e-5


def _close(got, ref, what):
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    assert got.shape == ref.shape, what
    np.testing.assert_allclose(got, ref, rtol=0, atol=RTOL * max(1.0, np.abs(ref).max()), err_msg=what)


def test_dispatch_mode_follows_platform_env_and_argument(monkeypatch):
    monkeypatch.delenv(dispatch.ENV, raising=False)
    assert dispatch.choose_mode(None, "tpu") == "ragged"
    assert dispatch.choose_mode(None, "gpu") == "ragged"
    assert dispatch.choose_mode(None, "cpu") == "tiles"
    monkeypatch.setenv(dispatch.ENV, "ragged")
    assert dispatch.choose_mode(None, "cpu") == "ragged"
    assert Backend().dispatch_mode == "ragged"
    assert dispatch.choose_mode("tiles", "tpu") == "tiles"  # the argument wins
    monkeypatch.setenv(dispatch.ENV, "blocks")
    with pytest.raises(ValueError, match=r"\$SWITCHSAE_JAX_DISPATCH must be one of auto, tiles, ragged"):
        Backend()
    with pytest.raises(ValueError, match="dispatch_mode must be one of"):
        Backend(dispatch_mode="dense")


@pytest.mark.parametrize("batch,ids", [
    (300, "balanced"), (300, "one_expert_takes_all"), (70, "empty_and_foreign"), (5, "tiny")])
def test_plan_places_every_token_exactly_once_in_its_own_experts_tiles(batch, ids):
    """No token is dropped however skewed the routing (the tile count is static), a tile
    holds one expert's tokens, in batch order, and only the tiles counted as used hold any."""
    n, rng = 6, np.random.default_rng(batch)
    group = {"balanced": rng.integers(0, n, batch), "one_expert_takes_all": np.full(batch, 4),
             "empty_and_foreign": rng.choice([0, 2, 5, -1, 6, 9], batch),
             "tiny": np.array([3, 3, 0, 5, 3])}[ids]
    plan = dispatch.plan_tiles(jnp.asarray(group), n)
    slot_token, token_slot = np.asarray(plan.slot_token), np.asarray(plan.token_slot)
    tile_group, rows = np.asarray(plan.tile_group), plan.rows
    mine = (group >= 0) & (group < n)
    assert plan.n_tiles == -(-batch // rows) + n
    filled = np.flatnonzero(slot_token < batch)
    assert sorted(slot_token[filled]) == sorted(np.flatnonzero(mine))  # each own token once
    assert np.all(token_slot[mine] < plan.n_tiles * rows) and np.all(token_slot[~mine] == plan.n_tiles * rows)
    assert np.array_equal(slot_token[token_slot[mine]], np.flatnonzero(mine))
    assert np.array_equal(tile_group[filled // rows], group[slot_token[filled]])
    loads = np.bincount(group[mine], minlength=n)
    assert int(plan.n_used) == int(np.sum(-(-loads // rows))) and np.all(filled // rows < int(plan.n_used))
    for e in range(n):  # batch order within an expert
        assert np.all(np.diff(slot_token[filled][tile_group[filled // rows] == e]) > 0)


def _encoder_case(seed=0, batch=70, n=5, d=12, m=9, foreign=False):
    rng = np.random.default_rng(seed)
    ids = rng.choice([0, 2, 3, -1, 7] if foreign else [0, 1, 2, 4], size=batch)  # 3 (or 1, 4) empty
    arrays = (rng.normal(size=(batch, d)), rng.normal(size=(n, d, m)), rng.normal(size=(n, m)))
    return (*(jnp.asarray(a, jnp.float32) for a in arrays), jnp.asarray(ids))


@pytest.mark.parametrize("mode", MODES)
def test_grouped_encode_and_its_gradient_match_the_dense_definition(mode):
    x, W, b, ids = _encoder_case(foreign=True)
    mine = np.asarray((ids >= 0) & (ids < W.shape[0]))
    weight = jnp.asarray(np.random.default_rng(1).normal(size=(x.shape[0], W.shape[2])), jnp.float32) * mine[:, None]

    def loss(fn):
        return lambda x, W, b: jnp.sum(weight * fn(x, W, b))

    got_pre = encode.grouped_encode(x, W, b, ids, mode)
    ref = lambda x, W, b: encode_reference(x, W, b, jnp.clip(ids, 0, W.shape[0] - 1), jnp)
    _close(np.asarray(got_pre)[mine], np.asarray(ref(x, W, b))[mine], "pre-activations")
    assert np.all(np.asarray(got_pre)[~mine] == 0)  # foreign tokens: exact zero rows
    got = jax.grad(loss(lambda *a: encode.grouped_encode(*a, ids, mode)), argnums=(0, 1, 2))(x, W, b)
    want = jax.grad(loss(ref), argnums=(0, 1, 2))(x, W, b)
    for name, g, r in zip(("x", "W_enc", "b_enc"), got, want):
        _close(g, r, f"d{name}")


@pytest.mark.parametrize("variant", ["bias", "no_bias", "bias_auxk"])
@pytest.mark.parametrize("mode", MODES)
def test_encode_topk_sparse_backward_matches_autodiff_of_the_definition(mode, variant):
    """Values, indices (exact) and every gradient of the fused encode + ReLU + TopK, and with
    a dead mask of AuxK's TopK over the dead latents chosen in the same pass."""
    x, W, b, ids = _encoder_case(seed=2)
    b = None if variant == "no_bias" else b
    rng = np.random.default_rng(3)
    b_pre = jnp.asarray(rng.normal(size=x.shape[1]), jnp.float32)
    dead = jnp.asarray(rng.random(W.shape[0] * W.shape[2]) < 0.4).reshape(W.shape[0], W.shape[2]) \
        if variant == "bias_auxk" else None
    k, aux_k = 4, 3
    weights = [jnp.asarray(rng.normal(size=(x.shape[0], j)), jnp.float32) for j in (k, aux_k)]

    def reference(x, b_pre, W, b):
        acts = jnp.maximum(encode_reference(x - b_pre, W, b, ids, jnp), 0.0)
        kept = tuple(jax.lax.top_k(acts, k))
        return kept if dead is None else kept + tuple(jax.lax.top_k(jnp.where(dead[ids], acts, 0.0), aux_k))

    def fused(x, b_pre, W, b):
        acts, *out = encode.encode_topk(x, b_pre, W, b, ids, k, keep_acts=False, mode=mode, dead=dead, aux_k=aux_k)
        assert acts is None
        return tuple(out)

    got, want = fused(x, b_pre, W, b), reference(x, b_pre, W, b)
    assert len(got) == len(want) == (2 if dead is None else 4)
    for j, (g, r) in enumerate(zip(got, want)):
        if j % 2:  # indices: exact where the value is positive (ties at 0 are free for AuxK)
            positive = np.asarray(want[j - 1]) > 0
            np.testing.assert_array_equal(np.asarray(g)[positive], np.asarray(r)[positive])
        else:
            _close(g, r, f"output {j}")
    argnums = (0, 1, 2) if b is None else (0, 1, 2, 3)
    loss = lambda fn: lambda *a: sum(jnp.sum(w * v) for w, v in zip(weights, fn(*a)[0::2]))
    got = jax.grad(loss(fused), argnums=argnums)(x, b_pre, W, b)
    want = jax.grad(loss(reference), argnums=argnums)(x, b_pre, W, b)
    for name, g, r in zip(("x", "b_pre", "W_enc", "b_enc"), got, want):
        _close(g, r, f"d{name}")


@pytest.mark.parametrize("mode", MODES)
def test_decode_and_its_gradient_match_the_gather_definition(mode):
    rng = np.random.default_rng(5)
    batch, k, rows, d = 70, 5, 40, 7
    values = jnp.asarray(rng.normal(size=(batch, k)), jnp.float32)
    indices = jnp.asarray(rng.integers(0, rows, size=(batch, k)))
    table = jnp.asarray(rng.normal(size=(rows, d)), jnp.float32)
    weight = jnp.asarray(rng.normal(size=(batch, d)), jnp.float32)
    ref = lambda v, t: decode_reference(v, indices, t, jnp)
    _close(decode.decode(values, indices, table, mode), ref(values, table), "x_hat")
    got = jax.grad(lambda v, t: jnp.sum(weight * decode.decode(v, indices, t, mode)), argnums=(0, 1))(values, table)
    want = jax.grad(lambda v, t: jnp.sum(weight * ref(v, t)), argnums=(0, 1))(values, table)
    _close(got[0], want[0], "dvalues")
    _close(got[1], want[1], "dtable")


@pytest.mark.parametrize("mode", MODES)
def test_sparse_backward_has_no_dense_pre_activation_gradient(mode):
    """Gradient of a fused encode + TopK + decode loss: with tiles, no (batch, m) array at
    all (the forward works tile by tile too); with ragged, the one forward ragged_dot and no
    transposed one (autodiff of ragged_dot would add two grouped products of (batch, m))."""
    x, W, b, ids = _encoder_case(seed=6, m=20)  # batch 70: tiles of 128 rows
    n, d, m = W.shape
    table = jnp.asarray(np.random.default_rng(7).normal(size=(n * m, d)), jnp.float32)

    def loss(x, W, b, table):
        _, values, indices = encode.encode_topk(x, jnp.zeros(d), W, b, ids, 3, keep_acts=False, mode=mode)
        x_hat = decode.decode(values, indices + ids[:, None] * m, table, mode)
        return jnp.sum((x - x_hat) ** 2)

    jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(1, 2, 3)))(x, W, b, table).jaxpr
    eqns = list(_equations(jaxpr))
    shapes = {tuple(getattr(v.aval, "shape", ())) for e in eqns for v in (*e.invars, *e.outvars) if hasattr(v, "aval")}
    ragged = sum(e.primitive.name == "ragged_dot_general" for e in eqns)
    if mode == "tiles":
        assert (x.shape[0], m) not in shapes and ragged == 0
    else:
        assert ragged == 1

