"""Resuming: a run continued from a checkpoint ends with the same weights as one that never
stopped, in-process and after SIGKILL of the `switchsae train` process."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import switchsae
from switchsae import SwitchSAEConfig
from switchsae.checkpoint import list_checkpoints, read_checkpoint
from switchsae.data import ArraySource, ShardWriter
from switchsae.training import TrainConfig, Trainer

NUMPY = switchsae.get_backend("numpy")
CFG = SwitchSAEConfig(d_in=24, n_latents=96, n_experts=4, k=4, auxk_coef=1 / 32, dead_tokens=200)


def data(n=3000, d=24, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    atoms = rng.normal(size=(64, d))
    codes = rng.exponential(1.0, size=(n, 64)) * (rng.random((n, 64)) < 0.05)
    return (codes @ atoms + 1.0).astype(np.float32)


def _weights(path) -> dict:
    return read_checkpoint(path).params


def test_resume_in_process_matches_an_uninterrupted_run(tmp_path):
    """Same data order, Adam state, dead counters (AuxK is on) and schedule.  Tolerance 2e-6
    absolute (weights are O(0.1-1)): NumPy's SIMD reductions round by the memory alignment of
    freshly allocated arrays, so a resumed process can differ from the original in the last
    float32 bits (measured: 6e-8 after 40 steps, 4e-7 after 1000); a resume bug (wrong batch,
    lost Adam or dead-latent state) gives differences of 1e-3 and more."""
    tc = TrainConfig(steps=40, batch_size=100, lr=5e-3, log_every=5, checkpoint_every=10,
                     keep_checkpoints=10, out_dir=str(tmp_path / "full"))
    full = Trainer(CFG, tc, ArraySource(data(), 100, seed=3), NUMPY, progress=False).run()
    assert any(r["loss_auxk"] > 0 for r in full.history)  # the dead counters matter here

    partial = tmp_path / "partial" / "checkpoints"
    partial.mkdir(parents=True)
    shutil.copytree(tmp_path / "full" / "checkpoints" / "step_00000020", partial / "step_00000020")
    shutil.copy(tmp_path / "full" / "metrics.jsonl", tmp_path / "partial" / "metrics.jsonl")
    resumed = Trainer.resume(tmp_path / "partial", ArraySource(data(), 100, seed=3), NUMPY, progress=False)
    assert resumed.step == 20 and resumed.out_dir == tmp_path / "partial"
    result = resumed.run()
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "partial")
    for name in a:
        np.testing.assert_allclose(b[name], a[name], rtol=0, atol=2e-6, err_msg=name)
    assert [r["step"] for r in result.history] == list(range(5, 41, 5))
    np.testing.assert_allclose([r["fvu"] for r in result.history], [r["fvu"] for r in full.history], rtol=1e-5)


def test_a_checkpoint_without_training_state_cannot_be_resumed(tmp_path):
    switchsae.save(switchsae.SwitchSAE.init(CFG, backend=NUMPY), tmp_path / "plain")
    with pytest.raises(switchsae.checkpoint.CheckpointError, match="no training state"):
        Trainer.resume(tmp_path / "plain", ArraySource(data(), 100), NUMPY)


def _train_cmd(*args) -> list:
    return [sys.executable, "-m", "switchsae", "train", "--backend", "numpy", "--no-progress", *args]


def test_sigkill_then_resume_ends_with_the_same_weights(tmp_path):
    """Kill -9 the CLI right after its first checkpoint, resume, compare with a run that was
    never interrupted (tolerance as in the in-process test)."""
    with ShardWriter(tmp_path / "shards", shard_tokens=1000) as writer:
        writer.append(data())
    opts = ["--data", str(tmp_path / "shards"), "--d-in", "24", "--latents", "96", "--experts", "4",
            "--k", "4", "--steps", "600", "--batch-size", "64", "--lr", "5e-3", "--warmup", "5",
            "--checkpoint-every", "10", "--log-every", "5", "--dead-tokens", "200", "--eval-tokens", "256"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}

    killed = tmp_path / "killed"
    proc = subprocess.Popen(_train_cmd(*opts, "--out", str(killed)), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not list_checkpoints(killed) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = list_checkpoints(killed)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()
    assert saved and saved[-1].name != "step_00000600", "the run finished before it could be killed"

    resumed = subprocess.run(_train_cmd("--resume", str(killed)), env=env, capture_output=True,
                             text=True, timeout=300, check=False)
    assert resumed.returncode == 0, resumed.stderr
    assert "FVU" in resumed.stdout
    full = subprocess.run(_train_cmd(*opts, "--out", str(tmp_path / "full")), env=env,
                          capture_output=True, text=True,
                          timeout=300, check=False)
    assert full.returncode == 0, full.stderr

    a, b = _weights(tmp_path / "full"), _weights(killed)
    for name in a:
        np.testing.assert_allclose(b[name], a[name], rtol=0, atol=2e-6, err_msg=name)
    steps = [json.loads(line)["step"] for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(5, 601, 5))  # the killed run's extra lines were dropped
    assert not [p for p in (killed / "checkpoints").iterdir() if p.name.startswith(".")]


def test_resume_rejects_settings_given_again(tmp_path, capsys):
    from switchsae.cli import main

    assert main(["train", "--resume", str(tmp_path), "--lr", "0.1", "--backend", "numpy"]) == 2
    assert "--resume takes its settings from the checkpoint; drop --lr" in capsys.readouterr().err
