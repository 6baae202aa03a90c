"""Lazy Adam on the JAX backend (`backends/jax/lazy.py`): the compiled row-sparse step against
core's NumPy reference through row-capacity changes (an overflowing step runs again), in
float32 and bfloat16; its lowering holds no dictionary-sized gradient, temporary or moment
update; AuxK keeps the backward sparse; `switchsae train --backend jax --optimizer lazy_adam`
runs the row-sparse step.  Tolerances: `conformance.harness.TOLERANCE` (float32: 1e-4 of the
scale, float32 against a float64 reference; bfloat16: 6e-2, its 8-bit mantissa)."""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from switchsae.backends import load_backend
from switchsae.backends.jax import Backend, lazy
from switchsae.cli import main
from switchsae.conformance import harness as H
from switchsae.conformance.cases import build
from switchsae.core import SwitchSAEConfig, adam_init, init_params, train_step
from switchsae.core.backend import Backend as CoreBackend
from switchsae.core.optim import LATENT_ROW_PARAMS, latent_rows, received_gradient
from switchsae.data import ShardWriter

from test_jax_backend import _equations

NB = load_backend("numpy")
LR = 1e-2


def _lazy_cfg():
    """A shared expert (its decoder must stay dense) and AuxK over 40 % dead latents."""
    return SwitchSAEConfig(d_in=16, n_latents=256, n_experts=4, k=4, auxk_coef=0.5, k_aux=6,
                           encoder_bias=True, shared_latents=8, shared_k=1)


class MaskedLazyAdam(Backend):
    """The JAX backend with core's lazy Adam as specified: dense gradients, every row computed
    and the touched ones kept (`core.train_step.apply_lazy_update`)."""

    loss_and_row_grads = CoreBackend.loss_and_row_grads
    lazy_update = CoreBackend.lazy_update


def test_lazy_steps_follow_the_reference_through_capacity_changes():
    """Four compiled row-sparse steps equal core's lazy Adam (`MaskedLazyAdam`, the same float32
    arithmetic on dense gradients; the conformance suite compares one step with NumPy float64)
    step by step.  Step 1 runs at the bound (min(M, batch * (k + k_aux)) = 240 rows); its batch
    is two tokens repeated, so it touches at most 16 latents and step 2 runs at 16 rows,
    overflows on a varied batch (65 to 128 latents) and must run again at 128 rows, having
    changed nothing: a skipped or doubled update fails the comparison.  Steps 3 and 4 repeat that
    (shrinking to 16 rows, a quarter of 128 or less) with the capacities compiled already: three
    traces in all."""
    cfg, batch = _lazy_cfg(), 24
    rng = np.random.default_rng(3)
    dead = jnp.asarray(rng.random(cfg.total_latents) < 0.4)
    varied = rng.normal(size=(batch, cfg.d_in))
    same = np.tile(rng.normal(size=(2, cfg.d_in)), (batch // 2, 1))  # two tokens, repeated
    JB, RB, traces = Backend(), MaskedLazyAdam(), []

    def counted(*args):
        traces.append(1)
        return train_step(JB, cfg, *args, optimizer="lazy_adam")

    step = JB.compile_step(counted)
    ref_step = RB.compile_step(functools.partial(train_step, RB, cfg, optimizer="lazy_adam"))
    params, ref = ({n: JB.asarray(p, "float32") for n, p in init_params(cfg, 1).items()} for _ in range(2))
    state, ref_state = adam_init(params, jnp), adam_init(ref, jnp)
    touched = []
    for x in (same, varied, same, varied):
        before = {n: H.to_np(JB, p) for n, p in ref.items()}
        _, grads = NB.loss_and_grads(before, x, cfg, np.asarray(dead))
        touched.append(int(np.sum(received_gradient(grads, NB.xp))))
        params, state, _ = step(params, state, JB.asarray(x, "float32"), LR, dead)
        ref, ref_state, _ = ref_step(ref, ref_state, JB.asarray(x, "float32"), LR, dead)
        # updates within 1e-3 lr: the gradients differ in their last float32 bits (summation
        # order), which Adam turns into ~1e-4 lr where a gradient entry is ~1e-10, below its eps
        for n, p in ref.items():
            H.assert_close(H.to_np(JB, params[n]) - before[n], H.to_np(JB, p) - before[n], "float32",
                           f"update of {n}", scale=10 * LR)
            for what, a, b in (("m", state.m, ref_state.m), ("v", state.v, ref_state.v)):
                H.assert_close(H.to_np(JB, a[n]), H.to_np(JB, b[n]), "float32", f"{what} of {n}")
        assert int(state.step) == int(ref_state.step)
    assert touched[0] <= 16 and touched[2] <= 16 and 64 < touched[1] <= 128 and 64 < touched[3] <= 128, \
        f"case construction: touched counts {touched}"
    assert len(traces) == 3, f"{len(traces)} traces"


def test_bfloat16_lazy_step_leaves_untouched_rows_exactly_and_matches_the_reference():
    """One bfloat16 lazy step from a warm state (conformance `warm_step`): the rows of latents
    without gradient, and their moments, are bit for bit what they were; every array matches the
    float64 reference within bfloat16 tolerance and stays bfloat16."""
    for name in ("auxk", "empty_expert"):
        c = build(name)
        _, ref = H.warm_step("numpy", c, "float64", 1e-3, "lazy_adam")
        before, after = H.warm_step("jax", c, "bfloat16", 1e-3, "lazy_adam")
        for i, what in enumerate(("param", "m", "v")):
            for n, r in ref[i].items():
                H.assert_close(after[i][n], r, "bfloat16", f"{name}: {what} of {n}")
        untouched = ~received_gradient(_reference_grads(c), NB.xp)
        assert untouched.any(), "case construction: every latent received gradient"
        for n in LATENT_ROW_PARAMS:
            for i, what in enumerate(("param", "m", "v")):
                if n in c.params:
                    rows = [latent_rows(n, t[i][n], NB.xp)[untouched] for t in (before, after)]
                    assert np.array_equal(*rows), f"{name}: {what} {n} of a latent without gradient changed"


def _reference_grads(case):
    return NB.loss_and_grads(case.params, case.x, case.cfg, case.dead_mask)[1]


def _lowered(optimizer, mode="tiles", dead_fraction=0.1, batch=64):
    """The jaxpr and the compiled CPU step (donated) of a train step with M * d >> batch * k * d.
    Cached (`_lower`): two tests read the same lazy tiles step, and compiling it is the cost;
    the tests only inspect what it returns, never run it."""
    return _lower(optimizer, mode, dead_fraction, batch)


@functools.cache
def _lower(optimizer, mode, dead_fraction, batch):
    cfg = SwitchSAEConfig(d_in=32, n_latents=65536, n_experts=16, k=4, encoder_bias=True, auxk_coef=1 / 32,
                          k_aux=8)
    params = {n: jnp.asarray(p, jnp.float32) for n, p in init_params(cfg, 0).items()}
    state = adam_init(params, jnp)._replace(step=jnp.asarray(0))
    dead = None if dead_fraction is None else \
        jnp.asarray(np.random.default_rng(0).random(cfg.total_latents) < dead_fraction)
    args = (params, state, jnp.ones((batch, cfg.d_in)), 1e-3, dead)
    backend = Backend(dispatch_mode=mode)
    fn = functools.partial(train_step, backend, cfg, optimizer=optimizer)

    def traced(*a):  # as `compile.compile_step` traces it (at the bound capacity)
        with backend._step_trace(None) as trace:
            return fn(*a), trace.outputs()

    jaxpr = jax.make_jaxpr(traced)(*args).jaxpr
    return cfg, jaxpr, jax.jit(traced, donate_argnums=(0, 1)).lower(*args).compile()


def _dictionary_sized(jaxpr, cfg):
    """The primitives of the equations with an output of at least M * d / 2 elements."""
    size = cfg.n_latents * cfg.d_in // 2
    return {e.primitive.name for e in _equations(jaxpr) for v in e.outvars
            if int(np.prod(getattr(v.aval, "shape", ()), dtype=np.int64)) >= size}


@pytest.mark.parametrize("mode", ["tiles", "ragged"])
def test_lazy_step_holds_no_dictionary_sized_gradient_temporary_or_moment_update(mode):
    """With AuxK live, the only dictionary-sized equations of the lazy step are views (reshape)
    and the row writes into the donated parameters and moments (scatter); on CPU its compiled
    temporaries stay under half one (M, d) float32 array.  The dense step computes its (M, d)
    gradients (its moments are updated in blocks on CPU, `update`): both checks fail there."""
    cfg, jaxpr, compiled = _lowered("lazy_adam", mode)
    assert _dictionary_sized(jaxpr, cfg) <= {"reshape", "scatter"}, _dictionary_sized(jaxpr, cfg)
    dictionary_bytes = 4 * cfg.n_latents * cfg.d_in
    cfg, dense_jaxpr, dense_compiled = _lowered("adam", mode)
    assert {"mul", "scatter-add"} <= _dictionary_sized(dense_jaxpr, cfg)
    if mode == "tiles":  # compiled for this CPU
        assert compiled.memory_analysis().temp_size_in_bytes < dictionary_bytes / 2
        assert dense_compiled.memory_analysis().temp_size_in_bytes > dictionary_bytes


def test_auxk_adds_no_dense_pre_activation_gradient():
    """With a dead mask the step's matrix products over (batch, m) pre-activations (the batch of
    64 is one tile) are the forward's one, as without: AuxK's selection joins the sparse backward (a dense
    pre-activation gradient would add its two transposed products); the lazy step's compiled
    temporaries grow by less than one (batch, m) float32 array (the dense step's add a second
    (M, d) table: the AuxK decode's gradient, summed with the main decode's)."""
    counts, temps = {}, {}
    for dead in (None, 0.1):
        cfg, jaxpr, compiled = _lowered("lazy_adam", dead_fraction=dead)
        m = cfg.expert_width
        counts[dead] = sum(e.primitive.name == "dot_general"
                           and any(getattr(v.aval, "shape", ()) == (64, m) for v in (*e.invars, *e.outvars))
                           for e in _equations(jaxpr))
        temps[dead] = compiled.memory_analysis().temp_size_in_bytes
    assert counts[0.1] == counts[None] == 1, counts
    assert temps[0.1] - temps[None] < 4 * 64 * m, temps


def test_cli_trains_jax_with_lazy_adam(tmp_path, capsys, monkeypatch):
    """`switchsae train --backend jax --optimizer lazy_adam` runs the row-sparse update (traced,
    not the dense fallback) and learns the data."""
    rng = np.random.default_rng(0)
    x = (rng.exponential(1.0, size=(1500, 48)) * (rng.random((1500, 48)) < 0.08)) @ rng.normal(size=(48, 24))
    with ShardWriter(tmp_path / "shards", shard_tokens=500) as writer:
        writer.append(x.astype(np.float32))
    calls = []
    monkeypatch.setattr(lazy, "lazy_update", lambda *a, **k: calls.append(1) or _row_update(*a, **k))
    code = main(["train", "--backend", "jax", "--optimizer", "lazy_adam", "--no-progress", "--latents", "96",
                 "--experts", "4", "--k", "4", "--steps", "40", "--batch-size", "64", "--lr", "1e-2",
                 "--warmup", "2", "--eval-tokens", "512", "--data", str(tmp_path / "shards"),
                 "--out", str(tmp_path / "run")])
    _, err = capsys.readouterr()
    assert code == 0, err
    assert calls, "the row-sparse update was never traced"
    history = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    fvu = [h["fvu"] for h in history if "fvu" in h]
    assert fvu[-1] < 0.8 * fvu[0], fvu


_row_update = lazy.lazy_update
