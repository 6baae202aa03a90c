"""Expert- and data-parallel JAX train steps on 4 and 8 CPU devices equal the single-device step.

XLA fixes the CPU device count when jax initialises, so each multi-device run happens in a
subprocess (this file run as a script with XLA_FLAGS set) that reports JSON.

Tolerance (float32): the sharded step changes only the order of the data-parallel gradient
sums (per-device partial sums, then an all-reduce); the expert-parallel psum_scatter adds
exact zeros.  Two Adam steps then move parameters by ~2e-3 (lr 1e-3), so a difference of at
most 1e-6 plus 4 float32 spacings of the parameter is rounding, while any misrouted token or
lost contribution would show up at the 1e-4..1e-3 scale."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

MESHES = [(4, 1), (2, 2), (1, 4)]  # (data, expert)
CASES = ("switch_auxk_bias", "all_variants")
MESHES_8 = [(1, 8), (2, 4)]  # expert parallel over 8 devices (8 experts), and mixed
STEPS, LR = 2, 1e-3


def _run_worker(n_devices: int) -> dict:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={n_devices}", JAX_PLATFORMS="cpu")
    # about a minute on an idle 2-core machine; the limit only catches a hung worker (a shared
    # machine under heavy load took over 5 minutes)
    proc = subprocess.run([sys.executable, __file__, str(n_devices)], env=env, capture_output=True,
                          text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def report():
    return _run_worker(4)


@pytest.fixture(scope="module")
def report_8():
    return _run_worker(8)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("mesh", MESHES, ids=lambda m: f"data{m[0]}_expert{m[1]}")
def test_sharded_step_matches_single_device(report, case, mesh):
    _assert_matches(report["runs"][f"{case}/{mesh[0]}x{mesh[1]}"])


@pytest.mark.parametrize("mesh", MESHES_8, ids=lambda m: f"data{m[0]}_expert{m[1]}")
def test_expert_parallel_step_on_8_devices_matches_single_device(report_8, mesh):
    r = report_8["runs"][f"switch_auxk_bias/{mesh[0]}x{mesh[1]}"]
    _assert_matches(r)
    assert r["local_W_enc_shape"][0] == 8 // mesh[1]  # each device holds only its experts


def _assert_matches(r):
    for name, excess in r["param_excess"].items():
        assert excess <= 0, f"{name} after {STEPS} steps exceeds tolerance by {excess:.3e}"
    assert r["x_hat_rel"] < 1e-5, f"x_hat relative difference {r['x_hat_rel']:.3e}"
    assert r["loss_rel"] < 1e-5, f"loss relative difference {r['loss_rel']:.3e}"
    assert r["same_experts"] and r["same_indices"], "routing or TopK differs from single device"
    assert r["donation_warnings"] == [], r["donation_warnings"]


@pytest.mark.parametrize("mesh", MESHES, ids=lambda m: f"data{m[0]}_expert{m[1]}")
def test_expert_weights_stay_split_over_the_expert_axis(report, mesh):
    r = report["runs"][f"switch_auxk_bias/{mesh[0]}x{mesh[1]}"]
    n_experts = 4
    assert r["local_W_enc_shape"][0] == n_experts // mesh[1]
    if mesh[1] > 1:
        assert r["specs"]["W_enc"] == r["specs"]["W_dec"] == r["specs"]["b_enc"] == ["expert"]
    assert r["specs"]["W_router"] == []


def test_layout_errors_are_clear(report):
    errors = report["errors"]
    assert "needs 8 devices; 4 available" in errors["too_many_devices"]
    assert "n_experts (2) must be divisible by the mesh's expert axis (4 devices)" in errors["experts"]
    assert "batch size 30 is not divisible by the mesh's 4 devices" in errors["batch"]


# -- the 4-device worker (runs in the subprocess) --------------------------------------------
def _worker(n_devices: int) -> dict:
    import functools
    import warnings

    import jax
    import jax.numpy as jnp

    from switchsae.backends.jax import Backend
    from switchsae.backends.jax import distributed as S
    from switchsae.conformance.cases import build
    from switchsae.core import SwitchSAEConfig, adam_init, init_params, train_step

    assert jax.device_count() == n_devices, jax.devices()
    n_experts = 8 if n_devices == 8 else 4

    def make(name):
        if name == "all_variants":  # top-2 routing, shared expert, AuxK (batch 48)
            c = build(name)
            return c.cfg.replace(dtype="float32"), c.params, c.x, c.dead_mask
        cfg = SwitchSAEConfig(d_in=16, n_latents=64, n_experts=n_experts, k=4, encoder_bias=True,
                              auxk_coef=1 / 32, k_aux=4, lb_coef=0.5)
        rng = np.random.default_rng(0)
        params = init_params(cfg, 0)
        params["W_router"] *= 4.0
        params["b_enc"] = 0.05 * rng.normal(size=params["b_enc"].shape)
        return cfg, params, rng.normal(size=(32, 16)), rng.random(cfg.n_latents) < 0.4

    def run(backend, cfg, params, x, dead, mesh=None):
        params = {n: jnp.asarray(p, jnp.float32) for n, p in params.items()}
        state, x, dead = adam_init(params, jnp), jnp.asarray(x, jnp.float32), jnp.asarray(dead)
        if mesh is not None:
            params = S.shard_params(params, mesh, cfg)
            state, x = S.shard_opt_state(state, mesh, cfg), S.shard_batch(x, mesh)
        step = backend.compile_step(functools.partial(train_step, backend, cfg))
        first = None
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(STEPS):
                params, state, out = step(params, state, x, LR, dead)
                first = first or out
        donation = [str(w.message) for w in caught if "donat" in str(w.message).lower()]
        return params, first, donation

    runs = {}
    for name in CASES if n_devices == 4 else CASES[:1]:
        cfg, p0, x, dead = make(name)
        ref_params, ref_out, _ = run(Backend(), cfg, p0, x, dead)
        for n_data, n_expert in MESHES if n_devices == 4 else MESHES_8:
            mesh = S.make_mesh(n_data, n_expert)
            params, out, donation = run(S.ExpertParallelBackend(mesh), cfg, p0, x, dead, mesh)
            excess = {}
            for pname, value in params.items():
                got, ref = np.asarray(value, np.float64), np.asarray(ref_params[pname], np.float64)
                bound = 1e-6 + 4 * np.spacing(np.abs(ref).astype(np.float32))
                excess[pname] = float(np.max(np.abs(got - ref) - bound))
            x_hat, ref_x_hat = np.asarray(out.x_hat), np.asarray(ref_out.x_hat)
            loss, ref_loss = float(out.losses["total"]), float(ref_out.losses["total"])
            runs[f"{name}/{n_data}x{n_expert}"] = {
                "param_excess": excess,
                "x_hat_rel": float(np.abs(x_hat - ref_x_hat).max() / np.abs(ref_x_hat).max()),
                "loss_rel": abs(loss - ref_loss) / abs(ref_loss),
                "same_experts": bool(np.array_equal(np.asarray(out.expert), np.asarray(ref_out.expert))),
                "same_indices": bool(np.array_equal(np.sort(np.asarray(out.top_indices), -1),
                                                    np.sort(np.asarray(ref_out.top_indices), -1))),
                "donation_warnings": donation,
                "specs": {n: [str(a) for a in v.sharding.spec] for n, v in params.items()},
                "local_W_enc_shape": list(params["W_enc"].addressable_shards[0].data.shape),
            }

    if n_devices != 4:
        return {"runs": runs}
    errors = {}
    cfg2 = SwitchSAEConfig(d_in=16, n_latents=64, n_experts=2, k=4)
    for key, attempt in {
        "too_many_devices": lambda: S.make_mesh(4, 2),
        "experts": lambda: S.param_shardings(S.make_mesh(1, 4), cfg2),
        "batch": lambda: S.shard_batch(jnp.zeros((30, 16)), S.make_mesh(2, 2)),
    }.items():
        try:
            attempt()
            errors[key] = "no error raised"
        except ValueError as err:
            errors[key] = str(err)
    return {"runs": runs, "errors": errors}


if __name__ == "__main__":
    print(json.dumps(_worker(int(sys.argv[1]))))
