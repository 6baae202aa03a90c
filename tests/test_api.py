"""Public API: backend selection, model construction, input checking."""

import os
import subprocess
import sys

import numpy as np
import pytest

import switchsae
from switchsae.backends import REGISTRY, BackendError

CFG = switchsae.SwitchSAEConfig(d_in=8, n_latents=32, n_experts=4, k=3)


def test_use_and_backend_name():
    switchsae.use("numpy")
    assert switchsae.backend_name() == "numpy"
    assert "numpy" in switchsae.installed_backends()


def test_env_variable_selects_backend():
    code = "import switchsae; print(switchsae.backend_name())"
    env = {**os.environ, "SWITCHSAE_BACKEND": "numpy"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "numpy"


def test_unknown_backend_names_installed_ones():
    with pytest.raises(BackendError, match=r"unknown backend 'tensorflow'.*installed: \[.*'numpy'"):
        switchsae.use("tensorflow")


def test_uninstalled_backend_names_the_extra(monkeypatch):
    monkeypatch.setitem(REGISTRY, "fake", ("switchsae.backends.fake", ("no_such_framework",), "fake"))
    with pytest.raises(BackendError, match=r"pip install 'switchsae\[fake\]'"):
        switchsae.use("fake")


def test_init_is_deterministic_and_matches_spec_shapes():
    switchsae.use("numpy")
    a, b = switchsae.SwitchSAE.init(CFG, seed=3), switchsae.SwitchSAE.init(CFG, seed=3)
    for name, shape in CFG.param_shapes().items():
        assert a.params[name].shape == shape
        np.testing.assert_array_equal(a.params[name], b.params[name])
    norms = np.linalg.norm(a.params["W_dec"], axis=-1)
    np.testing.assert_allclose(norms, 1.0, rtol=1e-5)
    # W_dec is the transposed encoder, rows normalised (paper's init)
    enc = np.swapaxes(a.params["W_enc"], 1, 2)
    cos = np.sum(enc * a.params["W_dec"], -1) / np.linalg.norm(enc, axis=-1)
    np.testing.assert_allclose(cos, 1.0, rtol=1e-5)


def test_from_params_rejects_wrong_shapes_and_names():
    params = switchsae.SwitchSAE.init(CFG).numpy_params()
    with pytest.raises(switchsae.InputError, match=r"W_enc has shape \(4, 8, 7\), config needs \(4, 8, 8\)"):
        switchsae.SwitchSAE.from_params(CFG, {**params, "W_enc": np.zeros((4, 8, 7))})
    with pytest.raises(switchsae.InputError, match=r"missing \['b_pre'\]"):
        switchsae.SwitchSAE.from_params(CFG, {k: v for k, v in params.items() if k != "b_pre"})


@pytest.mark.parametrize("x, message", [
    (np.zeros((4, 7)), r"shape \(batch, 8\); got \(4, 7\)"),
    (np.zeros(8), r"shape \(batch, 8\); got \(8,\)"),
    (np.zeros((0, 8)), "empty"),
    (np.zeros((4, 8), dtype=np.int32), "floating-point"),
    (np.array([[0.0] * 8, [np.nan] + [0.0] * 7]), "non-finite values .* row 1"),
])
def test_bad_input_gets_a_clear_error(x, message):
    sae = switchsae.SwitchSAE.init(CFG, backend=switchsae.get_backend("numpy"))
    with pytest.raises(switchsae.InputError, match=message):
        sae.forward(x)


def test_forward_fields_and_decode_round_trip():
    sae = switchsae.SwitchSAE.init(CFG, backend=switchsae.get_backend("numpy"))
    x = np.random.default_rng(0).normal(size=(16, 8))
    out = sae.forward(x)
    assert set(out.losses) == {"mse", "lb", "auxk", "total"}
    np.testing.assert_allclose(sae.decode(out.top_values, out.top_indices), out.x_hat, rtol=1e-6)
    values, indices, expert = sae.encode(x)
    assert np.all(indices // CFG.expert_width == expert[:, None])


def test_decode_round_trip_with_shared_expert_and_two_experts_per_token():
    cfg = switchsae.SwitchSAEConfig(d_in=8, n_latents=32, n_experts=4, k=5, experts_per_token=2,
                                    shared_latents=6, shared_k=2)
    sae = switchsae.SwitchSAE.init(cfg, backend=switchsae.get_backend("numpy"))
    out = sae.forward(np.random.default_rng(1).normal(size=(16, 8)))
    assert out.expert.shape == (16, 2) and np.all(out.top_indices[:, 3:] >= 32)
    np.testing.assert_allclose(sae.decode(out.top_values, out.top_indices), out.x_hat, rtol=1e-5, atol=1e-6)
