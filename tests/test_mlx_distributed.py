"""Data parallel with mx.distributed: 2 processes on half batches == 1 process on the full batch.

The test launches this file as the worker: `mlx.launch -n 2 --backend ring` on 127.0.0.1
(`launch.mlx_launch`: the ring backend is plain TCP, so it runs on a Linux CPU machine).  Each rank trains on its half of
every batch and saves its parameters; the test repeats the run on one process with the full
batches and compares.  `mlx.launch` exits 0 even when a rank fails, so success is judged by the
files the ranks write, never by the launcher's exit code.

The halves are built to differ (opposite mean shifts), so the expert fractions f_i and the total
variance differ between ranks: the naive scheme (average the per-rank gradients of the per-rank
losses) must then measurably miss the full-batch result, which shows the comparison can fail.
Tolerance: float32, per-rank sums of 16 tokens instead of one sum of 32 reorder the additions;
the updates must agree to the conformance suite's float32 step tolerance (1e-4 relative)."""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import launch
import mlx.core as mx
import numpy as np
from mlx.nn.utils import average_gradients
from switchsae.backends.mlx import Backend as MLXBackend
from switchsae.backends.mlx.distributed import parallel_backend
from switchsae.conformance import harness as H
from switchsae.core import SwitchSAEConfig, adam_init, init_params, train_step
from switchsae.core.dead_latents import update_tokens_since_fired

WORLD, BATCH, STEPS, LR = 2, 32, 4, 1e-3
TIMEOUT_S = 240


def problem():
    """(cfg, float64 params, full batches, dead mask): AuxK on, a strong lb term, and halves
    shifted apart along a direction the router sees, so per-rank routing statistics differ."""
    cfg = SwitchSAEConfig(d_in=16, n_latents=64, n_experts=4, k=4, lb_coef=2.0, auxk_coef=0.5, k_aux=6)
    rng = np.random.default_rng(7)
    params = init_params(cfg, 7)
    params["W_router"] *= 4.0
    shift = 1.5 * params["W_router"][0] / np.linalg.norm(params["W_router"][0])
    sign = np.repeat([1.0, -1.0], BATCH // WORLD)[:, None]  # rank 0 / rank 1 halves
    batches = [rng.normal(size=(BATCH, cfg.d_in)) + sign * shift for _ in range(STEPS)]
    return cfg, params, batches, rng.random(cfg.n_latents) < 0.4


def train(backend, step, rank: int, world: int, count: bool = True):
    """STEPS steps on this rank's slice; AuxK (dead mask) on odd steps; count: update the
    dead-latent counter.  -> (params, losses, counter) as NumPy."""
    cfg, params, batches, dead = problem()
    params = {n: backend.asarray(p, "float32") for n, p in params.items()}
    opt, counter, losses = adam_init(params, backend.xp), mx.zeros(cfg.n_latents), []
    size = BATCH // world
    for i, x in enumerate(batches):
        local = backend.asarray(x[rank * size:(rank + 1) * size], "float32")
        params, opt, out = step(params, opt, local, LR, backend.asarray(dead) if i % 2 else None)
        if count:
            counter = update_tokens_since_fired(counter, out.top_indices, out.top_values, backend)
        losses.append([float(out.losses[t]) for t in ("mse", "lb", "auxk", "total")])
    return {n: np.array(p) for n, p in params.items()}, np.array(losses), np.array(counter)


class NaiveDataParallel(MLXBackend):
    """Averages per-rank gradients of per-rank losses (local f_i and total variance)."""

    def __init__(self, group):
        self.group = group

    def loss_and_grads(self, params, x, cfg, dead_mask=None, select_bias=None):
        out, grads = super().loss_and_grads(params, x, cfg, dead_mask, select_bias)
        return out, average_gradients(grads, group=self.group)


def worker(out_dir: Path) -> None:
    group = mx.distributed.init(strict=True, backend="ring")
    rank, world = group.rank(), group.size()
    assert world == WORLD, f"launched with {world} processes, expected {WORLD}"
    cfg = problem()[0]
    backend = parallel_backend("data", group)
    step = backend.compile_step(functools.partial(train_step, backend, cfg))
    params, losses, counter = train(backend, step, rank, world)
    naive = NaiveDataParallel(group)
    naive_params = train(naive, naive.compile_step(functools.partial(train_step, naive, cfg)),
                         rank, world, count=False)[0]
    np.savez(out_dir / f"rank{rank}.npz", losses=losses, counter=counter,
             **params, **{f"naive_{n}": p for n, p in naive_params.items()})


def single_process():
    cfg = problem()[0]
    backend = MLXBackend()
    step = backend.compile_step(functools.partial(train_step, backend, cfg))
    return train(backend, step, 0, 1)


def test_two_ring_processes_on_half_batches_equal_one_on_the_full_batch(tmp_path):
    _, log = launch.run(launch.mlx_launch(WORLD, sys.executable, Path(__file__).resolve(), tmp_path), TIMEOUT_S)
    ranks = [tmp_path / f"rank{r}.npz" for r in range(WORLD)]
    assert all(p.exists() for p in ranks), f"a rank wrote no result:\n{log}"
    got = [dict(np.load(p)) for p in ranks]
    params, losses, counter = single_process()

    for name in params:  # the replicas never drift apart: identical all-reduced updates
        np.testing.assert_array_equal(got[0][name], got[1][name], err_msg=f"ranks disagree on {name}")
    np.testing.assert_allclose(got[0]["losses"], losses, rtol=1e-5, err_msg="full-batch losses")
    np.testing.assert_array_equal(got[0]["counter"], counter, err_msg="dead-latent counter")
    initial = problem()[1]
    naive_gap = 0.0
    for name, p in params.items():
        bound = 1e-4 * STEPS * LR  # conformance float32 step tolerance on updates of <= STEPS * LR
        H.assert_close(got[0][name] - initial[name], p - initial[name], "float32", f"update of {name}",
                       scale=STEPS * LR)
        naive_gap = max(naive_gap, float(np.max(np.abs(got[0][f"naive_{name}"] - p))) / bound)
    assert naive_gap > 10, f"naive averaging is within {naive_gap:.1f}x tolerance: the test cannot tell"


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
