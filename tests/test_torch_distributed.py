"""torch.distributed data and expert parallel: 2 gloo processes on half batches == 1 process on
the full batch; checkpoints move between world sizes; `switchsae train --parallel` under torchrun.

The tests launch torchrun (`python -m torch.distributed.run --standalone`, which picks a free
port) on this file as the worker, with a timeout; each rank writes its results to files, which
the test compares with the same run on one process: data parallel, expert parallel with both
exchanges (all-gather, all-to-all), with a shared expert, and with every token of the first step
routed to rank 0's experts (rank 1 computes nothing).  The halves of every batch are built to
differ (opposite mean shifts), so the expert fractions f_i and the total variance differ
between ranks: a naive scheme (average the per-rank gradients of the per-rank losses) must then
measurably miss the full-batch result, which shows the comparison can fail.  The bytes the
collectives counted must equal `core.parallel.exchange_bytes`.  (`switchsae train --parallel`
under torchrun: tests/test_parallel_cli.py.)

Tolerances (float32): per-rank sums of 16 tokens instead of one of 32, and expert matmuls on
other row groupings, reorder additions (~1e-7 relative); the updates (params - initial) must
agree to the conformance suite's float32 tolerance, 1e-4 x (steps x lr) + 1e-4 relative; losses
to 1e-5 relative; x_hat of a checkpoint to 1e-5 x max |x_hat|; dead-latent counters exactly."""

from __future__ import annotations

import sys
from pathlib import Path

import array_api_compat.numpy as np_xp
import launch
import numpy as np
import pytest
import torch
from switchsae.backends.torch import Backend as TorchBackend
from switchsae.backends.torch.distributed import (
    init_from_env,
    parallel_backend,
    shutdown,
)
from switchsae.core import SwitchSAEConfig, adam_init, init_params, parallel, train_step
from switchsae.core import losses as L
from switchsae.core.config import ConfigError
from switchsae.core.dead_latents import update_tokens_since_fired
from switchsae.core.spec import forward

from switchsae import load
from switchsae.checkpoint import write_checkpoint

WORLD, BATCH, STEPS, LR = 2, 32, 4, 1e-3
TIMEOUT_S = 150
RTOL_LOSS, RTOL_XHAT = 1e-5, 1e-5
EXCHANGES = ("all_gather", "all_to_all")
TRAFFIC = ("routing", "counts", "dispatch", "combine", "meta", "combine_backward", "dispatch_backward")
EXPERT_RUNS = [(f"ep_{e}" + (f"_{v}" if v else ""), e, v)  # (tag, exchange, problem variant)
               for e, v in [("all_gather", ""), ("all_to_all", ""), ("all_to_all", "shared"),
                            ("all_gather", "collapsed"), ("all_to_all", "collapsed")]]


def problem(shared: bool = False, collapsed: bool = False, top2: bool = False):
    """(cfg, params, full batches, dead mask, probe batch): AuxK on, a strong lb term,
    encoder biases, and halves shifted apart along a direction the router sees.  shared: with
    a shared expert; collapsed: a zero router, so the first step routes every token to expert 0
    (rank 1's experts receive nothing); top2: two experts per token (data parallel only)."""
    cfg = SwitchSAEConfig(d_in=16, n_latents=64, n_experts=4, k=4, lb_coef=2.0, auxk_coef=0.5, k_aux=6,
                          encoder_bias=True)
    if shared:
        cfg = cfg.replace(shared_latents=8, shared_k=1)
    if top2:
        cfg = cfg.replace(experts_per_token=2)
    rng = np.random.default_rng(7)
    params = init_params(cfg, 7)
    params["W_router"] *= 4.0
    params["b_enc"] = rng.normal(scale=0.05, size=params["b_enc"].shape)  # non-zero: sharding shows
    shift = 1.5 * params["W_router"][0] / np.linalg.norm(params["W_router"][0])
    sign = np.repeat([1.0, -1.0], BATCH // WORLD)[:, None]  # rank 0 / rank 1 halves
    batches = [rng.normal(size=(BATCH, cfg.d_in)) + sign * shift for _ in range(STEPS)]
    if collapsed:
        params["W_router"][:] = 0.0
    return cfg, params, batches, rng.random(cfg.n_latents) < 0.4, rng.normal(size=(BATCH, cfg.d_in))


def selection_bias(cfg):
    """A fixed selection bias (N, m) (`core.selection_bias`): half the latents lifted."""
    rng, shape = np.random.default_rng(11), (cfg.n_experts, cfg.expert_width)
    return torch.as_tensor(np.where(rng.random(shape) < 0.5, 0.3 * rng.random(shape), 0.0).astype(np.float32))


def train(backend, cfg, params, batches, dead, rank=0, world=1, count=True):
    """STEPS steps of `core.train_step` on this rank's slice; AuxK (dead mask) on odd steps,
    a selection bias on every third with top-1 routing.
    params: this rank's (NumPy), never written: the update is in place, and a float32 array
    would share its memory with the tensor.  -> (params, losses (STEPS, 4), counter)."""
    params = {n: backend.asarray(p, "float32").clone() for n, p in params.items()}
    opt, counter, losses = adam_init(params, backend.xp), torch.zeros(cfg.total_latents), []
    rows = parallel.batch_rows(BATCH, world, rank)
    for i, x in enumerate(batches):
        mask = torch.as_tensor(dead) if i % 2 else None
        bias = selection_bias(cfg) if i % 3 == 0 and cfg.experts_per_token == 1 else None
        params, opt, out = train_step(backend, cfg, params, opt, backend.asarray(x[rows], "float32"), LR, mask, bias)
        if count:
            counter = update_tokens_since_fired(counter, out.top_indices, out.top_values, backend)
        losses.append([float(out.losses[t]) for t in ("mse", "lb", "auxk", "total")])
    return params, np.array(losses), counter.numpy()


def _numpy(params):
    """Copies: a later run's in-place update must not change what was saved."""
    return {n: p.detach().cpu().numpy().copy() for n, p in params.items()}


class NaiveDataParallel(TorchBackend):
    """Averages per-rank gradients of per-rank losses (local f_i and total variance)."""

    def __init__(self, comm):
        super().__init__("cpu")
        self.comm = comm

    def loss_and_grads(self, params, x, cfg, dead_mask=None, select_bias=None):
        out, grads = super().loss_and_grads(params, x, cfg, dead_mask, select_bias)
        self.comm.all_sum_(list(grads.values()))
        return out, {n: g / self.comm.world for n, g in grads.items()}


# -- the worker (run by torchrun) -------------------------------------------------------------
def worker(out_dir: Path) -> None:
    torch.set_num_threads(1)
    init_from_env("cpu")
    results = {}
    cfg, params, batches, dead, _ = problem()
    dp = parallel_backend("data", device="cpu")
    rank, world = dp.rank, dp.world_size
    assert world == WORLD, f"launched with {world} processes, expected {WORLD}"
    p, results["dp_losses"], results["dp_counter"] = train(dp, cfg, params, batches, dead, rank, world)
    results.update({f"dp_{n}": a for n, a in _numpy(p).items()})
    cfg2, params2, batches2, dead2, _ = problem(top2=True)
    p, results["dp_top2_losses"], _ = train(dp, cfg2, params2, batches2, dead2, rank, world)
    results.update({f"dp_top2_{n}": a for n, a in _numpy(p).items()})
    naive = NaiveDataParallel(dp.comm)
    p = train(naive, cfg, params, batches, dead, rank, world, count=False)[0]
    results.update({f"naive_{n}": a for n, a in _numpy(p).items()})

    for tag, exchange, variant in EXPERT_RUNS:
        cfg, params, batches, dead, probe = problem(variant == "shared", variant == "collapsed")
        ep = parallel_backend("expert", device="cpu", exchange=exchange)
        p, results[f"{tag}_losses"], results[f"{tag}_counter"] = train(
            ep, cfg, ep.shard_params(params), batches, dead, rank, world)
        full = ep.gather_params(p)
        if rank == 0:
            results.update({f"{tag}_{n}": a for n, a in _numpy(full).items()})
            write_checkpoint(out_dir / f"{tag}_ckpt", cfg, _numpy(full))
        with torch.no_grad():  # this rank's half of the probe through the sharded experts
            results[f"{tag}_xhat"] = forward(p, ep.asarray(probe[ep.batch_rows(BATCH)], "float32"), cfg, ep).x_hat.numpy()
        # one more step's traffic, AuxK on, as the collectives counted it
        before = dict(ep.comm.received)
        out, _ = ep.loss_and_grads(p, ep.asarray(batches[0][ep.batch_rows(BATCH)], "float32"), cfg, torch.as_tensor(dead))
        results[f"{tag}_bytes"] = np.array([ep.comm.received[k] - before.get(k, 0) for k in TRAFFIC])
        lo, hi = parallel.expert_range(cfg.n_experts, world, rank)
        results[f"{tag}_remote"] = np.array(int(((out.expert < lo) | (out.expert >= hi)).sum()))
    np.savez(out_dir / f"rank{rank}.npz", **results)
    shutdown()


def single_process(shared: bool = False, collapsed: bool = False, top2: bool = False):
    cfg, params, batches, dead, _ = problem(shared, collapsed, top2)
    return train(TorchBackend("cpu"), cfg, params, batches, dead)


def torchrun(*args) -> str:
    """Run `torchrun --standalone --nproc-per-node 2 *args`; -> its output (a non-zero exit fails)."""
    rc, log = launch.run(launch.torchrun(WORLD, *args), TIMEOUT_S)
    assert rc == 0, f"torchrun exited {rc}:\n{log}"
    return log


def _assert_update_close(got, initial, expected, what):
    """(got - initial) vs (expected - initial): float32 step tolerance of the conformance suite."""
    scale = STEPS * LR
    err = np.abs((got - initial) - (expected - initial))
    bound = 1e-4 * scale + 1e-4 * np.abs(expected - initial)
    assert np.all(err <= bound), f"{what}: max error {err.max():.3e} (bound {bound.max():.3e})"


# -- tests ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    torchrun(Path(__file__).resolve(), out)
    return out, [dict(np.load(out / f"rank{r}.npz")) for r in range(WORLD)]


def test_data_parallel_equals_one_process_on_the_full_batch(ranks):
    _, got = ranks
    params, losses, counter = single_process()
    initial = problem()[1]
    naive_gap = 0.0
    for name, p in params.items():
        p = p.numpy()
        np.testing.assert_array_equal(got[0][f"dp_{name}"], got[1][f"dp_{name}"], err_msg=f"replicas drift: {name}")
        _assert_update_close(got[0][f"dp_{name}"], initial[name], p, f"data parallel {name}")
        naive_gap = max(naive_gap, float(np.max(np.abs(got[0][f"naive_{name}"] - p))) / (1e-4 * STEPS * LR))
    np.testing.assert_allclose(got[0]["dp_losses"], losses, rtol=RTOL_LOSS, err_msg="full-batch losses")
    np.testing.assert_array_equal(got[0]["dp_counter"], counter, err_msg="dead-latent counter")
    np.testing.assert_array_equal(got[1]["dp_counter"], counter, err_msg="dead-latent counter, rank 1")
    assert naive_gap > 10, f"naive averaging is within {naive_gap:.1f}x tolerance: the test cannot tell"


def test_data_parallel_with_two_experts_per_token(ranks):
    _, got = ranks
    params, losses, _ = single_process(top2=True)
    initial = problem(top2=True)[1]
    for name, p in params.items():
        _assert_update_close(got[0][f"dp_top2_{name}"], initial[name], p.numpy(), f"top-2 {name}")
    np.testing.assert_allclose(got[0]["dp_top2_losses"], losses, rtol=RTOL_LOSS)


@pytest.mark.parametrize("tag", [run[0] for run in EXPERT_RUNS])
def test_expert_parallel_equals_one_process_on_the_full_batch(ranks, tag):
    _, got = ranks
    shared, collapsed = tag.endswith("_shared"), tag.endswith("_collapsed")
    params, losses, counter = single_process(shared, collapsed)
    initial = problem(shared, collapsed)[1]
    for name, p in params.items():
        _assert_update_close(got[0][f"{tag}_{name}"], initial[name], p.numpy(), f"{tag} {name}")
    for r in range(WORLD):
        np.testing.assert_allclose(got[r][f"{tag}_losses"], losses, rtol=RTOL_LOSS, err_msg=f"losses, rank {r}")
        np.testing.assert_array_equal(got[r][f"{tag}_counter"], counter, err_msg=f"counter, rank {r}")


@pytest.mark.parametrize("tag", [run[0] for run in EXPERT_RUNS])
def test_expert_parallel_checkpoint_loads_in_one_process_with_the_same_x_hat(ranks, tag):
    """The 2-process model's x_hat (each rank its half of a probe batch, through the sharded
    experts) == the gathered checkpoint's, loaded in this one process."""
    out, got = ranks
    probe = problem(tag.endswith("_shared"), tag.endswith("_collapsed"))[4]
    sae = load(out / f"{tag}_ckpt", backend="torch")
    assert sae.params["W_enc"].shape[0] == 4  # whole: both ranks' experts
    x_hat = sae.forward(probe.astype(np.float32)).x_hat.numpy()
    distributed = np.concatenate([got[r][f"{tag}_xhat"] for r in range(WORLD)])
    np.testing.assert_allclose(x_hat, distributed, rtol=0, atol=RTOL_XHAT * np.abs(x_hat).max())


@pytest.mark.parametrize("tag, exchange, variant", EXPERT_RUNS)
def test_counted_traffic_matches_the_model(ranks, tag, exchange, variant):
    """Bytes received per step, as the collectives counted them, summed over both ranks, equal
    `core.parallel.exchange_bytes` (AuxK on) with the measured share of remote tokens."""
    _, got = ranks
    cfg = problem(variant == "shared")[0]
    local = BATCH // WORLD
    remote = sum(int(got[r][f"{tag}_remote"]) for r in range(WORLD)) / (WORLD * local)
    model = parallel.exchange_bytes(exchange, local, cfg.d_in, cfg.routed_k, WORLD, auxk=True,
                                    n_experts=cfg.n_experts, remote_fraction=remote)
    counted = sum(got[r][f"{tag}_bytes"] for r in range(WORLD))
    expected = np.array([WORLD * model[n] for n in TRAFFIC])
    np.testing.assert_allclose(counted, expected, rtol=0, atol=WORLD, err_msg=str(dict(zip(TRAFFIC, counted))))
    if tag == "ep_all_to_all":
        gathered = sum(got[r]["ep_all_gather_bytes"] for r in range(WORLD))
        assert counted.sum() < 0.75 * gathered.sum()  # R = 2: about half


def test_exchange_model_at_a_realistic_config():
    """d 768, N 16, 8 ranks, 4096 tokens per rank, k 32, float32: all-gather moves (R - 1) * batch
    rows per rank each way, all-to-all (R - 1) / R * batch; written out independently here."""
    d, n, world, batch, k = 768, 16, 8, 4096, 32
    for auxk in (False, True):
        out = (2 if auxk else 1) * d * 4
        row = 2 * (d + 1) * 4 + 2 * out + 2 * k * 4  # dispatch, combine (fwd + bwd), values + ids
        gathered = parallel.exchange_bytes("all_gather", batch, d, k, world, auxk=auxk, n_experts=n)
        direct = parallel.exchange_bytes("all_to_all", batch, d, k, world, auxk=auxk, n_experts=n)
        assert gathered["total"] == (world - 1) * batch * (row + 4)  # + int32 expert ids
        assert direct["total"] == (world - 1) * batch // world * row + (world - 1) * (n // world) * 8
        assert direct["total"] / gathered["total"] == pytest.approx(1 / world, rel=1e-3)
    assert gathered["total"] == 536_166_400 and direct["total"] == 67_006_576  # AuxK on


def test_batch_statistics_of_two_equal_halves_are_the_half_batch_ones():
    """Two processes holding the same half: the sum over processes is twice the local value, so
    f_i is the half's and each process's share of the total variance (of the doubled batch,
    which is twice the half's) is the half's own; with spread-out halves the 2-process runs
    above check the combination."""
    cfg, _, batches, _, _ = problem()
    x = batches[0][:BATCH // 2]
    experts = np.random.default_rng(0).integers(0, cfg.n_experts, size=(BATCH // 2, 1))
    stats, xp = parallel.BatchStatistics(lambda a: 2 * a, 2), np_xp
    np.testing.assert_allclose(stats.total_variance(x, xp), L.total_variance(x, xp), rtol=1e-12)
    np.testing.assert_array_equal(stats.expert_fractions(experts, cfg.n_experts, np.float64, xp),
                                  L.expert_fractions(experts, cfg.n_experts, np.float64, xp))
    whole = np.concatenate([x, x + 1.0])  # one process: the spec's own, to the bit
    assert parallel.BatchStatistics().total_variance(whole, xp) == L.total_variance(whole, xp)


def test_partition_errors_are_clear():
    cfg = problem()[0]
    with pytest.raises(ConfigError, match="n_experts \\(4\\) divisible by the number of processes \\(3\\)"):
        parallel.check_parallel(cfg, 3, "expert")
    with pytest.raises(ConfigError, match="top-1 routing"):
        parallel.check_parallel(cfg.replace(experts_per_token=2), 2, "expert")
    parallel.check_parallel(cfg.replace(experts_per_token=2), 3, "data")  # data parallel: anything
    with pytest.raises(ConfigError, match="batch size \\(10\\) must be divisible"):
        parallel.batch_rows(10, 4, 0)
    assert parallel.expert_range(16, 8, 3) == (6, 8) and parallel.batch_rows(64, 2, 1) == slice(32, 64)


def test_process_bytes_model_and_a_two_process_check():
    """Bytes per process written out independently (d 768, 4 experts of 2048 latents, 2
    processes: W_enc and W_dec halved; the router N x d and b_pre, b_router replicated;
    4 copies each), then one gloo step: what each rank holds and the replicated-gradient sums
    it receives equal the model exactly; the token exchange is within 10 % (the model assumes
    balanced routing)."""
    from switchsae.bench import comm_volume

    cfg = comm_volume.scale_config(13)
    expert, replicated = 2 * 4 * 768 * 2048 // 2, 4 * 768 + 2 * 768  # floats
    held = parallel.process_bytes(cfg, 2)
    assert held == {"expert_params": 4 * expert, "replicated_params": 4 * replicated,
                    "total": 16 * (expert + replicated)}
    assert parallel.gradient_sum_bytes(cfg, 2) == 4 * replicated  # 2 (R - 1) / R = 1
    row = comm_volume.scale_row(cfg, 2)
    for rank in comm_volume.check_scale(13):
        assert rank["held"] == row["total"] and rank["counted"]["grads"] == row["gradient_sum"]
        exchange = sum(rank["counted"].get(k, 0) for k in comm_volume.LABELS)
        assert abs(exchange - row["exchange"]) <= 0.1 * row["exchange"], (exchange, row["exchange"])


def test_comm_volume_tool_prints_the_model(capsys):
    from switchsae.bench import comm_volume

    assert comm_volume.main([]) == 0
    out = capsys.readouterr().out
    assert "all_to_all moves 12.5% of all_gather's bytes" in out and "360.01 MB" in out


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
