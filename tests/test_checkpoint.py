"""Checkpoints (native format, atomic writes, every backend) and SAELens / sparsify interop."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from safetensors.numpy import save_file
from switchsae.core.init import init_params

import switchsae
from switchsae import SwitchSAE, SwitchSAEConfig
from switchsae.checkpoint import (
    CFG_FILE,
    WEIGHTS_FILE,
    CheckpointError,
    read_checkpoint,
    read_safetensors,
    resolve,
    write_checkpoint,
)
from switchsae.interop import InteropError

CFG = SwitchSAEConfig(d_in=16, n_latents=64, n_experts=4, k=4, encoder_bias=True)
NUMPY = switchsae.get_backend("numpy")
OTHER_BACKENDS = [b for b in switchsae.installed_backends() if b != "numpy"]


def _params(cfg=CFG, seed=0) -> dict:
    """Parameters with every tensor non-trivial (biases non-zero)."""
    rng = np.random.default_rng(seed)
    params = init_params(cfg, seed)
    for name in ("b_pre", "b_router", "b_enc"):
        if name in params:
            params[name] = rng.normal(scale=0.3, size=params[name].shape)
    return {k: v.astype(np.float32) for k, v in params.items()}


def _x(n=64, d=16, seed=1):
    return np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)


# -- native format ------------------------------------------------------------------------
def test_save_load_roundtrip_is_exact(tmp_path):
    sae = SwitchSAE.from_params(CFG, _params(), NUMPY)
    switchsae.save(sae, tmp_path / "ck")
    back = switchsae.load(tmp_path / "ck", backend="numpy")
    assert back.cfg == CFG
    for name, value in sae.numpy_params().items():
        assert np.array_equal(back.numpy_params()[name], value), name
    a, b = sae.forward(_x()), back.forward(_x())
    assert np.array_equal(a.x_hat, b.x_hat) and np.array_equal(a.top_indices, b.top_indices)


def test_layout_is_the_documented_one(tmp_path):
    switchsae.save(SwitchSAE.from_params(CFG, _params(), NUMPY), tmp_path / "ck")
    cfg = json.loads((tmp_path / "ck" / CFG_FILE).read_text())
    assert cfg["format"] == "switchsae" and cfg["format_version"] == 1
    assert {k: cfg[k] for k in ("d_in", "n_latents", "n_experts", "k", "encoder_bias")} == \
        {"d_in": 16, "n_latents": 64, "n_experts": 4, "k": 4, "encoder_bias": True}
    arrays, meta = read_safetensors(tmp_path / "ck" / WEIGHTS_FILE)
    assert {k: v.shape for k, v in arrays.items()} == CFG.param_shapes()
    assert all(v.dtype == np.float32 for v in arrays.values()) and meta["format"] == "switchsae"
    assert sorted(os.listdir(tmp_path)) == ["ck"]  # no temporary directory left behind


def test_checkpoints_move_between_backends(tmp_path, backend_name):
    """Saved on numpy -> loaded on `backend` and back: identical weights, same outputs.
    Tolerance 1e-5: the backends' float32 matmul/reduction orders differ in the last bits."""
    sae = SwitchSAE.from_params(CFG, _params(), NUMPY)
    switchsae.save(sae, tmp_path / "np")
    other = switchsae.load(tmp_path / "np", backend=backend_name)
    switchsae.save(other, tmp_path / backend_name)
    back = switchsae.load(tmp_path / backend_name, backend="numpy")
    for name, value in sae.numpy_params().items():
        assert np.array_equal(other.numpy_params()[name], value), name
        assert np.array_equal(back.numpy_params()[name], value), name
    x = _x()
    ref, out = sae.forward(x), other.forward(x)
    assert np.array_equal(other.backend.to_numpy(out.top_indices), ref.top_indices)
    np.testing.assert_allclose(other.backend.to_numpy(out.x_hat), ref.x_hat, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", [b for b in OTHER_BACKENDS
                                     if "bfloat16" in switchsae.get_backend(b).dtypes])
def test_bfloat16_models_are_stored_as_float32_and_load_anywhere(tmp_path, backend):
    cfg = CFG.replace(dtype="bfloat16")
    sae = SwitchSAE.from_params(cfg, _params(), switchsae.get_backend(backend))
    switchsae.save(sae, tmp_path / "bf16")
    arrays, _ = read_safetensors(tmp_path / "bf16" / WEIGHTS_FILE)
    assert all(a.dtype == np.float32 for a in arrays.values())
    same = switchsae.load(tmp_path / "bf16", backend=backend)
    assert same.cfg.dtype == "bfloat16"
    with pytest.raises(CheckpointError, match="bfloat16 model, which backend 'numpy' does not support"):
        switchsae.load(tmp_path / "bf16", backend="numpy")
    on_numpy = switchsae.load(tmp_path / "bf16", backend="numpy", dtype="float32")
    for name, value in sae.numpy_params().items():  # bf16 values are exact in float32
        assert np.array_equal(same.numpy_params()[name], value)
        assert np.array_equal(on_numpy.numpy_params()[name], value)


def test_bfloat16_safetensors_files_are_read_as_float32(tmp_path):
    """A BF16 tensor (NumPy cannot hold bf16) is widened: bf16 bits are float32's high half."""
    values = np.array([1.0, -2.5, 0.15625, 1.5 * 2.0**120], dtype=np.float32)  # exact in bf16
    bits = (values.view(np.uint32) >> 16).astype("<u2")
    header = json.dumps({"w": {"dtype": "BF16", "shape": [2, 2], "data_offsets": [0, 8]}}).encode()
    (tmp_path / "bf.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + bits.tobytes())
    arrays, _ = read_safetensors(tmp_path / "bf.safetensors")
    assert np.array_equal(arrays["w"], values.reshape(2, 2))


def test_training_state_roundtrip(tmp_path):
    params = _params()
    opt = {"step": 7, "m": {k: v * 0.5 for k, v in params.items()}, "v": {k: v * v for k, v in params.items()}}
    write_checkpoint(tmp_path / "ck", CFG, params, optimizer=opt, trainer_state={"step": 7, "x": [1, 2]})
    ck = read_checkpoint(tmp_path / "ck")
    assert ck.optimizer["step"] == 7 and ck.trainer_state == {"step": 7, "x": [1, 2]}
    for kind in ("m", "v"):
        for name in params:
            assert np.array_equal(ck.optimizer[kind][name], opt[kind][name])


def test_run_directory_resolves_to_newest_checkpoint(tmp_path):
    for step in (5, 40, 10):
        write_checkpoint(tmp_path / "run" / "checkpoints" / f"step_{step:08d}", CFG, _params(seed=step))
    (tmp_path / "run" / "checkpoints" / ".step_00000050.tmp-x").mkdir()  # torn write: ignored
    assert resolve(tmp_path / "run").name == "step_00000040"
    loaded = switchsae.load(tmp_path / "run", backend="numpy")
    assert np.array_equal(loaded.numpy_params()["W_enc"], _params(seed=40)["W_enc"])


# -- nothing corrupt, clear errors --------------------------------------------------------
def test_refuses_to_save_non_finite_weights(tmp_path):
    params = _params()
    params["W_dec"][1, 2, 3] = np.nan
    with pytest.raises(CheckpointError, match="W_dec holds NaN"):
        write_checkpoint(tmp_path / "ck", CFG, params)
    assert os.listdir(tmp_path) == []


def test_failed_write_leaves_the_old_checkpoint_and_no_debris(tmp_path, monkeypatch):
    write_checkpoint(tmp_path / "ck", CFG, _params(seed=1))
    calls = {"n": 0}
    real_fsync = os.fsync

    def failing_fsync(fd):
        calls["n"] += 1
        if calls["n"] == 2:  # after the first file of the new checkpoint
            raise OSError("disk full")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="disk full"):
        write_checkpoint(tmp_path / "ck", CFG, _params(seed=2), overwrite=True)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["ck"]
    assert np.array_equal(read_checkpoint(tmp_path / "ck").params["W_enc"], _params(seed=1)["W_enc"])


def test_does_not_overwrite_foreign_directories(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="not a switchsae checkpoint"):
        switchsae.save(SwitchSAE.from_params(CFG, _params(), NUMPY), tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    (tmp_path / "empty").mkdir()
    switchsae.save(SwitchSAE.from_params(CFG, _params(), NUMPY), tmp_path / "empty")
    assert switchsae.load(tmp_path / "empty", backend="numpy").cfg == CFG


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / WEIGHTS_FILE).write_bytes((d / WEIGHTS_FILE).read_bytes()[:100]), "corrupt"),
    (lambda d: (d / WEIGHTS_FILE).unlink(), "missing"),
    (lambda d: _edit_cfg(d, n_latents=128), "W_dec has shape"),
    (lambda d: _edit_cfg(d, format_version=99), "format_version 99"),
    (lambda d: _edit_cfg(d, k=1000), "invalid config"),
])
def test_damaged_checkpoints_give_clear_errors(tmp_path, damage, message):
    write_checkpoint(tmp_path / "ck", CFG, _params())
    damage(tmp_path / "ck")
    with pytest.raises(CheckpointError, match=message):
        switchsae.load(tmp_path / "ck", backend="numpy")


def _edit_cfg(directory, **changes):
    cfg = json.loads((directory / CFG_FILE).read_text())
    (directory / CFG_FILE).write_text(json.dumps({**cfg, **changes}))


# -- interop: SAELens and sparsify TopK SAEs ----------------------------------------------
def _topk_sae(d=16, n=64, seed=3):
    """Encoder (d, n), biases, decoder (n, d) with rows NOT of unit norm."""
    rng = np.random.default_rng(seed)
    W_enc = rng.normal(size=(d, n)).astype(np.float32) / np.sqrt(d)
    W_dec = (rng.normal(size=(n, d)) * rng.uniform(0.5, 2.0, size=(n, 1))).astype(np.float32)
    return (W_enc, rng.normal(scale=0.2, size=n).astype(np.float32), W_dec,
            rng.normal(scale=0.5, size=d).astype(np.float32))


def _reference_topk(x, W_enc, b_enc, W_dec, b_dec, k, center=True):
    """The TopK SAE formula, written out in float64: top k of the pre-activations, ReLU,
    dense decode."""
    x = x.astype(np.float64)
    pre = ((x - b_dec) if center else x) @ W_enc + b_enc
    idx = np.argsort(-pre, axis=-1)[:, :k]
    acts = np.zeros_like(pre)
    np.put_along_axis(acts, idx, np.maximum(np.take_along_axis(pre, idx, -1), 0), axis=-1)
    return acts @ W_dec + b_dec


def _check_matches(sae, reference):
    """float32 model vs float64 formula: agreement to ~1e-5 relative."""
    x = _x(n=128)
    np.testing.assert_allclose(sae.forward(x).x_hat, reference(x), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("apply_b_dec", [True, False])
def test_saelens_topk_loads_as_one_expert(tmp_path, apply_b_dec):
    W_enc, b_enc, W_dec, b_dec = _topk_sae()
    save_file({"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec},
              str(tmp_path / "sae_weights.safetensors"))
    (tmp_path / "cfg.json").write_text(json.dumps({
        "architecture": "topk", "d_in": 16, "d_sae": 64, "k": 5, "dtype": "float32", "device": "cpu",
        "apply_b_dec_to_input": apply_b_dec, "normalize_activations": "none",
        "reshape_activations": "none", "meta": {"hook_name": "blocks.3.hook_resid_post"}}))
    sae = switchsae.load(tmp_path, backend="numpy")
    assert (sae.cfg.n_experts, sae.cfg.n_latents, sae.cfg.k, sae.cfg.encoder_bias) == (1, 64, 5, True)
    _check_matches(sae, lambda x: _reference_topk(x, W_enc, b_enc, W_dec, b_dec, 5, center=apply_b_dec))


def test_older_saelens_topk_config(tmp_path):
    """Older SAELens: architecture "standard" with activation_fn_str "topk" and k in kwargs."""
    W_enc, b_enc, W_dec, b_dec = _topk_sae(seed=4)
    save_file({"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec},
              str(tmp_path / "sae_weights.safetensors"))
    (tmp_path / "cfg.json").write_text(json.dumps({
        "architecture": "standard", "d_in": 16, "d_sae": 64, "activation_fn_str": "topk",
        "activation_fn_kwargs": {"k": 3}, "apply_b_dec_to_input": True}))
    _check_matches(switchsae.load(tmp_path, backend="numpy"),
                   lambda x: _reference_topk(x, W_enc, b_enc, W_dec, b_dec, 3))


def test_sparsify_topk_loads_as_one_expert(tmp_path):
    W_enc, b_enc, W_dec, b_dec = _topk_sae(seed=5)
    save_file({"encoder.weight": np.ascontiguousarray(W_enc.T), "encoder.bias": b_enc,
               "W_dec": W_dec, "b_dec": b_dec}, str(tmp_path / "sae.safetensors"))
    (tmp_path / "cfg.json").write_text(json.dumps({
        "activation": "topk", "expansion_factor": 4, "normalize_decoder": True, "num_latents": 64,
        "k": 6, "multi_topk": False, "skip_connection": False, "transcode": False, "d_in": 16}))
    sae = switchsae.load(tmp_path, backend="numpy")
    assert sae.cfg.extra["converted_from"] == "sparsify"
    _check_matches(sae, lambda x: _reference_topk(x, W_enc, b_enc, W_dec, b_dec, 6))
    switchsae.save(sae, tmp_path / "converted")  # and it becomes a native checkpoint
    _check_matches(switchsae.load(tmp_path / "converted", backend="numpy"),
                   lambda x: _reference_topk(x, W_enc, b_enc, W_dec, b_dec, 6))


@pytest.mark.parametrize("cfg, message", [
    ({"architecture": "jumprelu", "d_in": 16, "d_sae": 64}, "not a TopK SAE"),
    ({"architecture": "topk", "k": 4, "normalize_activations": "layer_norm"}, "layer_norm"),
])
def test_unsupported_saelens_configs_are_rejected(tmp_path, cfg, message):
    W_enc, b_enc, W_dec, b_dec = _topk_sae()
    save_file({"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec},
              str(tmp_path / "sae_weights.safetensors"))
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(InteropError, match=message):
        switchsae.load(tmp_path, backend="numpy")


def test_malformed_sparsify_checkpoint_is_rejected(tmp_path):
    W_enc, _, W_dec, b_dec = _topk_sae()
    save_file({"encoder.weight": np.ascontiguousarray(W_enc.T), "W_dec": W_dec, "b_dec": b_dec},
              str(tmp_path / "sae.safetensors"))
    (tmp_path / "cfg.json").write_text(json.dumps({"k": 4, "d_in": 16}))
    with pytest.raises(InteropError, match=r"missing tensors \['encoder.bias'\]"):
        switchsae.load(tmp_path, backend="numpy")
