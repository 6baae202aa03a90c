"""experiments.dead_latents: resampling re-points exactly the dead latents, orientation makes
every latent face its expert's data, and the latent balancing loss and its dead-only gradient
are what the module notes say."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from switchsae.backends.torch import Backend
from switchsae.core import SwitchSAEConfig, init_params
from switchsae.core.optim import adam_init
from switchsae.core.spec import forward

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # experiments/ is not installed
from experiments import dead_latents

CFG = SwitchSAEConfig(d_in=8, n_latents=24, n_experts=3, k=2)


def _setup(seed=0):
    be = Backend("cpu")
    rng = np.random.default_rng(seed)
    params = {n: torch.tensor(p) for n, p in init_params(CFG, seed).items()}
    params["b_pre"] = torch.tensor(rng.normal(size=8).astype("float32"))
    x = torch.tensor(rng.normal(size=(64, 8)).astype("float32"))
    return be, rng, params, x


def test_resample_repoints_the_dead_latents_and_leaves_the_rest_exactly():
    be, rng, params, x = _setup()
    state = adam_init(params, be.xp)
    for moments in (state.m, state.v):
        for name in moments:
            moments[name] += torch.tensor(rng.random(tuple(moments[name].shape)).astype("float32"))
    counter = torch.tensor(rng.integers(1, 50, CFG.total_latents).astype("float32"))
    dead = torch.zeros(CFG.total_latents, dtype=torch.bool)
    dead[[1, 5, 9, 10, 20]] = True
    out = forward(params, x, CFG, be)
    before = {n: t.clone() for n, t in params.items()}
    moments_before = [{n: t.clone() for n, t in ms.items()} for ms in (state.m, state.v)]
    counter_before = counter.clone()

    done = dead_latents.resample(params, state, counter, dead, x, out, CFG, torch.Generator().manual_seed(0))

    m = CFG.expert_width
    residual = (x - out.x_hat).numpy()
    reached = {int(e) for e in out.expert}
    expected = [i for i in np.flatnonzero(dead.numpy()) if i // m in reached]
    assert done == len(expected) > 0
    for i in range(CFG.total_latents):
        e, j = divmod(i, m)
        if i not in expected:  # untouched, bit for bit
            assert torch.equal(params["W_dec"][e, j], before["W_dec"][e, j])
            assert torch.equal(params["W_enc"][e][:, j], before["W_enc"][e][:, j])
            assert counter[i] == counter_before[i]
            for ms, ms_before in zip((state.m, state.v), moments_before):
                assert torch.equal(ms["W_dec"][e, j], ms_before["W_dec"][e, j])
            continue
        row = params["W_dec"][e, j].numpy().astype(np.float64)
        ours = residual[out.expert.numpy() == e]
        cos = ours @ row / np.linalg.norm(ours, axis=1)
        # a unit residual direction of one of its expert's tokens: float32 rounding only
        assert abs(np.linalg.norm(row) - 1) < 1e-5 and cos.max() > 1 - 1e-5
        live = [jj for jj in range(m) if e * m + jj not in expected]
        enc_norm = before["W_enc"][e][:, live].norm(dim=0).mean()
        torch.testing.assert_close(params["W_enc"][e][:, j], params["W_dec"][e, j] * enc_norm)
        assert counter[i] == 0
        for ms in (state.m, state.v):
            assert not ms["W_dec"][e, j].any() and not ms["W_enc"][e][:, j].any()


def test_orient_turns_every_latent_towards_its_experts_data_and_keeps_the_pairs_tied():
    _, _, params, x = _setup(1)
    before = {n: t.clone() for n, t in params.items()}
    flipped = dead_latents.orient(params, x)
    expert = ((x - params["b_router"]) @ params["W_router"].T).argmax(1)
    negated = 0
    for e in range(CFG.n_experts):
        rows = x[expert == e]
        offset = (rows.mean(0) if len(rows) else params["W_router"][e]) - params["b_pre"]
        assert (offset @ params["W_enc"][e] >= 0).all()
        sign = torch.sign((params["W_enc"][e] * before["W_enc"][e]).sum(0))  # +1 kept, -1 negated
        assert torch.equal(params["W_enc"][e], before["W_enc"][e] * sign)
        assert torch.equal(params["W_dec"][e], before["W_dec"][e] * sign[:, None])
        negated += int((sign < 0).sum())
    assert flipped == negated > 0


def test_latent_balance_loss_is_the_switch_loss_over_each_experts_latents():
    be, _, params, x = _setup(2)
    out = forward(params, x, CFG, be)
    got = float(dead_latents.latent_balance_loss(params, x, out, CFG))
    m, p = CFG.expert_width, {n: t.numpy().astype(np.float64) for n, t in params.items()}
    want = 0.0
    for e in range(CFG.n_experts):
        rows = np.flatnonzero(out.expert.numpy() == e)
        pre = (x.numpy()[rows] - p["b_pre"]) @ p["W_enc"][e]
        probs = np.exp(pre - pre.max(1, keepdims=True))
        probs /= probs.sum(1, keepdims=True)
        kept = out.top_values.numpy()[rows] != 0
        f = np.bincount(out.top_indices.numpy()[rows][kept] - e * m, minlength=m) / kept.sum()
        want += len(rows) / len(x) * m * (f * probs.mean(0)).sum()
    assert abs(got - want) < 1e-5 * want  # float32 softmax against float64


def test_dead_only_balancing_changes_only_the_dead_latents_encoder_gradient():
    be, _, params, x = _setup(3)
    dead = torch.zeros(CFG.total_latents, dtype=torch.bool)
    dead[[0, 3, 8, 17]] = True
    _, base = be.loss_and_grads(params, x, CFG, dead)
    _, ours = dead_latents.balancing_backend(be, 1.0, dead_only=True).loss_and_grads(params, x, CFG, dead)
    for name in base:
        if name != "W_enc":
            assert torch.equal(ours[name], base[name])
    diff = (ours["W_enc"] - base["W_enc"]).abs().sum(1).reshape(-1)  # per latent (N * m,)
    assert not diff[~dead].any() and diff[dead].any()
    _, full = dead_latents.balancing_backend(be, 1.0, dead_only=False).loss_and_grads(params, x, CFG, dead)
    assert (full["W_enc"] - base["W_enc"]).abs().sum(1).reshape(-1)[~dead].any()
    assert not torch.equal(full["b_pre"], base["b_pre"])
