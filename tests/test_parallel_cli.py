"""`switchsae train --parallel data|expert` on every backend that offers it, against the same
run on one process: torch under torchrun (2 gloo processes), JAX over 4 forced host devices in
one process (XLA fixes the device count at start-up, so it runs in a subprocess), MLX under
`mlx.launch` (2 ring processes).  Each run ends where the one-process run ends: the same metrics
lines, the same weights, the same x_hat from the checkpoints loaded in one process; rank 0 alone
reports and writes.  The torch expert-parallel run resumes the one-process run's step-3
checkpoint (sliced when loading, gathered when saving).

Tolerances (float32): the split batch reorders sums (per-process partial sums, then an
all-reduce), ~1e-7 relative; after 6 Adam steps of lr 3e-3 a weight agrees to the conformance
suite's float32 step tolerance, 1e-4 x (steps x lr) + 1e-4 relative; metrics to 1e-4 relative
(+1e-6: dead fractions near 0); x_hat to 1e-5 x max |x_hat|."""

from __future__ import annotations

import json
import shutil
import sys

import launch
import numpy as np
import pytest

from switchsae import load
from switchsae.checkpoint import list_checkpoints, read_checkpoint
from switchsae.cli import main
from switchsae.data import ShardWriter

WORLD, TIMEOUT_S = 2, 240
CLI = ["--no-progress", "--latents", "256", "--experts", "4", "--k", "4",
       "--steps", "6", "--batch-size", "64", "--lr", "3e-3", "--warmup", "1", "--eval-tokens", "256",
       "--log-every", "2", "--checkpoint-every", "3", "--dead-tokens", "32", "--seed", "3"]
TRAIN = [sys.executable, "-m", "switchsae", "train"]
JAX_DEVICES = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}


def _shards(path, n=768, d=16):
    rng = np.random.default_rng(0)
    x = (rng.exponential(1.0, size=(n, 48)) * (rng.random((n, 48)) < 0.1)) @ rng.normal(size=(48, d)) + 1.0
    with ShardWriter(path, shard_tokens=256) as writer:
        writer.append(x.astype(np.float32))
    return path


def _final_params(run):
    return read_checkpoint(list_checkpoints(run)[-1]).params


def _metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return _shards(tmp_path_factory.mktemp("parallel_cli") / "shards")


def _single(backend, data, out, monkeypatch):
    monkeypatch.setenv("SWITCHSAE_DEVICE", "cpu")
    assert main(["train", "--backend", backend, *CLI, "--data", str(data), "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def jax_single(tmp_path_factory, data):
    """The one-process JAX run both JAX modes are compared with (the same command for both;
    ~50 s of compiling on one core, so run once).  The tests only read it."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        return _single("jax", data, tmp_path_factory.mktemp("jax_single") / "single", monkeypatch)


def _assert_same_run(run, single, data, backend):
    x = np.load(min(data.glob("*.npy")))[:128]
    reference, got = _metrics(single), _metrics(run)
    assert [r["step"] for r in got] == [r["step"] for r in reference] == [2, 4, 6]
    for mine, theirs in zip(got, reference):
        for key in ("fvu", "l0", "dead_fraction", "expert_load", "loss_mse", "loss_lb", "loss_auxk"):
            np.testing.assert_allclose(mine[key], theirs[key], rtol=1e-4, atol=1e-6, err_msg=f"{run} {key}")
    assert reference[-1]["loss_auxk"] > 0  # AuxK took part
    bound = 1e-4 * 6 * 3e-3  # float32 step tolerance on updates of at most steps x lr
    whole = _final_params(single)
    for name, p in _final_params(run).items():
        err = np.max(np.abs(p - whole[name]))
        assert err <= bound + 1e-4 * np.max(np.abs(whole[name])), f"{run} {name}: {err:.3e}"
    def x_hat_of(path):
        sae = load(path, backend=backend)
        return sae.backend.to_numpy(sae.forward(x).x_hat)

    x_hat = x_hat_of(single)
    np.testing.assert_allclose(x_hat_of(run), x_hat, rtol=0, atol=1e-5 * np.abs(x_hat).max(), err_msg=str(run))


def test_torch_under_torchrun(tmp_path, data, monkeypatch):
    single = _single("torch", data, tmp_path / "single", monkeypatch)
    rc, log = launch.run(launch.torchrun(WORLD, "-m", "switchsae", "train", "--backend", "torch", "--parallel",
                                         "data", *CLI, "--data", data, "--out", tmp_path / "data"), TIMEOUT_S)
    assert rc == 0, log
    assert log.count("checkpoint: ") == 1 and "data parallel, 2 processes" in log, log
    resumed = tmp_path / "expert"
    shutil.copytree(single, resumed)
    shutil.rmtree(list_checkpoints(resumed)[-1])  # back to step 3
    rc, log = launch.run(launch.torchrun(WORLD, "-m", "switchsae", "train", "--parallel", "expert",
                                         "--resume", resumed, "--no-progress"), TIMEOUT_S)
    assert rc == 0, log
    for run in ("data", "expert"):
        _assert_same_run(tmp_path / run, single, data, "torch")


@pytest.mark.parametrize("mode", ["data", "expert"])
def test_jax_over_four_devices(tmp_path, data, jax_single, mode):
    single = jax_single
    rc, log = launch.run([*TRAIN, "--backend", "jax", "--parallel", mode, *CLI, "--data", data,
                          "--out", tmp_path / mode], TIMEOUT_S, env=JAX_DEVICES)
    assert rc == 0, log
    assert f"{mode} parallel, 4 devices" in log, log
    _assert_same_run(tmp_path / mode, single, data, "jax")


def test_mlx_under_mlx_launch(tmp_path, data, monkeypatch):
    single = _single("mlx", data, tmp_path / "single", monkeypatch)
    _, log = launch.run(launch.mlx_launch(WORLD, *TRAIN, "--backend", "mlx", "--parallel", "data", *CLI,
                                          "--data", data, "--out", tmp_path / "data"), TIMEOUT_S)
    assert (tmp_path / "data" / "metrics.jsonl").exists(), log
    assert log.count("checkpoint: ") == 1 and "data parallel, 2 processes" in log, log
    _assert_same_run(tmp_path / "data", single, data, "mlx")


def test_parallel_refusals_name_what_is_possible(tmp_path, data, monkeypatch, capsys):
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    args = [*CLI, "--data", str(data)]
    assert main(["train", "--backend", "torch", "--parallel", "data", *args, "--out", str(tmp_path / "a")]) == 2
    assert "launch with torchrun" in capsys.readouterr().err
    assert main(["train", "--backend", "numpy", "--parallel", "data", *args, "--out", str(tmp_path / "b")]) == 2
    assert "backend 'numpy' has no 'data' parallel training; parallel backends: torch (data, expert)" \
        in capsys.readouterr().err
    assert main(["train", "--backend", "mlx", "--parallel", "expert", *args, "--out", str(tmp_path / "c")]) == 2
    assert "backend 'mlx' has no 'expert' parallel training" in capsys.readouterr().err
    assert main(["train", "--backend", "mlx", "--parallel", "data", *args, "--out", str(tmp_path / "d")]) == 2
    assert "launch with mlx.launch" in capsys.readouterr().err
    assert not any((tmp_path / n).exists() for n in "abcd")
