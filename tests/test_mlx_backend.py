"""The MLX backend: its fast paths against the spec's reference ops, the compiled train step
against the NumPy float64 reference, bfloat16, checkpoints, and data parallel on one process.

The conformance suite (`pytest conformance`) checks forward, gradients and eager steps on
every case; here the cases are reused for what only MLX has (mx.compile, gather_mm dispatch).

Tolerances: float32 fast paths vs the reference ops on the same inputs differ only in summation
order over <= 16 products, so 1e-5 of the result's scale (~100x float32 eps); against the float64
reference, the conformance harness's stated float32/bfloat16 tolerances."""

from __future__ import annotations

import functools

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")

from switchsae.backends import load_backend  # noqa: E402
from switchsae.backends.mlx import Backend as MLXBackend  # noqa: E402
from switchsae.backends.mlx import decode, encode, topk  # noqa: E402
from switchsae.backends.mlx.distributed import DataParallelBackend  # noqa: E402
from switchsae.conformance import harness as H  # noqa: E402
from switchsae.conformance.cases import build  # noqa: E402
from switchsae.core import SwitchSAEConfig, adam_init, init_params, train_step  # noqa: E402
from switchsae.core.experts import decode_reference, encode_reference  # noqa: E402
from switchsae.core.topk import topk_reference  # noqa: E402
from switchsae.model import SwitchSAE  # noqa: E402

be = load_backend("mlx")
xp = be.xp
FAST_RTOL = 1e-5


def np_(a):
    return np.asarray(be.to_numpy(a), dtype=np.float64)


def assert_fast(actual, expected, what):
    """Fast path vs reference op on identical inputs: max error <= FAST_RTOL * max |expected|."""
    expected = np_(expected)
    scale = max(float(np.max(np.abs(expected))), 1e-6)
    err = float(np.max(np.abs(np_(actual) - expected)))
    assert err <= FAST_RTOL * scale, f"{what}: max error {err:.3g} vs scale {scale:.3g}"


# -- arrays ----------------------------------------------------------------------------------

def test_registry_and_conversions():
    assert isinstance(be, MLXBackend) and be.name == "mlx"
    assert be.dtypes == ("float32", "bfloat16")
    a = np.array([[1.0, 2.5], [-3.0, 1e-3]])
    assert be.asarray(a).dtype == mx.float32  # MLX has no float64 on the GPU
    b = be.asarray(a, "bfloat16")
    assert b.dtype == mx.bfloat16
    back = be.to_numpy(b)
    assert back.dtype == np.float32 and np.allclose(back, a, rtol=2**-8)
    assert be.asarray(np.array([True, False])).dtype == mx.bool_
    with pytest.raises(TypeError, match="float64"):
        be.asarray(a, "float64")


def test_device_name_and_block_until_ready():
    assert be.device_name().startswith(f"mlx {mx.default_device().type.name} (")
    tree = {"a": mx.ones(3) * 2, "b": (mx.zeros(2), None)}
    assert be.block_until_ready(tree) is tree


# -- fast paths vs the spec's reference ops --------------------------------------------------

def test_topk_gradient_flows_to_the_kept_entries():
    rng = np.random.default_rng(0)
    acts = mx.array(rng.normal(size=(6, 9)).astype(np.float32))
    weights = mx.array(rng.normal(size=(6, 4)).astype(np.float32))
    grad = mx.grad(lambda a: mx.sum(topk.topk(a, 4)[0] * weights))(acts)
    ref = mx.grad(lambda a: mx.sum(topk_reference(a, 4, xp)[0] * weights))(acts)
    np.testing.assert_array_equal(np.array(grad), np.array(ref))


ROUTINGS = {
    "mixed_with_empty_expert": lambda rng, n, b: rng.choice([0, 2, 3], size=b),  # expert 1 empty
    "all_on_one_expert": lambda rng, n, b: np.full(b, n - 1),
    "single_expert": lambda rng, n, b: np.zeros(b, dtype=int),
}


@pytest.mark.parametrize("routing", sorted(ROUTINGS))
@pytest.mark.parametrize("bias", [False, True])
def test_sorted_dispatch_encode_equals_reference(routing, bias):
    rng = np.random.default_rng(1)
    n = 1 if routing == "single_expert" else 4
    batch, d, m = 21, 8, 6
    x = mx.array(rng.normal(size=(batch, d)).astype(np.float32))
    W = mx.array(rng.normal(size=(n, d, m)).astype(np.float32))
    b = mx.array(rng.normal(size=(n, m)).astype(np.float32)) if bias else None
    expert = mx.array(ROUTINGS[routing](rng, n, batch).astype(np.int32))
    assert_fast(encode.encode(x, W, b, expert), encode_reference(x, W, b, expert, xp), "encode")

    cot = mx.array(rng.normal(size=(batch, m)).astype(np.float32))
    argnums = (0, 1, 2) if bias else (0, 1)

    def grads(fn):
        return mx.grad(lambda *a: mx.sum(fn(a[0], a[1], a[2] if bias else None) * cot), argnums)(x, W, b)

    fast = grads(lambda x_, W_, b_: encode.encode(x_, W_, b_, expert))
    ref = grads(lambda x_, W_, b_: encode_reference(x_, W_, b_, expert, xp))
    for name, g, r in zip(("x", "W_enc", "b_enc"), fast, ref):
        assert_fast(g, r, f"d encode / d {name}")


def test_encode_bfloat16_matches_float32_rounded():
    rng = np.random.default_rng(2)
    x = mx.array(rng.normal(size=(10, 8)).astype(np.float32)).astype(mx.bfloat16)
    W = mx.array(rng.normal(size=(3, 8, 5)).astype(np.float32)).astype(mx.bfloat16)
    expert = mx.array(rng.integers(0, 3, size=10).astype(np.int32))
    got = encode.encode(x, W, None, expert)
    assert got.dtype == mx.bfloat16
    want = encode_reference(x.astype(mx.float32), W.astype(mx.float32), None, expert, xp)
    # one rounding of a float32-accumulated result: within bfloat16's half-ulp, 2**-9 relative
    np.testing.assert_allclose(np_(got), np_(want), rtol=2**-8, atol=0)


def test_decode_equals_reference_and_accumulates_duplicate_rows():
    rng = np.random.default_rng(3)
    table = mx.array(rng.normal(size=(10, 7)).astype(np.float32))
    values = mx.array(rng.normal(size=(5, 3)).astype(np.float32))
    indices = mx.array(np.array([[1, 1, 4], [4, 0, 9], [1, 2, 3], [9, 9, 9], [0, 5, 6]], dtype=np.int32))
    assert_fast(decode.decode(values, indices, table), decode_reference(values, indices, table, xp), "decode")
    cot = mx.array(rng.normal(size=(5, 7)).astype(np.float32))
    fast = mx.grad(lambda v, t: mx.sum(decode.decode(v, indices, t) * cot), (0, 1))(values, table)
    ref = mx.grad(lambda v, t: mx.sum(decode_reference(v, indices, t, xp) * cot), (0, 1))(values, table)
    assert_fast(fast[0], ref[0], "d decode / d values")
    assert_fast(fast[1], ref[1], "d decode / d W_dec")
    assert float(mx.abs(fast[1][9]).sum()) > 0 and float(mx.abs(fast[1][7]).sum()) == 0


# -- the compiled train step ------------------------------------------------------------------

STEP_CASES = ["base", "empty_expert", "one_expert", "k_equals_m", "single_expert",
              "encoder_bias", "hard_router", "auxk", "all_variants"]
LRS = (1e-3, 2e-3, 5e-4)  # a schedule: lr changes every step


@functools.cache
def reference_steps(name):
    """Three eager NumPy float64 train steps of a conformance case -> (losses, params)."""
    c, numpy = build(name), load_backend("numpy")
    params, opt = dict(c.params), adam_init(c.params, numpy.xp)
    losses = []
    for i, lr in enumerate(LRS):
        params, opt, out = train_step(numpy, c.cfg, params, opt, c.x + 0.1 * i, lr, c.dead_mask)
        losses.append(float(out.losses["total"]))
    return losses, params


def compiled_steps(name, dtype):
    c = build(name)
    cfg = c.cfg.replace(dtype=dtype)
    params, _, dead = H.native(be, c, dtype)[:3]
    opt = adam_init(params, xp)
    step = be.compile_step(functools.partial(train_step, be, cfg))
    losses = []
    for i, lr in enumerate(LRS):
        params, opt, out = step(params, opt, be.asarray(c.x + 0.1 * i, dtype), lr, dead)
        losses.append(float(out.losses["total"]))
    return c, losses, params, opt


def resolvable(name) -> dict:
    """Parameter name -> whether float32 can resolve its Adam update.  Adam divides by |g| + 1e-8,
    so a gradient below float32's absolute error (~1e-7 x the largest gradient; e.g. a saturated
    router, ~3e-9 in "one_expert") gives an update that is rounding noise in any float32 backend."""
    c = build(name)
    grads = load_backend("numpy").loss_and_grads(c.params, c.x, c.cfg, c.dead_mask)[1]
    top = max(float(np.max(np.abs(g))) for g in grads.values())
    return {n: float(np.max(np.abs(g))) > 1e-5 * top for n, g in grads.items()}


@pytest.mark.parametrize("name", STEP_CASES)
def test_compiled_steps_match_numpy_reference(name):
    c, losses, params, opt = compiled_steps(name, "float32")
    ref_losses, ref_params = reference_steps(name)
    assert int(opt.step) == len(LRS)
    np.testing.assert_allclose(losses, ref_losses, rtol=H.TOLERANCE["float32"][0])
    checked = resolvable(name)
    assert sum(checked.values()) >= 3, "case too saturated to test"
    for pname, p_ref in ref_params.items():
        update, ref_update = np_(params[pname]) - c.params[pname], p_ref - c.params[pname]
        if checked[pname]:  # the updates (<= sum of lrs) agree, as in the conformance step test
            H.assert_close(update, ref_update, "float32", f"update of {pname}", scale=sum(LRS))
        else:               # noise, but still an Adam step: at most lr per step
            assert np.max(np.abs(update)) <= 1.01 * sum(LRS), f"{pname} moved more than Adam can"


def test_compiled_step_keeps_bfloat16_and_tracks_the_reference():
    _, losses, params, opt = compiled_steps("auxk", "bfloat16")
    _, ref_params = reference_steps("auxk")
    assert all(p.dtype == mx.bfloat16 for p in params.values())
    assert all(m.dtype == mx.bfloat16 for m in (*opt.m.values(), *opt.v.values()))
    assert np.all(np.isfinite(losses))
    for pname, p_ref in ref_params.items():
        H.assert_close(np_(params[pname]), p_ref, "bfloat16", pname)


def test_compiled_step_traces_once_per_signature():
    c = build("auxk")
    params, x, dead = H.native(be, c, "float32")[:3]
    traces = []

    def counted(*args):
        traces.append(args[4] is None)  # (params, opt_state, x, lr, dead_mask, select_bias)
        return train_step(be, c.cfg, *args)

    step, opt = be.compile_step(counted), adam_init(params, xp)
    for lr in LRS:  # new lr and step count each call: same graph
        params, opt, _ = step(params, opt, x, lr, dead)
    params, opt, _ = step(params, opt, x, 1e-4)  # no dead mask: a second graph
    mx.eval(params)
    assert traces == [False, True], f"traced {len(traces)} times"


# -- checkpoints -----------------------------------------------------------------------------

def test_numpy_safetensors_checkpoint_loads_in_mlx(tmp_path):
    from safetensors.numpy import save_file

    c = build("encoder_bias")
    cfg = c.cfg.replace(dtype="float32")
    path = tmp_path / "sae.safetensors"
    save_file({name: p.astype(np.float32) for name, p in c.params.items()}, str(path))
    loaded = mx.load(str(path))
    assert sorted(loaded) == sorted(cfg.param_shapes())
    assert all(loaded[n].dtype == mx.float32 and loaded[n].shape == s for n, s in cfg.param_shapes().items())
    got = SwitchSAE.from_params(cfg, loaded, be).forward(c.x.astype(np.float32)).x_hat
    want = SwitchSAE.from_params(cfg, c.params, load_backend("numpy")).forward(c.x.astype(np.float32)).x_hat
    H.assert_close(np_(got), want, "float32", "x_hat from the loaded checkpoint")


def test_mlx_safetensors_checkpoint_loads_in_numpy(tmp_path):
    from safetensors.numpy import load_file

    cfg = SwitchSAEConfig(d_in=8, n_latents=24, n_experts=3, k=2)
    params = {n: be.asarray(p, "float32") for n, p in init_params(cfg, 5).items()}
    path = tmp_path / "sae.safetensors"
    mx.save_safetensors(str(path), params)
    loaded = load_file(str(path))
    for name, p in params.items():
        np.testing.assert_array_equal(loaded[name], np.array(p))


# -- data parallel on one process -------------------------------------------------------------

def test_data_parallel_backend_on_a_single_process_is_the_plain_backend():
    c = build("auxk")
    params, x, dead = H.native(be, c, "float32")[:3]
    dp_backend = DataParallelBackend()
    assert dp_backend.world_size == 1
    dp_step = dp_backend.compile_step(functools.partial(train_step, dp_backend, c.cfg))
    plain = be.compile_step(functools.partial(train_step, be, c.cfg))
    got = dp_step(params, adam_init(params, xp), x, 1e-3, dead)
    want = plain(params, adam_init(params, xp), x, 1e-3, dead)
    for name in params:
        np.testing.assert_allclose(np.array(got[0][name]), np.array(want[0][name]), rtol=0, atol=1e-7)
    for term, value in want[2].losses.items():
        np.testing.assert_allclose(float(got[2].losses[term]), float(value), rtol=1e-6)


# -- benchmark smoke --------------------------------------------------------------------------

def test_throughput_bench_quick_run_names_its_device(tmp_path):
    import json

    from switchsae.bench import mlx_throughput

    assert mlx_throughput.main(["--quick", "--json", str(tmp_path / "b.json")]) == 0
    record = json.loads((tmp_path / "b.json").read_text())
    assert record["device"] == be.device_name() and record["machine"]["platform"]
    assert [r["n_experts"] for r in record["results"]] == list(mlx_throughput.QUICK["experts"])
    assert all(r["tokens_per_s"] > 0 for r in record["results"])
