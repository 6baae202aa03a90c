"""SAELens and sparsify: their own SAEs load here, ours load there (the peers' own code
writes and reads their files), and every foreign option maps exactly or is refused."""

from __future__ import annotations

import json
import os

os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")  # sparsify's Triton decoder needs a GPU

import numpy as np
import pytest
import sae_lens
import torch
from safetensors.numpy import load_file, save_file
from sae_lens import SAE, TopKSAE, TopKSAEConfig
from sparsify import SparseCoder, SparseCoderConfig

import switchsae
import switchsae.integrations.saelens  # noqa: F401  registers architecture "switch"
from switchsae import SwitchSAE, SwitchSAEConfig
from switchsae.cli import main
from switchsae.core.init import init_params
from switchsae.interop import InteropError

D, M = 16, 64


def _x(n=96, seed=0):
    return np.random.default_rng(seed).normal(size=(n, D)).astype(np.float32)


def _randomise(module, seed=0):
    """Every parameter of a peer's SAE random, decoder rows of norms 0.5 .. 2 (not unit)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        w = module.W_dec
        w.mul_(torch.rand(w.shape[0], 1, generator=g) * 1.5 + 0.5)
    return module


def _rel(a, b) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


def _saelens_topk(tmp_path, seed=0, **cfg):
    sae = _randomise(TopKSAE(TopKSAEConfig(d_in=D, d_sae=M, k=5, **cfg)), seed)
    sae.save_model(tmp_path / "saelens")
    return sae, tmp_path / "saelens"


@pytest.mark.parametrize("options", [
    {"rescale_acts_by_decoder_norm": True},   # what SAELens's trainer checkpoints carry
    {"rescale_acts_by_decoder_norm": True, "apply_b_dec_to_input": False},
    {"apply_b_dec_to_input": False},
])
def test_saelens_topk_loads_and_matches_saelens(tmp_path, options):
    theirs, path = _saelens_topk(tmp_path, **options)
    ours = switchsae.load(path, backend="numpy")
    x = _x()
    with torch.no_grad():
        expected = theirs(torch.from_numpy(x)).numpy()
    # float32 on both sides; folding the decoder norms rounds each weight once: 1e-5 relative
    assert _rel(ours.forward(x).x_hat, expected) < 1e-5
    # the same latents fire: SAELens's dense codes, ours as (value, id) pairs
    with torch.no_grad():
        dense = theirs.encode(torch.from_numpy(x)).numpy()
    values, ids, _ = ours.encode(x)
    mine = np.zeros_like(dense)
    np.put_along_axis(mine, np.asarray(ids), np.asarray(values), axis=-1)
    np.testing.assert_allclose(mine, dense, rtol=1e-5, atol=1e-5)


def test_rescaling_with_a_zero_decoder_row_is_refused(tmp_path):
    _, path = _saelens_topk(tmp_path, rescale_acts_by_decoder_norm=True)
    tensors = load_file(str(path / "sae_weights.safetensors"))
    tensors["W_dec"][3] = 0
    save_file(tensors, str(path / "sae_weights.safetensors"))
    with pytest.raises(InteropError, match="rescale_acts_by_decoder_norm=true with 1 zero decoder"):
        switchsae.load(path, backend="numpy")


def _edit_cfg(path, **changes):
    cfg = json.loads((path / "cfg.json").read_text())
    cfg.update(changes)
    (path / "cfg.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("changes, message", [
    ({"apply_b_dec_to_input": "false"}, "apply_b_dec_to_input must be true or false"),
    ({"rescale_acts_by_decoder_norm": 1}, "rescale_acts_by_decoder_norm must be true or false"),
    ({"k": 4.9}, "k must be an integer, got 4.9"),
    ({"k": "abc"}, "k must be an integer, got 'abc'"),
    ({"k": [4]}, r"k must be an integer, got \[4\]"),
    ({"k": None}, "k must be an integer, got None"),
    ({"k": 0}, "k must be >= 1"),
    ({"k": 65}, "k=65 exceeds d_sae=64"),
    ({"d_sae": 63}, "d_sae=63 but the weights have d_sae=64"),
    ({"architecture": "jumprelu"}, "architecture='jumprelu'.*is not a TopK SAE"),
    ({"architecture": "standard"}, "is not a TopK SAE"),
    ({"normalize_activations": "layer_norm"}, "normalize_activations='layer_norm' rescales each token"),
    ({"normalize_activations": "whatever"}, "normalize_activations must be one of"),
    ({"reshape_activations": "hook_q"}, "reshape_activations must be one of"),
    ({"metadata": [1]}, "metadata must be a JSON object"),
])
def test_saelens_options_are_mapped_or_refused_by_name(tmp_path, changes, message):
    _, path = _saelens_topk(tmp_path)
    _edit_cfg(path, **changes)
    with pytest.raises(InteropError, match=message):
        switchsae.load(path, backend="numpy")


def _legacy_saelens(tmp_path, cfg, tensors=None):
    """A SAELens < 6 layout written by hand (SAELens 6 no longer writes it)."""
    rng = np.random.default_rng(1)
    w = tensors or {"W_enc": rng.normal(size=(D, M)), "b_enc": rng.normal(size=M),
                    "W_dec": rng.normal(size=(M, D)), "b_dec": rng.normal(size=D)}
    path = tmp_path / "legacy"
    path.mkdir()
    save_file({k: np.asarray(v, np.float32) for k, v in w.items()}, str(path / "sae_weights.safetensors"))
    (path / "cfg.json").write_text(json.dumps(cfg) if not isinstance(cfg, str) else cfg)
    return path


@pytest.mark.parametrize("cfg, message", [
    ({"activation_fn_str": "topk", "activation_fn_kwargs": [4]}, "activation_fn_kwargs must be a JSON object"),
    ({"activation_fn_str": "topk", "activation_fn_kwargs": {"k": "4"}}, "k must be an integer"),
    ({"activation_fn_str": "topk", "activation_fn_kwargs": {}}, "needs k"),
    ({"activation_fn_str": "topk", "k": 3, "activation_fn_kwargs": {"k": 4}}, "disagrees"),
    ({"activation_fn_str": "relu"}, "not a TopK SAE"),
    ([1, 2], "must hold a JSON object"),
])
def test_legacy_saelens_cfg_errors(tmp_path, cfg, message):
    with pytest.raises(InteropError, match=message):
        switchsae.load(_legacy_saelens(tmp_path, cfg), backend="numpy")


def test_cfg_nested_100000_deep_is_a_clear_error(tmp_path):
    path = _legacy_saelens(tmp_path, "[" * 100_000 + "]" * 100_000)
    with pytest.raises(InteropError, match="nested too deeply"):
        switchsae.load(path, backend="numpy")


@pytest.mark.parametrize("tensors, message", [
    ({"W_enc": np.ones(D), "b_enc": np.ones(M), "W_dec": np.ones((M, D)), "b_dec": np.ones(D)},
     r"W_enc has shape \(16,\), expected 2 dimensions"),
    ({"W_enc": np.ones((1, D, M)), "b_enc": np.ones(M), "W_dec": np.ones((M, D)), "b_dec": np.ones(D)},
     r"W_enc has shape \(1, 16, 64\), expected 2 dimensions"),
    ({"W_enc": np.ones((D, M)), "b_enc": np.ones(M), "W_dec": np.ones((M, D)), "b_dec": np.ones(D),
      "scaling_factor": np.full(3, 2.0)}, r"scaling_factor has shape \(3,\), expected \(64,\)"),
    ({"W_enc": np.full((D, M), np.nan), "b_enc": np.ones(M), "W_dec": np.ones((M, D)), "b_dec": np.ones(D)},
     "W_enc holds NaN or inf"),
    ({"W_enc": np.ones((D, M)), "b_enc": np.ones(M), "W_dec": np.ones((M, D)), "b_dec": np.ones(D),
      "scaling_factor": np.full(M, 2.0)}, "finetuning_scaling_factor is false"),
])
def test_malformed_saelens_weights_are_refused(tmp_path, tensors, message):
    cfg = {"architecture": "topk", "k": 4}
    with pytest.raises(InteropError, match=message):
        switchsae.load(_legacy_saelens(tmp_path, cfg, tensors), backend="numpy")


def test_cli_prints_one_line_and_exits_2_on_a_bad_foreign_cfg(tmp_path, capsys):
    _, path = _saelens_topk(tmp_path)
    _edit_cfg(path, k="abc")
    assert main(["eval", str(path), str(tmp_path / "nodata")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("switchsae eval: error:") and "k must be an integer" in err[0]


# -- sparsify ------------------------------------------------------------------------------
def _sparsify_sae(seed=0, **cfg):
    return _randomise(SparseCoder(D, SparseCoderConfig(num_latents=M, k=6, **cfg)), seed)


def test_sparsify_sae_and_trainer_layout_load_and_match(tmp_path):
    theirs = _sparsify_sae()
    theirs.save_to_disk(tmp_path / "run" / "layers.1")  # sparsify's trainer: <run>/<hookpoint>/
    x = _x()
    with torch.no_grad():
        expected = theirs(torch.from_numpy(x)).sae_out.numpy()
    for path in (tmp_path / "run" / "layers.1", tmp_path / "run"):
        ours = switchsae.load(path, backend="numpy")
        assert _rel(ours.forward(x).x_hat, expected) < 1e-5  # float32 both sides, different sum order
    _sparsify_sae(1).save_to_disk(tmp_path / "run" / "layers.2")
    with pytest.raises(InteropError, match="2 hookpoints; load one of them: .*layers.1, .*layers.2"):
        switchsae.load(tmp_path / "run", backend="numpy")


@pytest.mark.parametrize("changes, message", [
    ({"skip_connection": True}, "skip_connection=true"),
    ({"transcode": True}, "transcode=true"),
    ({"activation": "groupmax"}, "groupmax"),
    ({"k": "6"}, "k must be an integer"),
    ({"num_latents": 32}, r"encoder.weight has shape \(64, 16\), expected \(32, 16\)"),
])
def test_sparsify_options_are_refused_by_name(tmp_path, changes, message):
    _sparsify_sae().save_to_disk(tmp_path / "sp")
    _edit_cfg(tmp_path / "sp", **changes)
    with pytest.raises(InteropError, match=message):
        switchsae.load(tmp_path / "sp", backend="numpy")


# -- export ----------------------------------------------------------------------------------
def _switch_sae(**cfg) -> SwitchSAE:
    cfg = SwitchSAEConfig(**{"d_in": D, "n_latents": M, "k": 6, "encoder_bias": True, **cfg})
    rng = np.random.default_rng(7)
    params = {k: (v + rng.normal(scale=0.2, size=v.shape)).astype(np.float32)
              for k, v in init_params(cfg, 0).items()}
    return SwitchSAE.from_params(cfg, params, "torch")


@pytest.mark.parametrize("cfg", [
    {"n_experts": 1},
    {"n_experts": 8},
    {"n_experts": 4, "experts_per_token": 2, "shared_latents": 8, "shared_k": 2},
    {"n_experts": 4, "router_scale": "hard", "encoder_bias": False},
])
def test_export_to_saelens_loads_in_saelens_and_reproduces_x_hat(tmp_path, cfg):
    ours = _switch_sae(**cfg)
    x = _x()
    x_hat = ours.backend.to_numpy(ours.forward(x).x_hat)
    out = switchsae.export(ours, tmp_path / "exported", format="saelens",
                           metadata={"hook_name": "blocks.1.hook_resid_pre"})
    theirs = SAE.load_from_disk(out)
    assert type(theirs).__name__ == ("TopKSAE" if cfg["n_experts"] == 1 else "SwitchSAE")
    with torch.no_grad():
        acts = theirs.encode(torch.from_numpy(x))
        decoded = theirs.decode(acts).numpy()
        forward = theirs(torch.from_numpy(x)).numpy()
    assert acts.shape == (len(x), M + cfg.get("shared_latents", 0))
    assert int((acts != 0).sum(-1).max()) <= ours.cfg.k
    assert _rel(decoded, x_hat) < 1e-4 and _rel(forward, x_hat) < 1e-4  # float32, other sum order
    assert theirs.cfg.metadata.hook_name == "blocks.1.hook_resid_pre"
    # ours -> theirs -> ours: SAELens saves it again, we load that: the very same weights
    theirs.save_model(tmp_path / "resaved")
    back = switchsae.load(tmp_path / "resaved", backend="torch")
    np.testing.assert_array_equal(back.backend.to_numpy(back.forward(x).x_hat), x_hat)
    assert {k: v for k, v in back.cfg.to_dict().items() if k not in ("extra", "dtype")} == \
        {k: v for k, v in ours.cfg.to_dict().items() if k not in ("extra", "dtype")}


def test_export_to_sparsify_loads_in_sparsify(tmp_path):
    ours = _switch_sae(n_experts=1)
    x = _x()
    x_hat = ours.backend.to_numpy(ours.forward(x).x_hat)
    out = switchsae.export(ours, tmp_path / "sp", format="sparsify")
    theirs = SparseCoder.load_from_disk(out)
    with torch.no_grad():
        assert _rel(theirs(torch.from_numpy(x)).sae_out.numpy(), x_hat) < 1e-4
    theirs.save_to_disk(tmp_path / "resaved")
    back = switchsae.load(tmp_path / "resaved", backend="torch")
    np.testing.assert_array_equal(back.backend.to_numpy(back.forward(x).x_hat), x_hat)


def test_export_refusals_and_cli(tmp_path, capsys):
    ours = _switch_sae(n_experts=8)
    with pytest.raises(InteropError, match="sparsify has only plain TopK SAEs; this one has n_experts=8"):
        switchsae.export(ours, tmp_path / "sp", format="sparsify")
    assert not (tmp_path / "sp").exists()
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "mine.txt").write_text("keep")
    with pytest.raises(InteropError, match="already exists"):
        switchsae.export(ours, tmp_path / "taken", format="saelens")
    assert (tmp_path / "taken" / "mine.txt").read_text() == "keep"
    with pytest.raises(InteropError, match="format must be one of"):
        switchsae.export(ours, tmp_path / "x", format="onnx")
    switchsae.save(ours, tmp_path / "ckpt")
    assert main(["export", str(tmp_path / "ckpt"), str(tmp_path / "cli"), "--format", "saelens"]) == 0
    assert sorted(p.name for p in (tmp_path / "cli").iterdir()) == ["cfg.json", "sae_weights.safetensors"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind
    assert main(["export", str(tmp_path / "ckpt"), str(tmp_path / "sp2"), "--format", "sparsify"]) == 2
    assert "sparsify has only plain TopK" in capsys.readouterr().err
    assert sae_lens.SAE.load_from_disk(tmp_path / "cli").cfg.n_experts == 8
