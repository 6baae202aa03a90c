"""The JAX backend: its jit-compiled forward and train step against the NumPy float64
reference on the conformance cases (the eager paths are covered by `pytest conformance`),
and what is JAX-specific: the encoder in both dispatches, the sparse decode gradient, no dense
(batch, M) / (batch, N, m) arrays nor host callbacks in the compiled step, buffer donation, the step counter
under jit, bfloat16 and array conversion.  Tolerances are `conformance.harness.TOLERANCE`."""

from __future__ import annotations

import functools
import os
import re
import subprocess
import sys

import array_api_compat
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from switchsae.backends import load_backend
from switchsae.backends.jax import Backend, decode, encode, use_pallas_ragged_dot
from switchsae.conformance import harness as H
from switchsae.conformance.cases import build
from switchsae.core import SwitchSAEConfig, adam_init, init_params, spec, train_step
from switchsae.core.experts import encode_reference

JB = load_backend("jax")
NB = load_backend("numpy")
LR = 1e-3


@functools.cache
def _reference_case_step(name):
    """`_compiled_step` on conformance case `name`, once per session (compiling is the cost)."""
    return _compiled_step(build(name))


def _compiled_step(case, dtype="float32", lr=LR):
    """One compiled train step on `case` -> (new params, AdamState, ForwardOutput of the
    params before the step), all JAX arrays."""
    cfg = case.cfg.replace(dtype=dtype)
    params, x, dead = H.native(JB, case, dtype)[:3]
    step = JB.compile_step(functools.partial(train_step, JB, cfg))
    return step(params, adam_init(params, jnp), x, lr, dead)


@pytest.mark.parametrize("name", ["empty_expert", "one_expert", "k_equals_m", "single_expert",
                                  "encoder_bias", "hard_router", "auxk", "all_variants"])
def test_compiled_forward_and_step_match_reference(name):
    case = build(name)
    ref_params, _, ref = train_step(NB, case.cfg, case.params, adam_init(case.params, NB.xp), case.x, LR,
                                    case.dead_mask)
    new_params, state, out = _reference_case_step(name)
    got_params = {n: H.to_np(JB, p) for n, p in new_params.items()}

    np.testing.assert_array_equal(JB.to_numpy(out.expert), ref.expert)
    if case.cfg.experts_per_token == 1 and case.cfg.shared_latents == 0:
        np.testing.assert_array_equal(JB.to_numpy(out.top_indices), ref.top_indices)
    H.assert_close(H.to_np(JB, out.top_values), ref.top_values, "float32", "top_values")
    H.assert_close(H.to_np(JB, out.x_hat), ref.x_hat, "float32", "x_hat")
    H.assert_close(H.to_np(JB, out.router_probs), ref.router_probs, "float32", "router_probs")
    for term, value in ref.losses.items():
        H.assert_close(H.to_np(JB, out.losses[term]), value, "float32", f"loss {term}", scale=abs(value) + 1e-6)
    # Adam's first update is ~lr * sign(g): compare updates on the lr scale (as conformance
    # does), plus one float32 spacing of the parameter, which can hold its update no finer
    # (the saturated router of "one_expert" has |W_router| ~ 10, spacing ~1e-6)
    rtol, atol = H.TOLERANCE["float32"]
    for pname, p_ref in ref_params.items():
        update, ref_update = got_params[pname] - case.params[pname], p_ref - case.params[pname]
        bound = atol * LR + rtol * np.abs(ref_update) + np.spacing(np.abs(p_ref).astype(np.float32))
        assert np.all(np.abs(update - ref_update) <= bound), f"update of {pname}"
    assert int(state.step) == 1


def test_xp_is_the_array_api_namespace_of_jax_arrays():
    assert array_api_compat.array_namespace(jnp.ones(3)) is JB.xp
    assert JB.name == "jax" and set(JB.dtypes) >= {"float32", "bfloat16"}


@pytest.mark.parametrize("mode", ["tiles", "ragged"])
def test_grouped_encode_matches_dense_reference(mode):
    """Tiles or one ragged_dot over sorted tokens == the dense definition; groups may be
    empty, and ids outside [0, N) (tokens another device owns) give zero rows."""
    rng = np.random.default_rng(0)
    n, d, m, batch = 5, 6, 7, 30
    x, W, b = rng.normal(size=(batch, d)), rng.normal(size=(n, d, m)), rng.normal(size=(n, m))
    ids = rng.choice([0, 2, 3, -1, 5, 9], size=batch)  # groups 1 and 4 empty; -1, 5, 9 foreign
    got = np.asarray(encode.grouped_encode(jnp.asarray(x, jnp.float32), jnp.asarray(W, jnp.float32),
                                               jnp.asarray(b, jnp.float32), jnp.asarray(ids), mode))
    mine = (ids >= 0) & (ids < n)
    ref = encode_reference(x[mine], W, b, ids[mine], np)
    np.testing.assert_allclose(got[mine], ref, rtol=1e-5, atol=1e-5)  # float32, sums of 6 terms
    assert np.all(got[~mine] == 0)


def test_decode_gradient_scatters_into_selected_rows_only():
    """The ragged dispatch's decode (TPU/GPU): XLA's VJP of the row gather is a scatter-add of
    (batch*k) rows: no (batch, R) one-hot, no dense matmul against the table, so no custom VJP
    is needed there."""
    batch, k, rows, d = 6, 3, 40, 5
    loss = lambda v, t: jnp.sum(decode.gather_decode(v, jnp.zeros((batch, k), jnp.int32), t) ** 2)
    jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(jnp.ones((batch, k)), jnp.ones((rows, d)))
    prims = {e.primitive.name for e in _equations(jaxpr.jaxpr)}
    assert "scatter-add" in prims and "dot_general" not in prims, prims
    assert all(sorted(s) != sorted((batch, rows)) for s in _shapes(jaxpr.jaxpr))


@pytest.mark.parametrize("dead", [False, True], ids=["plain", "auxk"])
def test_compiled_step_has_no_dense_expert_arrays_nor_host_callbacks(dead):
    """The compiled train step never forms (batch, M) or (batch, N, m) arrays (in any axis
    order) and calls back to no host: not in its jaxpr (both dispatches), not in the StableHLO
    it lowers to for CPU (tiles), nor in the StableHLO exported for CUDA and TPU (ragged, which
    lowers to one `ragged_dot` there; exported via jax.export, no TPU needed)."""
    batch, cfg = 40, SwitchSAEConfig(d_in=24, n_latents=48, n_experts=4, k=3, encoder_bias=True,
                                     auxk_coef=1 / 32, k_aux=4)
    forbidden = {tuple(sorted((batch, cfg.n_latents))), tuple(sorted((batch, cfg.n_experts, cfg.expert_width)))}
    params = {n: jnp.asarray(p, jnp.float32) for n, p in init_params(cfg, 0).items()}
    state = adam_init(params, jnp)._replace(step=jnp.asarray(0))
    dead_mask = jnp.arange(cfg.n_latents) % 2 == 0 if dead else None
    args = (params, state, jnp.ones((batch, cfg.d_in)), 1e-3, dead_mask)

    def dense_shapes(text):
        dims = re.findall(r"tensor<(\d+(?:x\d+)*)x", text)
        return forbidden & {tuple(sorted(int(n) for n in d.split("x"))) for d in dims}

    for mode, platforms in (("tiles", ()), ("ragged", ("cuda", "tpu"))):
        step = jax.jit(functools.partial(train_step, Backend(dispatch_mode=mode), cfg))
        jaxpr = jax.make_jaxpr(step)(*args).jaxpr
        dense = forbidden & {tuple(sorted(s)) for s in _shapes(jaxpr)}
        assert not dense, f"{mode} jaxpr: dense expert arrays {dense}"
        prims = {e.primitive.name for e in _equations(jaxpr)}
        assert not {p for p in prims if "callback" in p}, prims
        assert ("ragged_dot_general" in prims) == (mode == "ragged"), mode
        texts = {"cpu": step.lower(*args).as_text()} if mode == "tiles" else {
            p: jax.export.export(step, platforms=[p])(*args).mlir_module() for p in platforms}
        for platform, text in texts.items():
            assert not dense_shapes(text), f"{platform}: dense expert arrays {dense_shapes(text)}"
            targets = set(re.findall(r"custom_call\s*@([\w.]+)", text))
            assert not {t for t in targets if "callback" in t.lower()}, f"{platform}: host callbacks {targets}"
            assert ("ragged_dot" in text) == (mode == "ragged"), platform


def test_compile_step_donates_buffers_and_carries_the_step():
    case, traces = build("base"), []

    def counted(*args):
        traces.append(1)
        return train_step(JB, case.cfg, *args)

    params, x, _ = H.native(JB, case, "float32")[:3]
    state = adam_init(params, jnp)
    step = JB.compile_step(counted)
    for expected in (1, 2, 3):
        old = params
        params, state, _ = step(params, state, x, LR)
        assert isinstance(state.step, jax.Array) and int(state.step) == expected
        assert all(p.is_deleted() for p in old.values()), "params were not donated"
    assert len(traces) == 1, f"the step was traced {len(traces)} times for 3 calls"


def test_bfloat16_compiled_step_keeps_dtypes():
    """A float32 lr array would promote bfloat16 params inside Adam; the compiled step keeps
    params and moments bfloat16.  Its loss matches the reference to bfloat16 tolerance."""
    case = build("base")
    new, state, out = _compiled_step(case, "bfloat16", lr=jnp.float32(LR))
    assert {p.dtype for p in new.values()} == {jnp.dtype(jnp.bfloat16)}
    assert {m.dtype for m in (*state.m.values(), *state.v.values())} == {jnp.dtype(jnp.bfloat16)}
    ref = spec.forward(case.params, case.x, case.cfg, NB).losses["total"]
    H.assert_close(H.to_np(JB, out.losses["total"]), ref, "bfloat16", "bf16 total loss", scale=abs(ref))


def test_compiled_forward_equals_the_steps_forward():
    case = build("auxk")
    params, x, dead = H.native(JB, case, "float32")[:3]
    fwd = JB.compile_forward(lambda p, xs, dm, sb: spec.forward(p, xs, case.cfg, JB, dm, sb))(params, x, dead)
    _, _, out = _reference_case_step("auxk")
    for field in ("x_hat", "router_probs", "top_values", "top_indices", "expert"):
        np.testing.assert_array_equal(JB.to_numpy(getattr(fwd, field)), JB.to_numpy(getattr(out, field)), field)
    assert float(fwd.losses["total"]) == float(out.losses["total"])


def test_asarray_accepts_dlpack_producers_and_to_numpy_widens_bfloat16():
    class Producer:  # any DLPack-capable array (a torch tensor, say)
        def __init__(self, a):
            self.a = a

        def __dlpack__(self, **kw):
            return self.a.__dlpack__(**kw)

        def __dlpack_device__(self):
            return self.a.__dlpack_device__()

    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    got = JB.asarray(Producer(a), "bfloat16")
    assert got.dtype == jnp.bfloat16
    back = JB.to_numpy(got)
    assert back.dtype == np.float32 and np.array_equal(back, a)  # small integers are exact in bf16
    with pytest.raises(TypeError, match="does not support dtype"):
        JB.asarray(a, "float64")


def test_pallas_switch_fails_clearly_without_the_kernel():
    flag = "jax_ragged_dot_use_gpu_pallas_triton_lowering"
    before = getattr(jax.config, flag)
    try:
        if encode._pallas_kernel_available():
            use_pallas_ragged_dot(True)
            assert getattr(jax.config, flag) is True
        else:
            with pytest.raises(RuntimeError, match="40888"):
                use_pallas_ragged_dot(True)
            assert getattr(jax.config, flag) == before
        use_pallas_ragged_dot(False)
        assert getattr(jax.config, flag) is False
    finally:
        jax.config.update(flag, before)


# -- jaxpr helpers ---------------------------------------------------------------------------
def _equations(jaxpr):
    """Every equation, descending into nested jaxprs (jit, custom_vjp, cond, ...)."""
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _equations(inner)


def _shapes(jaxpr):
    for eqn in _equations(jaxpr):
        for var in (*eqn.invars, *eqn.outvars):
            shape = getattr(getattr(var, "aval", None), "shape", None)
            if shape is not None:
                yield tuple(shape)


@pytest.mark.parametrize("max_grad_norm", [1e-3, None])
def test_blocked_update_equals_the_spec_update(max_grad_norm):
    """The CPU update by latent blocks (`update.blocked_update`) against `apply_update` on the same
    arrays (float32 tolerance: the row sums run over blocks), with every parameter kind (b_enc,
    the shared decoder) and an expert width of 24, so 3 blocks of 8 per expert; a clip that binds
    (1e-3) and none.  An expert width with no divisor of 8 or more in BLOCK_ROWS takes the spec's
    update."""
    from switchsae.backends.jax.update import block_rows, blocked_update
    from switchsae.core.train_step import apply_update

    cfg = SwitchSAEConfig(d_in=16, n_latents=96, n_experts=4, k=4, encoder_bias=True, shared_latents=8,
                          shared_k=2)
    rng = np.random.default_rng(0)
    params = {n: jnp.asarray(p, jnp.float32) for n, p in init_params(cfg, 0).items()}
    grads = {n: jnp.asarray(rng.normal(size=p.shape), jnp.float32) for n, p in params.items()}
    state = adam_init(params, jnp)
    state = state._replace(m={n: jnp.asarray(rng.normal(size=p.shape), jnp.float32) for n, p in params.items()},
                           v={n: jnp.asarray(rng.random(p.shape), jnp.float32) for n, p in params.items()}, step=3)
    assert block_rows(params) == 8
    got = jax.jit(lambda *a: blocked_update(*a, max_grad_norm, (0.9, 0.999), 8))(params, grads, state, LR)
    want = apply_update(jnp, params, grads, state, LR, max_grad_norm)
    assert int(got[1].step) == want[1].step == 4
    for i, what in enumerate(("params", "m", "v")):
        for n in params:
            g, w = (got[0], got[1].m, got[1].v)[i][n], (want[0], want[1].m, want[1].v)[i][n]
            H.assert_close(np.asarray(g), np.asarray(w), "float32", f"{what} {n}")
    narrow = dict(params, W_enc=params["W_enc"][..., :12], W_dec=params["W_dec"][:, :12])
    assert block_rows(narrow) is None


_FAULTS_PER_STEP = """
import resource
import numpy as np
from switchsae.backends import load_backend
from switchsae.core import SwitchSAEConfig, adam_init, init_params, train_step
be = load_backend("jax")
cfg = SwitchSAEConfig(d_in=256, n_latents=4096, n_experts=16, k=16)
rng = np.random.default_rng(1)
params = {n: be.asarray(p) for n, p in init_params(cfg, 0).items()}
x, dead = be.asarray(rng.normal(size=(2048, 256)), "float32"), be.asarray(rng.random(4096) < 0.1)
step = be.compile_step(lambda p, s, xs, lr, dm, sb: train_step(be, cfg, p, s, xs, lr, dm, sb, max_grad_norm=1.0))
box = [params, adam_init(params, be.xp)]
for i in range(33):
    if i == 3:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    p, s, out = step(box[0], box[1], x, 1e-3, dead)
    box[:] = [p, s]
    be.block_until_ready(out.losses["total"])
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 30)
"""


def _faults_per_step(keep: str) -> int:
    from switchsae.backends.host_memory import KEEP_FREED_ENV_VAR

    done = subprocess.run([sys.executable, "-c", _FAULTS_PER_STEP], capture_output=True, text=True, check=True,
                          env=dict(os.environ, **{KEEP_FREED_ENV_VAR: keep}))
    return int(done.stdout.split()[-1])


def test_cpu_train_step_temporaries_are_reused_not_page_faulted():
    """(glibc) In a fresh process, a JAX train step (d 256, M 4096, N 16, batch 2048, AuxK live)
    reuses its temporaries, which XLA allocates on its worker threads, instead of faulting them
    in again every step (`host_memory.keep_freed_cpu_memory`).  With it off
    ($SWITCHSAE_KEEP_FREED_MEMORY=0) every step faults its large temporaries in (~9,300 pages here,
    the same every step).  With it on, a step occasionally grows the heap: XLA's 64-byte-aligned
    allocations do not fit an exactly sized freed block (glibc 2.36's memalign), so over the first
    tens of steps some land on new pages (seen: 0-2,000 a step, a mean of 300-700 over 30 steps).
    Bound: the mean over 30 steps after 3 warm-up ones under a quarter of the setting-off run's,
    which is at least 4,096 (so the check can fail both ways)."""
    off, on = _faults_per_step("0"), _faults_per_step("1")
    assert off >= 4096, off
    assert on < off / 4, (on, off)
