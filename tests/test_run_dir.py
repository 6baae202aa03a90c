"""Write-side safety: one trainer per run directory (a lock the OS drops with the process),
no run overwritten by a new one, resume writing where the user points, recoverable atomic
replace, digests of every checkpoint file, the browser never overwriting a user's files,
and nothing written outside the directory the user named."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

import switchsae
from switchsae import SwitchSAE, SwitchSAEConfig
from switchsae.checkpoint import (CFG_FILE, CHECKPOINTS_DIR, WEIGHTS_FILE, CheckpointError, list_checkpoints,
                                  read_checkpoint)
from switchsae.cli import main
from switchsae.data import ArraySource, ShardWriter
from switchsae.files import CRASH_ENV
from switchsae.training import TrainConfig, Trainer
from switchsae.training.metrics_log import read_metrics
from switchsae.training.run_dir import LOCK_FILE, RunDirError

CFG = SwitchSAEConfig(d_in=16, n_latents=64, n_experts=4, k=4)
TC = TrainConfig(steps=12, batch_size=50, lr=5e-3, log_every=2, checkpoint_every=4, keep_checkpoints=5)


def _data(n=400, d=16) -> np.ndarray:
    rng = np.random.default_rng(0)
    return (rng.exponential(1.0, size=(n, 32)) * (rng.random((n, 32)) < 0.1) @ rng.normal(size=(32, d))
            ).astype(np.float32)


def _trainer(out, **tc):
    return Trainer(CFG, TC.replace(out_dir=str(out), **tc), ArraySource(_data(), 50, seed=1), "numpy",
                   progress=False)


def _listing(root) -> dict:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns if p.is_file() else None
            for p in sorted(root.rglob("*"))}


# -- one trainer per directory, no run overwritten ------------------------------------------
def test_a_second_trainer_on_the_same_directory_is_refused(tmp_path, capsys):
    first = _trainer(tmp_path / "run")  # holds the lock until its run ends
    with pytest.raises(RunDirError, match=rf"{tmp_path / 'run'} is in use by another training run \(process {os.getpid()}\)"):
        _trainer(tmp_path / "run")
    with ShardWriter(tmp_path / "d", shard_tokens=400) as w:
        w.append(_data())
    code = main(["train", "--backend", "numpy", "--no-progress", "--data", str(tmp_path / "d"), "--latents", "64",
                 "--experts", "4", "--k", "4", "--steps", "4", "--warmup", "1", "--batch-size", "50", "--out", str(tmp_path / "run")])
    assert code == 2 and "is in use by another training run" in capsys.readouterr().err
    first.run()
    assert [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")] == list(range(2, 13, 2))
    _trainer(tmp_path / "other").run()  # the lock went with the run


def test_the_lock_of_a_killed_process_is_gone_with_it(tmp_path):
    code = ("import sys; from switchsae.training.run_dir import RunLock; lock = RunLock(sys.argv[1]); "
            "import os, signal; os.kill(os.getpid(), signal.SIGKILL)")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "run")], check=False)
    assert proc.returncode == -signal.SIGKILL and (tmp_path / "run" / LOCK_FILE).is_file()
    _trainer(tmp_path / "run").run()  # the stale lock file does not block


def test_a_new_trainer_refuses_an_existing_run(tmp_path):
    _trainer(tmp_path / "run").run()
    before = _listing(tmp_path / "run")
    with pytest.raises(RunDirError, match="already holds a training run .checkpoint step_00000012.; resume it"):
        _trainer(tmp_path / "run")
    assert _listing(tmp_path / "run") == before


def test_a_run_killed_before_its_first_checkpoint_starts_again_in_place(tmp_path, capsys):
    with ShardWriter(tmp_path / "d", shard_tokens=400) as w:
        w.append(_data())
    argv = ["train", "--backend", "numpy", "--no-progress", "--data", str(tmp_path / "d"), "--latents", "64",
            "--experts", "4", "--k", "4", "--steps", "8", "--warmup", "1", "--batch-size", "50", "--checkpoint-every", "4",
            "--eval-tokens", "100", "--out", str(tmp_path / "run")]
    killed = subprocess.run([sys.executable, "-m", "switchsae", *argv], env={**os.environ, CRASH_ENV: "write_dir:complete"},
                            capture_output=True, check=False)
    assert killed.returncode == -signal.SIGKILL
    assert not list_checkpoints(tmp_path / "run") and (tmp_path / "run" / "metrics.jsonl").is_file()
    assert main(["train", "--resume", str(tmp_path / "run")]) == 2
    assert "holds no complete checkpoint" in capsys.readouterr().err
    assert main(argv) == 0  # the same command again
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step_00000004", "step_00000008"]
    assert not [p for p in (tmp_path / "run" / CHECKPOINTS_DIR).iterdir() if p.name.startswith(".")]


# -- resume writes where the user points ----------------------------------------------------
def test_resuming_a_copy_writes_into_the_copy_or_where_named(tmp_path, capsys):
    full = tmp_path / "full"
    _trainer(full, steps=16).run()
    orig = tmp_path / "orig"  # the run stopped at step 8 (its metrics go on: it was killed)
    for step in (4, 8):
        shutil.copytree(full / CHECKPOINTS_DIR / f"step_{step:08d}", orig / CHECKPOINTS_DIR / f"step_{step:08d}")
    shutil.copy(full / "metrics.jsonl", orig / "metrics.jsonl")
    before = _listing(orig)

    copy = tmp_path / "copy"
    shutil.copytree(orig, copy)
    resumed = Trainer.resume(copy, ArraySource(_data(), 50, seed=1), "numpy", progress=False)
    assert resumed.out_dir == copy
    resumed.run()

    lone = tmp_path / "lone-ck"
    shutil.copytree(list_checkpoints(orig)[-1], lone)
    with pytest.raises(CheckpointError, match="outside a run directory: pass out_dir"):
        Trainer.resume(lone, ArraySource(_data(), 50, seed=1), "numpy")
    elsewhere = Trainer.resume(lone, ArraySource(_data(), 50, seed=1), "numpy", out_dir=tmp_path / "new",
                               progress=False)
    elsewhere.run()
    into_new = Trainer.resume(orig, ArraySource(_data(), 50, seed=1), "numpy", out_dir=tmp_path / "new2",
                              progress=False)
    into_new.run()

    assert _listing(orig) == before  # the original run is untouched
    for run in (copy, tmp_path / "new2"):  # with the original's metrics up to the checkpoint
        assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == list(range(2, 17, 2))
    assert [r["step"] for r in read_metrics(tmp_path / "new" / "metrics.jsonl")] == list(range(10, 17, 2))
    for run in (copy, tmp_path / "new", tmp_path / "new2"):
        a, b = read_checkpoint(full).params, read_checkpoint(run).params
        assert all(np.array_equal(a[k], b[k]) for k in a)
    with pytest.raises(RunDirError, match="already holds a training run"):
        Trainer.resume(lone, ArraySource(_data(), 50, seed=1), "numpy", out_dir=copy)


# -- checkpoints: recoverable replace, digests ------------------------------------------------
_SAVE = """
import sys, numpy as np, switchsae
cfg = switchsae.SwitchSAEConfig(d_in=16, n_latents=64, n_experts=4, k=4)
switchsae.save(switchsae.SwitchSAE.init(cfg, seed=int(sys.argv[2]), backend="numpy"), sys.argv[1])
"""


@pytest.mark.parametrize("point, survivor", [("write_dir:file#2", 0), ("write_dir:complete", 0),
                                             ("write_dir:between_renames", 1), ("write_dir:renamed", 1)])
def test_save_killed_while_replacing_leaves_the_old_or_the_new_model(tmp_path, point, survivor):
    path = tmp_path / "sae"
    switchsae.save(SwitchSAE.init(CFG, seed=0, backend="numpy"), path)
    proc = subprocess.run([sys.executable, "-c", _SAVE, str(path), "1"], env={**os.environ, CRASH_ENV: point},
                          check=False)
    assert proc.returncode == -signal.SIGKILL
    loaded = switchsae.load(path, backend="numpy")  # completes a replace killed between its renames
    expected = SwitchSAE.init(CFG, seed=survivor, backend="numpy")
    assert all(np.array_equal(loaded.params[k], expected.params[k]) for k in expected.params)
    switchsae.save(SwitchSAE.init(CFG, seed=2, backend="numpy"), path)  # and the next save tidies up
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sae"]


def test_a_flipped_byte_in_any_checkpoint_file_is_found(tmp_path):
    _trainer(tmp_path / "run").run()
    ckpt = list_checkpoints(tmp_path / "run")[-1]
    for name in (WEIGHTS_FILE, "optimizer.safetensors", "trainer_state.json"):
        damaged = tmp_path / name
        shutil.copytree(ckpt, damaged)
        data = bytearray((damaged / name).read_bytes())
        data[len(data) // 2] ^= 0x01
        (damaged / name).write_bytes(bytes(data))
        with pytest.raises(CheckpointError, match=f"{name} is corrupt: its sha256 does not match"):
            read_checkpoint(damaged)
    digests = json.loads((ckpt / CFG_FILE).read_text())["sha256"]
    assert digests[WEIGHTS_FILE] == hashlib.sha256((ckpt / WEIGHTS_FILE).read_bytes()).hexdigest()


# -- the feature browser never overwrites a user's files --------------------------------------
@pytest.mark.parametrize("name", ["index.html", "app.js", "data.js"])
def test_inspect_refuses_a_directory_with_a_users_files(tmp_path, capsys, name):
    switchsae.save(SwitchSAE.init(SwitchSAEConfig(d_in=384, n_latents=64, n_experts=4, k=4), backend="numpy"),
                   tmp_path / "ck")
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / name).write_text("my own page")
    (tmp_path / "t.txt").write_text("a few words")
    code = main(["inspect", str(tmp_path / "ck"), "--out", str(tmp_path / "site"), "--text", str(tmp_path / "t.txt"),
                 "--backend", "numpy", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and f"holds {name} not written by switchsae; not overwriting" in err
    assert (tmp_path / "site" / name).read_text() == "my own page"


# -- nothing outside the named directory --------------------------------------------------------
def test_train_writes_nothing_outside_its_run_directory(tmp_path):
    """HOME, the working directory, TMPDIR and the run's parent are listed before and after
    `train`, `eval` and a resume.  (matplotlib keeps its own font cache in MPLCONFIGDIR or
    ~/.cache/matplotlib, as in any program that plots: given here, outside the listed tree.)"""
    root = tmp_path / "root"
    for name in ("home", "cwd", "tmp", "parent", "data"):
        (root / name).mkdir(parents=True)
    with ShardWriter(root / "data", shard_tokens=400) as w:
        w.append(_data())
    (tmp_path / "mpl").mkdir()
    env = {**os.environ, "HOME": str(root / "home"), "TMPDIR": str(root / "tmp"), "MPLCONFIGDIR": str(tmp_path / "mpl")}
    env.pop("XDG_CACHE_HOME", None)
    env.pop("SWITCHSAE_CACHE", None)
    run = root / "parent" / "run"
    base = [sys.executable, "-m", "switchsae"]
    opts = ["--backend", "numpy", "--no-progress"]
    before = _listing(root)
    for argv in (["train", *opts, "--data", str(root / "data"), "--latents", "64", "--experts", "4", "--k", "4",
                  "--steps", "6", "--warmup", "1", "--batch-size", "50", "--checkpoint-every", "3", "--eval-tokens", "100",
                  "--out", str(run)],
                 ["eval", str(run), str(root / "data"), *opts]):
        proc = subprocess.run(base + argv, cwd=root / "cwd", env=env, capture_output=True, text=True, check=False)
        assert proc.returncode == 0, proc.stderr
    after = {k: v for k, v in _listing(root).items() if not k.startswith("parent/run/")}
    assert after == {**before, "parent/run": None}
