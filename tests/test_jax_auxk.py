"""JAX's AuxK over each expert's dead columns (`backends/jax/auxk.py`): the fused encoder with a
dead cap and the dense per-tile decode against the generic sparse path they replace (values,
indices, the loss and every gradient), in both regimes (more dead latents than aux_k, so AuxK's
TopK truncates; fewer, so it keeps them all), with an empty expert and an expert with no dead
latent; the compiled step, which switches to it from its second call, against the NumPy
reference; the cap's buckets; and the jaxpr's structure (AuxK's TopK over cap columns, its decode
as products over (rows, cap) tiles, no (batch, m) or (M, d) dense array of its own)."""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from switchsae.backends import load_backend
from switchsae.backends.jax import auxk, decode, encode
from switchsae.backends.jax import backend as jax_backend
from switchsae.conformance import harness as H
from switchsae.conformance.cases import build
from switchsae.core import SwitchSAEConfig, adam_init, init_params, train_step

JB = load_backend("jax")
NB = load_backend("numpy")


def _problem(n=4, d=16, m=40, batch=300, dead_fraction=0.4, seed=0, dtype=jnp.float32):
    """Random encoder inputs; expert 1 gets no token and expert 2 no dead latent."""
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(batch, d)), dtype)
    W_enc = jnp.asarray(rng.normal(size=(n, d, m)) / np.sqrt(d), dtype)
    b_enc = jnp.asarray(rng.normal(size=(n, m)) * 0.1, dtype)
    b_pre = jnp.asarray(rng.normal(size=(d,)) * 0.1, dtype)
    table = jnp.asarray(rng.normal(size=(n * m, d)) / np.sqrt(d), dtype)
    expert = jnp.asarray(rng.choice([0, 2, 3], size=batch), jnp.int32)
    dead = rng.random((n, m)) < dead_fraction
    dead[2] = False
    target = jnp.asarray(rng.normal(size=(batch, d)), dtype)
    return x, b_pre, W_enc, b_enc, expert, jnp.asarray(dead), table, target


def _loss(dead_cap, k, aux_k, x, b_pre, W_enc, b_enc, expert, dead, table, target):
    """Main decode + AuxK decode of the fused encoder's entries, as the spec composes them."""
    _, values, indices, aux_values, aux_indices = encode.encode_topk(
        x, b_pre, W_enc, b_enc, expert, k, False, "tiles", dead, aux_k, dead_cap)
    m = W_enc.shape[2]
    recon = decode.decode(values, indices + expert[:, None] * m, table, "tiles")
    if dead_cap is None:
        aux = decode.decode(aux_values, aux_indices + expert[:, None] * m, table, "tiles")
    else:
        aux = auxk.decode_dead(aux_values, aux_indices, expert, dead, table, dead_cap)
    loss = jnp.sum((recon - target) ** 2) + jnp.sum((aux - 0.5 * target) ** 2)
    return loss, (values, indices, aux_values, aux_indices)


@pytest.mark.parametrize("aux_k", [5, 30], ids=["truncating", "keeps_all"])
def test_dead_columns_path_equals_the_generic_sparse_path(aux_k):
    """Same loss and gradients as the generic path (float32 sums in another order: 1e-5 of the
    gradient's scale), the same kept entries: main TopK exactly, AuxK's positive values and ids
    exactly as the set the generic TopK keeps (its zero-valued padding may name any latent).
    m 40 with ~16 dead per expert: aux_k 5 truncates, aux_k 30 keeps every dead latent."""
    args = _problem()
    dead = np.asarray(args[5])
    cap = auxk.dead_cap(int(dead.sum(1).max()), dead.shape[1])
    assert cap >= dead.sum(1).max() and (aux_k < dead.sum(1).max()) == (aux_k == 5)
    grad = jax.grad(_loss, argnums=(3, 4, 5, 6, 9), has_aux=True)
    want, want_out = jax.jit(functools.partial(grad, None, 4, aux_k))(*args)
    got, got_out = jax.jit(functools.partial(grad, cap, 4, aux_k))(*args)
    for name, a, b in zip(("x", "b_pre", "W_enc", "b_enc", "table"), got, want):
        b = np.asarray(b)
        np.testing.assert_allclose(np.asarray(a), b, rtol=1e-5, atol=1e-5 * np.abs(b).max(), err_msg=name)
    np.testing.assert_array_equal(np.asarray(got_out[0]), np.asarray(want_out[0]))
    np.testing.assert_array_equal(np.asarray(got_out[1]), np.asarray(want_out[1]))
    assert got_out[2].shape[1] == min(aux_k, cap)
    for t in range(args[0].shape[0]):
        got_set = {(int(i), float(v)) for v, i in zip(got_out[2][t], got_out[3][t]) if v > 0}
        want_set = {(int(i), float(v)) for v, i in zip(want_out[2][t], want_out[3][t]) if v > 0}
        assert got_set == want_set, t
        assert np.all(np.diff(np.asarray(got_out[2][t])) <= 0), "AuxK's values descend"


def test_dead_columns_path_in_bfloat16():
    """bfloat16: the gradients point the same way as the generic path's (cosine >= the
    conformance bound for bfloat16 gradients, `harness.BF16_GRAD_COSINE`)."""
    args = _problem(dtype=jnp.bfloat16)
    cap = auxk.dead_cap(int(np.asarray(args[5]).sum(1).max()), args[5].shape[1])
    grad = jax.grad(_loss, argnums=(4, 6, 9), has_aux=True)
    want = jax.jit(functools.partial(grad, None, 4, 30))(*args)[0]
    got = jax.jit(functools.partial(grad, cap, 4, 30))(*args)[0]
    for a, b in zip(got, want):
        assert a.dtype == jnp.bfloat16
        a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
        assert a @ b / (np.linalg.norm(a) * np.linalg.norm(b)) >= H.BF16_GRAD_COSINE


def test_compiled_step_switches_to_dead_columns_and_matches_reference(monkeypatch):
    """compile_step's first call learns the dead mask's shape, the next ones run AuxK over the
    dead columns (seen here by a spy on `auxk.decode_dead`): that step equals the NumPy
    reference's train step as the other compiled steps do (`test_jax_backend`'s bounds)."""
    caps = []
    monkeypatch.setattr(jax_backend, "decode_dead", lambda *a: caps.append(a[-1]) or auxk.decode_dead(*a))
    case = build("auxk")
    lr = 1e-3
    ref_params, _, ref = train_step(NB, case.cfg, case.params, adam_init(case.params, NB.xp), case.x, lr,
                                    case.dead_mask)
    step = JB.compile_step(functools.partial(train_step, JB, case.cfg))
    for call in range(2):
        params, x, dead = H.native(JB, case, "float32")[:3]
        new_params, _, out = step(params, adam_init(params, jnp), x, lr, dead)
        assert bool(caps) == (call == 1)
    dead_counts = case.dead_mask[:case.cfg.n_latents].reshape(case.cfg.n_experts, -1).sum(1)
    assert caps == [auxk.dead_cap(int(dead_counts.max()), case.cfg.expert_width)]
    H.assert_close(H.to_np(JB, out.losses["auxk"]), ref.losses["auxk"], "float32", "auxk",
                   scale=abs(ref.losses["auxk"]) + 1e-6)
    rtol, atol = H.TOLERANCE["float32"]
    for name, p_ref in ref_params.items():
        update, ref_update = H.to_np(JB, new_params[name]) - case.params[name], p_ref - case.params[name]
        bound = atol * lr + rtol * np.abs(ref_update) + np.spacing(np.abs(p_ref).astype(np.float32))
        assert np.all(np.abs(update - ref_update) <= bound), f"update of {name}"


def test_dead_cap_buckets_and_keeps_a_fitting_cap():
    assert auxk.dead_cap(0, 1536) == auxk.CAP_STEP
    assert auxk.dead_cap(154, 1536) == 192
    assert auxk.dead_cap(150, 1536, previous=256) == 256  # fits, one bucket too large: kept
    assert auxk.dead_cap(100, 1536, previous=256) == 128  # two buckets too large: shrinks
    assert auxk.dead_cap(200, 1536, previous=192) == 256  # outgrown
    assert auxk.dead_cap(1500, 1536) == 1536  # never more than m
    columns = auxk.dead_columns(jnp.asarray([[False, True, False, True], [False] * 4]), 3)
    np.testing.assert_array_equal(np.asarray(columns.cols[0, :2]), [1, 3])
    np.testing.assert_array_equal(np.asarray(columns.pos), [[3, 0, 3, 1], [3, 3, 3, 3]])


def test_lowered_step_runs_auxk_over_cap_columns_without_dense_batch_arrays():
    """The compiled step with a cap, lowered for CPU: AuxK's TopK reads the cap columns (the main
    TopK m), AuxK's decoder rows are gathered per expert (N, cap, d), and no array is (batch, m)
    or (batch, M).  The generic path, for contrast, runs AuxK's TopK over m columns."""
    batch, cfg = 512, SwitchSAEConfig(d_in=32, n_latents=1024, n_experts=4, k=4)
    m, cap = cfg.expert_width, 64
    params = {n: jnp.asarray(p, jnp.float32) for n, p in init_params(cfg, 0).items()}
    state = adam_init(params, jnp)._replace(step=jnp.asarray(0))
    dead = jnp.arange(cfg.total_latents) % 8 == 0  # 32 dead per expert
    args = (params, state, jnp.ones((batch, cfg.d_in)), 1e-3, dead)

    def lowered(dead_cap):
        with JB._step_trace(None, dead_cap):
            text = jax.jit(functools.partial(train_step, JB, cfg)).lower(*args).as_text()
        widths = sorted(int(w) for w in re.findall(r"chlo\.top_k\(.*?\) : tensor<(?:\d+x)*?(\d+)xf32>", text))
        shapes = {tuple(int(n) for n in dims.split("x")) for dims in re.findall(r"tensor<(\d+(?:x\d+)*)x", text)}
        return widths, shapes

    widths, shapes = lowered(cap)
    assert widths == [cap + (cfg.aux_k >= cap), m], widths  # a zero column when it keeps all cap
    dense = {s for s in shapes if sorted(s) in (sorted((batch, m)), sorted((batch, cfg.n_latents)))}
    assert not dense, dense
    assert (cfg.n_experts, cap, cfg.d_in) in shapes  # AuxK's decoder rows' gradient, per expert
    assert lowered(None)[0] == [m, m]
