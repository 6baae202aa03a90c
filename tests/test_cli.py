"""`switchsae train | eval | harvest`: outputs, help, and clear errors before any work."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from switchsae.cli import build_parser, main
from switchsae.data import ShardWriter

D = 24
SMALL = ["--backend", "numpy", "--no-progress", "--latents", "96", "--experts", "4", "--k", "4",
         "--steps", "30", "--batch-size", "64", "--lr", "1e-2", "--warmup", "2", "--eval-tokens", "512"]


def _shards(path, n=1500, d=D, dtype=np.float32, nan_row=None):
    rng = np.random.default_rng(0)
    x = (rng.exponential(1.0, size=(n, 48)) * (rng.random((n, 48)) < 0.08)) @ rng.normal(size=(48, d))
    x = x.astype(dtype)
    if nan_row is not None:
        x[nan_row] = np.nan
    with ShardWriter(path, shard_tokens=500) as writer:
        writer.append(x)
    return path


def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_train_then_eval(tmp_path, capsys):
    data = _shards(tmp_path / "shards")
    code, out, err = _run(capsys, "train", *SMALL, "--data", str(data), "--out", str(tmp_path / "run"))
    assert code == 0, err
    assert "FVU (training data):" in out
    for name in ("report.txt", "curves.png", "eval.json", "metrics.jsonl"):
        assert (tmp_path / "run" / name).is_file(), name
    assert (tmp_path / "run" / "checkpoints" / "step_00000030" / "sae_weights.safetensors").is_file()
    report = (tmp_path / "run" / "report.txt").read_text()
    assert "Feature density" in report and "M=96 N=4 m=24 k=4" in report

    code, out, err = _run(capsys, "eval", str(tmp_path / "run"), str(data), "--backend", "numpy")
    assert code == 0, err
    for label in ("FVU", "normalised MSE", "L0", "dead fraction", "expert load", "load entropy"):
        assert label in out, label
    code, out, _ = _run(capsys, "eval", str(tmp_path / "run"), str(data), "--backend", "numpy", "--json")
    metrics = json.loads(out)
    assert metrics["tokens"] == 1500 and len(metrics["expert_load"]) == 4
    assert metrics["fvu"] == pytest.approx(json.loads((tmp_path / "run" / "eval.json").read_text())["fvu"],
                                           rel=0.05)  # eval.json saw the first 512 tokens only


def test_help_lists_every_option(capsys):
    parser = build_parser()
    for command in ("train", "eval", "harvest"):
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
        text = capsys.readouterr().out
        sub = parser._subparsers._group_actions[0].choices[command]
        for action in sub._actions:
            for flag in action.option_strings:
                assert flag in text, (command, flag)
    result = subprocess.run([sys.executable, "-m", "switchsae", "--help"], capture_output=True, text=True,
                            check=False)
    assert result.returncode == 0 and "train" in result.stdout and "harvest" in result.stdout


@pytest.mark.parametrize("setup, extra, message", [
    (lambda p: _shards(p / "d"), ["--d-in", "32"],
     "--d-in 32 does not match the data, whose activations have d_in=24"),
    (lambda p: p / "missing", [], "does not exist"),
    (lambda p: (p / "d").mkdir(), [], "no activation shards"),
    (lambda p: ((p / "d").mkdir(), (p / "d" / "a.npy").write_bytes(b"not numpy")), [], "cannot read shard"),
    (lambda p: ((p / "d").mkdir(), np.save(p / "d" / "a.npy", np.ones((10, D), np.int32))), [],
     "unsupported dtype int32"),
    (lambda p: _shards(p / "d"), ["--dtype", "bfloat16"], "does not support dtype 'bfloat16'"),
    (lambda p: _shards(p / "d"), ["--k", "50"], "k (50) must be <= latents per expert"),
])
def test_bad_inputs_fail_before_any_work(tmp_path, capsys, setup, extra, message):
    setup(tmp_path)
    code, _, err = _run(capsys, "train", *SMALL, "--data", str(tmp_path / "d"), *extra,
                        "--out", str(tmp_path / "run"))
    assert code == 2
    assert message in err
    assert not (tmp_path / "run").exists()


def test_nan_in_the_data_stops_with_the_step(tmp_path, capsys):
    data = _shards(tmp_path / "d", nan_row=200)
    code, _, err = _run(capsys, "train", *SMALL, "--data", str(data), "--out", str(tmp_path / "run"))
    assert code == 1
    assert "activations hold NaN/inf" in err and "step " in err


def test_refuses_to_train_into_a_used_directory(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "old.txt").write_text("x")
    code, _, err = _run(capsys, "train", *SMALL, "--data", str(_shards(tmp_path / "d")),
                        "--out", str(tmp_path / "run"))
    assert code == 2 and "is not empty and holds no training run (old.txt)" in err


def test_real_activations_harvest_train_eval(tmp_path, capsys):
    """The one test on real activations: MiniLM-L6 over a little text, through every command."""
    text = tmp_path / "corpus.txt"
    text.write_text("\n\n".join(
        f"Paragraph {i}: sparse autoencoders split activations into features; the router sends "
        f"each token to one expert, number {i % 7}, which keeps only its top k latents." for i in range(60)))
    code, out, err = _run(capsys, "harvest", str(tmp_path / "acts"), "--text", str(text), "--layer", "3",
                          "--max-tokens", "2048", "--no-progress")
    assert code == 0, err
    manifest = json.loads((tmp_path / "acts" / "manifest.json").read_text())
    assert manifest["d_in"] == 384 and manifest["total_tokens"] == 2048
    code, out, err = _run(capsys, "train", "--backend", "numpy", "--no-progress",
                          "--data", str(tmp_path / "acts"),
                          "--experts", "2", "--latents", "768", "--k", "16", "--steps", "40",
                          "--batch-size", "256", "--lr", "4e-3", "--out", str(tmp_path / "run"))
    assert code == 0, err
    fvu = json.loads((tmp_path / "run" / "eval.json").read_text())["fvu"]
    # this repetitive text is easy: measured FVU 0.027 after 40 steps; 0.2 catches a broken pipeline
    assert fvu < 0.2, out
    code, out, err = _run(capsys, "eval", str(tmp_path / "run"), str(tmp_path / "acts"), "--backend", "numpy")
    assert code == 0 and "FVU" in out, err


def test_text_without_the_harvest_extra_says_what_to_install(tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "transformers" else real(name, *a))
    code, _, err = _run(capsys, "train", "--backend", "numpy", "--out", str(tmp_path / "run"))
    assert code == 2 and "needs transformers (pip install 'switchsae[harvest]')" in err
    assert not (tmp_path / "run").exists()
