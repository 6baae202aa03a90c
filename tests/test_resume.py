"""Resuming: a run continued from a checkpoint ends with exactly the weights (np.array_equal)
of one that never stopped, in-process and after SIGKILL at any point of the run: between
steps, inside a checkpoint save, before and inside pruning (the points are named by
$SWITCHSAE_CRASH_AT, see `switchsae.files.crash_point`), on numpy and torch."""

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
from switchsae.checkpoint import CHECKPOINTS_DIR, CFG_FILE, list_checkpoints, read_checkpoint
from switchsae.data import ArraySource, ShardWriter
from switchsae.files import CRASH_ENV
from switchsae.training import TrainConfig, Trainer
from switchsae.training.metrics_log import read_metrics

NUMPY = switchsae.get_backend("numpy")
# dead after 60 tokens of its expert (~25 a step): AuxK is live within the first steps
CFG = SwitchSAEConfig(d_in=24, n_latents=96, n_experts=4, k=4, auxk_coef=1 / 32, dead_tokens=60)
# 40 steps, checkpoints at 10, 20, 30, 40, two kept: pruning at 30 and 40
TC = TrainConfig(steps=40, batch_size=64, lr=5e-3, warmup_steps=5, log_every=5, checkpoint_every=10,
                 keep_checkpoints=2)


def data(n=3000, d=24, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    atoms = rng.normal(size=(64, d))
    codes = rng.exponential(1.0, size=(n, 64)) * (rng.random((n, 64)) < 0.05)
    return (codes @ atoms + 1.0).astype(np.float32)


def _source(batch=64):
    return ArraySource(data(), batch, seed=3)


def _weights(path) -> dict:
    return read_checkpoint(path).params


def _assert_equal_weights(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for name in a:
        assert np.array_equal(a[name], b[name]), (name, float(np.abs(a[name] - b[name]).max()))


def _assert_tidy(run) -> None:
    """No hidden leftovers of a killed writer, every visible checkpoint complete."""
    entries = list((run / CHECKPOINTS_DIR).iterdir())
    assert not [p.name for p in entries if p.name.startswith(".")]
    assert all((p / CFG_FILE).is_file() for p in entries)


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_resume_in_process_from_every_checkpoint_matches_an_uninterrupted_run(tmp_path, backend):
    """Same data order, Adam state, dead counters (AuxK is on), schedule, gradient clipping
    and (torch) memory layout of W_enc: bit for bit, from each of the run's checkpoints."""
    tc = TC.replace(keep_checkpoints=10, out_dir=str(tmp_path / "full"))
    full = Trainer(CFG, tc, _source(), backend, progress=False).run()
    assert any(r["loss_auxk"] > 0 for r in full.history)  # the dead counters matter here
    for start in (10, 20, 30):
        partial = tmp_path / f"from{start}"
        (partial / CHECKPOINTS_DIR).mkdir(parents=True)
        name = f"step_{start:08d}"
        shutil.copytree(tmp_path / "full" / CHECKPOINTS_DIR / name, partial / CHECKPOINTS_DIR / name)
        shutil.copy(tmp_path / "full" / "metrics.jsonl", partial / "metrics.jsonl")
        resumed = Trainer.resume(partial, _source(), backend, progress=False)
        assert resumed.step == start and resumed.out_dir == partial
        result = resumed.run()
        _assert_equal_weights(_weights(tmp_path / "full"), _weights(partial))
        assert [r["step"] for r in result.history] == list(range(5, 41, 5))
        assert [r["fvu"] for r in result.history] == [r["fvu"] for r in full.history]


def test_a_checkpoint_without_training_state_cannot_be_resumed(tmp_path):
    switchsae.save(switchsae.SwitchSAE.init(CFG, backend=NUMPY), tmp_path / "plain")
    with pytest.raises(switchsae.checkpoint.CheckpointError, match="no training state"):
        Trainer.resume(tmp_path / "plain", ArraySource(data(), 100), NUMPY)


# -- SIGKILL at named points ----------------------------------------------------------------
# a killed process trains CFG / TC on data() into argv[1] with backend argv[2]
_TRAIN = """
import json, sys
import numpy as np
from switchsae import SwitchSAEConfig
from switchsae.data import ArraySource
from switchsae.training import TrainConfig, Trainer
cfg, tc = SwitchSAEConfig.from_dict(json.loads(sys.argv[3])), TrainConfig.from_dict(json.loads(sys.argv[4]))
source = ArraySource(np.load(sys.argv[5]), tc.batch_size, seed=3)
Trainer(cfg, tc.replace(out_dir=sys.argv[1]), source, sys.argv[2], progress=False).run()
"""
# each checkpoint writes 4 files (weights, optimizer, trainer state, cfg.json): file #6 is inside
# the second one; "complete" is a checkpoint fully written under its temporary name
CRASHES = [
    ("numpy", "trainer:step#25"),              # between two checkpoints
    ("numpy", "write_dir:file#1"),             # inside the first checkpoint: nothing to resume
    ("numpy", "write_dir:complete#1"),         # the first checkpoint written, not yet in place
    ("numpy", "write_dir:file#6"),             # inside the second checkpoint
    ("numpy", "write_dir:renamed#3"),          # step 30 in place, step 10 not yet pruned
    ("numpy", "remove_dir:renamed#1"),         # inside pruning step 10
    ("numpy", "trainer:checkpoint_written#4"),  # the final checkpoint written, before pruning
    ("torch", "trainer:step#25"),
    ("torch", "write_dir:file#6"),
    ("torch", "remove_dir:renamed#1"),
]


def same_threads() -> dict:
    """The environment that gives a child process this process's torch thread count: bit-exact
    resume is claimed on one configuration, and a sum split over another number of threads
    rounds differently (another test may have set this process to one thread)."""
    import torch

    return {"OMP_NUM_THREADS": str(torch.get_num_threads())}


@pytest.fixture(scope="module")
def killed_runs(tmp_path_factory):
    """Every crash of CRASHES, run as concurrent processes killed at their point."""
    tmp = tmp_path_factory.mktemp("killed")
    np.save(tmp / "data.npy", data())
    procs = {}
    for backend, point in CRASHES:
        out = tmp / f"{backend}-{point.replace(':', '-').replace('#', '-')}"
        procs[backend, point] = out, subprocess.Popen(
            [sys.executable, "-c", _TRAIN, str(out), backend, json.dumps(CFG.to_dict()),
             json.dumps(TC.to_dict()), str(tmp / "data.npy")],
            env={**os.environ, CRASH_ENV: point, **same_threads()}, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE)
    done = {}
    for key, (out, proc) in procs.items():
        _, err = proc.communicate(timeout=300)
        done[key] = out, proc.returncode, err.decode()
    return done


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("full")
    runs = {}
    for backend in sorted({b for b, _ in CRASHES}):
        Trainer(CFG, TC.replace(out_dir=str(tmp / backend)), _source(), backend, progress=False).run()
        runs[backend] = tmp / backend
    return runs


@pytest.mark.parametrize("backend, point", CRASHES)
def test_sigkill_at_any_point_then_resume_is_exact(killed_runs, uninterrupted, backend, point):
    run, code, err = killed_runs[backend, point]
    assert code == -signal.SIGKILL, err
    if list_checkpoints(run):  # resume (the dead process's lock is gone with it)
        Trainer.resume(run, _source(), backend, progress=False).run()
    else:  # killed inside its first checkpoint: nothing to resume, a fresh run may start there
        Trainer(CFG, TC.replace(out_dir=str(run)), _source(), backend, progress=False).run()
    _assert_equal_weights(_weights(uninterrupted[backend]), _weights(run))
    full = read_metrics(uninterrupted[backend] / "metrics.jsonl")
    resumed = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in resumed] == [r["step"] for r in full]
    assert [r["fvu"] for r in resumed] == [r["fvu"] for r in full]
    assert [p.name for p in list_checkpoints(run)] == ["step_00000030", "step_00000040"]
    _assert_tidy(run)


def _train_cmd(*args) -> list:
    return [sys.executable, "-m", "switchsae", "train", "--backend", "numpy", "--no-progress", *args]


def test_sigkill_of_the_cli_then_resume_ends_with_the_same_weights(tmp_path):
    """Kill -9 the CLI right after its first checkpoint, `--resume`, compare exactly with a
    run that was never interrupted."""
    with ShardWriter(tmp_path / "shards", shard_tokens=1000) as writer:
        writer.append(data())
    opts = ["--data", str(tmp_path / "shards"), "--d-in", "24", "--latents", "96", "--experts", "4",
            "--k", "4", "--steps", "300", "--batch-size", "64", "--lr", "5e-3", "--warmup", "5",
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
    assert saved and saved[-1].name != "step_00000300", "the run finished before it could be killed"

    resumed = subprocess.run(_train_cmd("--resume", str(killed)), env=env, capture_output=True,
                             text=True, timeout=300, check=False)
    assert resumed.returncode == 0, resumed.stderr
    assert "FVU" in resumed.stdout
    full = subprocess.run(_train_cmd(*opts, "--out", str(tmp_path / "full")), env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert full.returncode == 0, full.stderr

    _assert_equal_weights(_weights(tmp_path / "full"), _weights(killed))
    steps = [json.loads(line)["step"] for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(5, 301, 5))  # the killed run's extra lines were dropped
    _assert_tidy(killed)


def test_resume_rejects_settings_given_again(tmp_path, capsys):
    from switchsae.cli import main

    assert main(["train", "--resume", str(tmp_path), "--lr", "0.1", "--backend", "numpy"]) == 2
    assert "--resume takes its settings from the checkpoint; drop --lr" in capsys.readouterr().err
