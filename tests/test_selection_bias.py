"""The selection bias (`core.selection_bias`): the biased TopK against a direct computation, a
zero bias changing nothing (exactly), the state update against explicit loops on every backend,
the fade, and the trainer's use of it (settings, what each step gets, checkpoints)."""

from __future__ import annotations

import json

import numpy as np
import pytest

import array_api_compat.numpy as np_xp
from switchsae import SwitchSAEConfig, TrainConfig, Trainer
from switchsae.backends import load_backend
from switchsae.checkpoint import CheckpointError, list_checkpoints, read_checkpoint, write_checkpoint
from switchsae.conformance.cases import build
from switchsae.core import selection_bias as sb
from switchsae.core.config import ConfigError
from switchsae.core.spec import ForwardOutput, forward
from switchsae.core.topk import biased_topk, topk_reference
from switchsae.data import ArraySource

BACKENDS = ("numpy", "torch", "jax", "mlx")


def test_biased_topk_keeps_the_largest_biased_scores_and_returns_the_acts():
    rng = np.random.default_rng(0)
    acts = np.maximum(rng.normal(size=(40, 12)), 0).round(1)  # zeros and exact ties
    bias = np.where(rng.random((40, 12)) < 0.5, 2 * rng.random((40, 12)).round(1), 0.0)
    values, indices = biased_topk(acts, bias, 5, lambda a, k: topk_reference(a, k, np_xp), np_xp)
    for t in range(40):
        score = [a + b if a > 0 else a for a, b in zip(acts[t], bias[t])]
        want = sorted(range(12), key=lambda i: (-score[i], i))[:5]  # lowest index on ties
        assert list(indices[t]) == want
        assert list(values[t]) == [acts[t, i] for i in want]
    plain = topk_reference(acts, 5, np_xp)[1]
    assert np.mean([set(a) != set(b) for a, b in zip(indices, plain)]) > 0.1, "the bias changed nothing"


@pytest.mark.parametrize("name", ["selection_bias", "selection_bias_auxk"])
def test_the_conformance_cases_bias_changes_the_choice(name):
    """Case construction: with its bias the main TopK differs from the plain one on many tokens."""
    c = build(name)
    numpy = load_backend("numpy")
    biased = forward(c.params, c.x, c.cfg, numpy, c.dead_mask, c.select_bias).top_indices
    plain = forward(c.params, c.x, c.cfg, numpy, c.dead_mask).top_indices
    assert np.mean([set(a) != set(b) for a, b in zip(biased, plain)]) > 0.3


@pytest.mark.parametrize("backend_name", ["numpy", "torch"])
@pytest.mark.parametrize("name", ["selection_bias", "selection_bias_auxk"])
def test_a_zero_bias_is_exactly_no_bias(backend_name, name):
    """biased_topk of acts + 0 is the plain TopK: the same outputs and gradients, bit for bit."""
    c, be = build(name), load_backend(backend_name)
    params = {n: be.asarray(p, "float32") for n, p in c.params.items()}
    x = be.asarray(c.x, "float32")
    dead = None if c.dead_mask is None else be.asarray(c.dead_mask)
    zero = be.asarray(np.zeros_like(c.select_bias), "float32")
    out, grads = be.loss_and_grads(params, x, c.cfg.replace(dtype="float32"), dead)
    out0, grads0 = be.loss_and_grads(params, x, c.cfg.replace(dtype="float32"), dead, zero)
    for f in ("x_hat", "top_values", "top_indices"):
        assert np.array_equal(be.to_numpy(getattr(out0, f)), be.to_numpy(getattr(out, f))), f
    for n in grads:
        assert np.array_equal(be.to_numpy(grads0[n]), be.to_numpy(grads[n])), n


def _forward_output(rng, n, m, k, batch, hard=False):
    """A ForwardOutput of `batch` tokens over experts 0..n-2 (expert n-1 gets none), each with
    k kept local latents, some values 0, gated by the router probability unless `hard`."""
    expert = rng.integers(0, n - 1, size=batch)
    local = np.stack([rng.choice(m // 2, size=k, replace=False) for _ in range(batch)])  # latents >= m/2 never fire
    probs = rng.dirichlet(np.ones(n), size=batch)
    acts = np.where(rng.random((batch, k)) < 0.2, 0.0, rng.random((batch, k)) + 0.1)
    gate = np.ones(batch) if hard else probs[np.arange(batch), expert]
    return ForwardOutput(None, expert, probs, acts * gate[:, None], expert[:, None] * m + local, {}), acts


def _direct_update(bias, rate, expert, ids, acts, n, m, k, step_size, floor):
    """The update written out latent by latent (float64)."""
    bias, rate = bias.astype(np.float64).copy(), rate.astype(np.float64).copy()
    for e in range(n):
        rows = np.flatnonzero(expert == e)
        if not len(rows):
            continue
        threshold = np.mean([acts[t].min() for t in rows])
        for i in range(m):
            fired = sum(int(a != 0) for t in rows for a, j in zip(acts[t], ids[t]) if j == e * m + i)
            rate[e, i] = sb.RATE_BETA * rate[e, i] + (1 - sb.RATE_BETA) * fired / len(rows)
            push = step_size * threshold if rate[e, i] < floor * k / m else -step_size * threshold
            bias[e, i] = max(bias[e, i] + push, 0.0)
    return bias, rate


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("hard", [False, True])
def test_the_update_is_the_direct_computation(backend_name, hard):
    n, m, k, batch = 4, 16, 3, 50
    cfg = SwitchSAEConfig(d_in=8, n_latents=n * m, n_experts=n, k=k, router_scale="hard" if hard else "soft")
    be, rng = load_backend(backend_name), np.random.default_rng(1)
    out_np, acts = _forward_output(rng, n, m, k, batch, hard)
    out = ForwardOutput(None, be.asarray(out_np.expert), be.asarray(out_np.router_probs, "float32"),
                        be.asarray(out_np.top_values, "float32"), be.asarray(out_np.top_indices), {})
    bias0 = np.where(rng.random((n, m)) < 0.5, rng.random((n, m)), 0.0).astype(np.float32)
    rate0 = rng.random((n, m)).astype(np.float32) * 2 * k / m
    rate0[:, m // 2:] *= 0.1  # the latents that never fire are below the floor already
    state = sb.SelectionBias(be.asarray(bias0, "float32"), be.asarray(rate0, "float32"))
    got = sb.update(state, out, cfg, be, 0.3, 0.5)
    want_bias, want_rate = _direct_update(bias0, rate0, out_np.expert, out_np.top_indices, acts, n, m, k, 0.3, 0.5)
    # float32 sums of <= 50 terms of size ~1: a few ulps
    np.testing.assert_allclose(be.to_numpy(got.rate), want_rate, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(be.to_numpy(got.bias), want_bias, rtol=1e-5, atol=1e-6)
    bias = be.to_numpy(got.bias)
    assert np.array_equal(bias[n - 1], bias0[n - 1]), "an expert without tokens changed"
    assert (bias[:n - 1, m // 2:] > bias0[:n - 1, m // 2:]).all(), "a latent that never fired was not lifted"


def test_the_bias_fades_linearly_to_zero_at_the_last_step():
    assert [sb.scale(s, 10, 0.2) for s in range(10)] == [1.0] * 8 + [0.5, 0.0]
    assert [sb.scale(s, 10, 0.4) for s in range(10)] == [1.0] * 6 + [0.75, 0.5, 0.25, 0.0]
    assert [sb.scale(s, 4, 0.0) for s in range(4)] == [1.0] * 4


CFG = SwitchSAEConfig(d_in=8, n_latents=48, n_experts=3, k=2)


def test_the_settings_in_effect():
    assert TrainConfig().selection_bias_step(CFG) == 0.3
    assert TrainConfig.paper().selection_bias_step(CFG) == 0.0
    top2 = CFG.replace(experts_per_token=2)
    assert TrainConfig().selection_bias_step(top2) == 0.0
    with pytest.raises(ConfigError, match="selection_bias needs top-1 routing"):
        TrainConfig(selection_bias=0.3).selection_bias_step(top2)
    for bad in ({"selection_bias": -1.0}, {"selection_bias_floor": float("nan")}, {"selection_bias_fade": 1.5}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            TrainConfig(**bad)


class RecordingNumpy(type(load_backend("numpy"))):
    """The NumPy backend recording the selection bias each step's loss_and_grads gets."""

    def __init__(self):
        super().__init__()
        self.biases = []

    def loss_and_grads(self, params, x, cfg, dead_mask=None, select_bias=None):
        self.biases.append(None if select_bias is None else np.array(select_bias))
        return super().loss_and_grads(params, x, cfg, dead_mask, select_bias)


def _data(seed=2):
    return np.random.default_rng(seed).normal(size=(1024, 8)).astype("float32")


def test_each_step_trains_with_the_faded_bias_of_the_state_before_it():
    steps, be = 30, RecordingNumpy()
    states = []

    class Recording(Trainer):
        def _update(self, step_fn, x_np):
            states.append(np.array(self.bias_state.bias) if self.bias_state is not None else None)
            return super()._update(step_fn, x_np)

    Recording(CFG, TrainConfig(steps=steps, batch_size=64, selection_bias_fade=0.4), ArraySource(_data(), 64), be,
              progress=False).run()
    assert np.array_equal(be.biases[0], np.zeros((3, 16))), "the first step's bias is not the initial 0"
    assert any(b.any() for b in be.biases[1:18]), "the bias never rose"
    for step, (got, state) in enumerate(zip(be.biases, states)):
        factor = sb.scale(step, steps, 0.4)
        if factor == 0:
            assert got is None
        else:
            np.testing.assert_array_equal(got, (state * np.float32(factor)).astype(np.float32))


def test_off_means_no_bias_and_no_state():
    be = RecordingNumpy()
    trainer = Trainer(CFG, TrainConfig(steps=3, batch_size=64, selection_bias=0.0), ArraySource(_data(), 64), be,
                      progress=False)
    trainer.run()
    assert be.biases == [None] * 3 and trainer.bias_state is None


def test_checkpoints_keep_the_state_exactly_and_reject_a_broken_one(tmp_path):
    tc = TrainConfig(steps=40, batch_size=64, checkpoint_every=20, out_dir=str(tmp_path / "run"))
    trainer = Trainer(CFG, tc, ArraySource(_data(), 64), "torch", progress=False)
    trainer.run()
    first = list_checkpoints(tmp_path / "run")[0]
    resumed = Trainer.resume(first, ArraySource(_data(), 64), "torch", progress=False)
    saved = json.loads((first / "trainer_state.json").read_text())["selection_bias"]
    for name, a in resumed.bias_state._asdict().items():
        assert np.array_equal(resumed.backend.to_numpy(a).reshape(-1), np.float32(saved[name]))
    assert resumed.backend.to_numpy(resumed.bias_state.bias).any(), "the saved bias is all 0: nothing is tested"
    resumed.run()
    for name, a in trainer.bias_state._asdict().items():  # the resumed run ends where the uninterrupted one did
        assert np.array_equal(resumed.backend.to_numpy(getattr(resumed.bias_state, name)), trainer.backend.to_numpy(a))
    ckpt = read_checkpoint(first)
    for broken, message in ((lambda st: st["selection_bias"]["rate"].pop(), "selection_bias.rate must list 48"),
                            (lambda st: st.pop("selection_bias"), "selection_bias must be an object")):
        state = json.loads(json.dumps(ckpt.trainer_state))
        broken(state)
        write_checkpoint(tmp_path / "broken", ckpt.cfg, ckpt.params, optimizer=ckpt.optimizer, trainer_state=state,
                         overwrite=True)
        with pytest.raises(CheckpointError, match=message):
            Trainer.resume(tmp_path / "broken", ArraySource(_data(), 64), "torch", out_dir=tmp_path / "again",
                           progress=False)
