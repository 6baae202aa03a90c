"""The trainer: schedule, normalisation, initialisation, learning, metrics, fail-fast checks,
evaluation and the report.  Synthetic data, tiny models."""

from __future__ import annotations

import itertools
import json

import array_api_compat.numpy as np_xp
import numpy as np
import pytest
from switchsae.core.config import ConfigError
from switchsae.core.init import geometric_median, init_params

import switchsae
from switchsae import SwitchSAE, SwitchSAEConfig
from switchsae.checkpoint import list_checkpoints, read_checkpoint
from switchsae.data import ArraySource, DataError
from switchsae.training import (
    NonFiniteError,
    TrainConfig,
    Trainer,
    evaluate,
    learning_rate,
    write_report,
)
from switchsae.training.normalize import estimate_scale, fold_scale
from switchsae.training.report import density_histogram

D, M, N, K = 32, 128, 4, 4
CFG = SwitchSAEConfig(d_in=D, n_latents=M, n_experts=N, k=K)
NUMPY = switchsae.get_backend("numpy")


def sparse_data(n=4096, d=D, atoms=96, active=3, seed=0, offset=2.0, scale=5.0) -> np.ndarray:
    """Tokens that are sparse sums of unit atoms (one fixed dictionary; `seed` draws the
    codes), shifted and scaled like real activations."""
    dictionary = np.random.default_rng(1234).normal(size=(atoms, d))
    rng = np.random.default_rng(seed)
    dictionary /= np.linalg.norm(dictionary, axis=1, keepdims=True)
    codes = np.zeros((n, atoms))
    for row in codes:
        row[rng.choice(atoms, active, replace=False)] = rng.exponential(1.0, size=active)
    return (scale * (codes @ dictionary) + offset).astype(np.float32)


def tc(**kw) -> TrainConfig:
    base = {"steps": 60, "batch_size": 128, "lr": 1e-2, "log_every": 10, "checkpoint_every": 1000}
    return TrainConfig(**{**base, **kw})


# -- schedule and normalisation -----------------------------------------------------------
def test_schedule_warms_up_holds_and_decays_to_zero_over_the_last_fifth():
    rates = [learning_rate(s, 100, 1.0, warmup_steps=10, decay_fraction=0.2) for s in range(100)]
    assert rates[0] == pytest.approx(0.1) and rates[9] == 1.0
    assert rates[10:80] == [1.0] * 70
    assert rates[80] == 1.0 and rates[99] == pytest.approx(1 / 20)
    assert all(a > b for a, b in itertools.pairwise(rates[80:]))
    with pytest.raises(ValueError, match="outside"):
        learning_rate(100, 100, 1.0)


def test_warmup_that_runs_into_the_decay_is_a_config_error():
    with pytest.raises(ConfigError, match="warmup_steps"):
        TrainConfig(steps=100, warmup_steps=90)


def test_scale_is_a_power_of_two_bringing_the_mean_squared_norm_near_d():
    x = sparse_data(512)
    s = estimate_scale(x)
    assert np.log2(s) == round(np.log2(s))
    mean_sq = np.mean(np.sum((s * x.astype(np.float64)) ** 2, axis=-1))
    assert D / 2 <= mean_sq <= 2 * D


def test_folding_the_scale_gives_the_same_model_on_raw_activations():
    """Model on s * x, folded, applied to x == (model on s * x) / s, with the same latents.
    s is a power of two, so the tolerance is float32 rounding of the products only."""
    params = {k: v.astype(np.float32) for k, v in init_params(CFG.replace(encoder_bias=True), 1).items()}
    rng = np.random.default_rng(2)
    for name in ("b_pre", "b_router", "b_enc"):
        params[name] = rng.normal(size=params[name].shape).astype(np.float32)
    cfg, x, s = CFG.replace(encoder_bias=True), sparse_data(64), 0.125
    scaled = SwitchSAE.from_params(cfg, params, NUMPY).forward(x * s)
    raw = SwitchSAE.from_params(cfg, fold_scale(params, s), NUMPY).forward(x)
    assert np.array_equal(raw.top_indices, scaled.top_indices)
    np.testing.assert_allclose(raw.x_hat, scaled.x_hat / s, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(raw.router_probs, scaled.router_probs, rtol=1e-6)


# -- training -----------------------------------------------------------------------------
def test_biases_start_at_the_geometric_median_of_the_first_batch():
    data = sparse_data(1024)
    first = ArraySource(data, 128, seed=5).next_batch()
    trainer = Trainer(CFG, tc(steps=1), ArraySource(data, 128, seed=5), NUMPY, progress=False)
    trainer.run()
    scaled = first * trainer.scale
    median = geometric_median(scaled.astype(np.float64), np_xp)
    # after one update: Adam's first step moves each entry by at most lr (|m_hat / sqrt(v_hat)| <= 1)
    params = trainer.params
    assert np.max(np.abs(params["b_pre"] - median)) <= 1.01 * 1e-2
    assert np.max(np.abs(params["b_router"] - median)) <= 1.01 * 1e-2
    assert np.linalg.norm(median - scaled.mean(0)) > 0.01  # the median is not just the mean


def test_training_reduces_fvu_and_logs_metrics(tmp_path):
    data = sparse_data()
    trainer = Trainer(CFG, tc(steps=150, out_dir=str(tmp_path / "run")), ArraySource(data, 128, seed=0),
                      NUMPY, progress=False)
    result = trainer.run()
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(10, 151, 10))
    assert lines == result.history
    for key in ("fvu", "nmse", "l0", "dead_fraction", "expert_load", "load_entropy", "loss_mse",
                "loss_lb", "loss_auxk", "loss_total", "tokens_per_s", "lr"):
        assert key in lines[-1], key
    assert len(lines[-1]["expert_load"]) == N and sum(lines[-1]["expert_load"]) == pytest.approx(1, abs=1e-4)
    # measured 0.77 at step 10 and 0.30 at step 150 on this data (lr 1e-2); the bounds leave
    # room for float differences yet fail for a trainer that does not learn
    assert lines[0]["fvu"] > 0.6 and lines[-1]["fvu"] < 0.4
    assert lines[-1]["l0"] == K
    ck = list_checkpoints(tmp_path / "run")
    assert [p.name for p in ck] == ["step_00000150"]
    loaded = switchsae.load(tmp_path / "run", backend="numpy")
    held_out = evaluate(loaded, ArraySource(sparse_data(seed=9), 512))
    assert held_out.fvu < 0.4


def test_checkpoints_hold_the_model_for_raw_activations(tmp_path):
    data = sparse_data()
    trainer = Trainer(CFG, tc(steps=20, out_dir=str(tmp_path / "run")), ArraySource(data, 128), NUMPY,
                      progress=False)
    result = trainer.run()
    assert trainer.scale != 1.0  # the data is far from mean squared norm d
    loaded = switchsae.load(tmp_path / "run", backend="numpy")
    x = data[:256]
    np.testing.assert_array_equal(loaded.forward(x).x_hat, result.sae.forward(x).x_hat)
    inner = SwitchSAE.from_params(CFG, {k: NUMPY.to_numpy(v) for k, v in trainer.params.items()}, NUMPY)
    np.testing.assert_allclose(loaded.forward(x).x_hat, inner.forward(x * trainer.scale).x_hat / trainer.scale,
                               rtol=1e-5, atol=1e-5)


def test_auxk_uses_the_dead_latents(tmp_path):
    """With a short dead window, latents that stop firing get the AuxK loss."""
    cfg = CFG.replace(auxk_coef=1 / 32)
    trainer = Trainer(cfg, tc(steps=40, dead_tokens=256), ArraySource(sparse_data(), 128), NUMPY,
                      progress=False)
    history = trainer.run().history
    assert any(r["dead_fraction"] > 0 for r in history)
    assert any(r["loss_auxk"] > 0 for r in history if r["dead_fraction"] > 0)


def test_the_derived_dead_window_is_per_expert_when_counting_per_expert():
    """Counting a latent's silence in its expert's tokens, the derived window is 5% of what one
    expert sees in the run (1/N of the run's tokens), so latents that stop firing are found
    and revived; a whole-run window (5% of all tokens) would be N times longer."""
    cfg = CFG.replace(auxk_coef=1 / 32)
    data = ArraySource(sparse_data(), 128)
    per_expert = Trainer(cfg, tc(steps=40), data, NUMPY, progress=False)
    assert per_expert.dead_tokens == round(0.05 * 40 * 128 / N)
    whole_batch = Trainer(cfg, tc(steps=40, dead_count="batch"), data, NUMPY, progress=False)
    assert whole_batch.dead_tokens == round(0.05 * 40 * 128)
    history = per_expert.run().history
    assert any(r["dead_fraction"] > 0 and r["loss_auxk"] > 0 for r in history)


def test_auxk_is_skipped_exactly_while_no_latent_is_dead():
    """The trainer passes no dead mask while none is dead: the same step as with an all-False
    mask (AuxK is 0 with no gradient), without AuxK's work; a dead latent brings the mask back."""
    cfg = CFG.replace(auxk_coef=1 / 32)
    trainer = Trainer(cfg, tc(steps=5, dead_tokens=10**6), ArraySource(sparse_data(), 128), NUMPY,
                      progress=False)
    trainer.counter = np.zeros(cfg.total_latents, dtype=np.float32)  # as a fresh run starts
    assert trainer._dead_mask() is None
    x = sparse_data(128, seed=3)
    params = init_params(cfg, 0)
    with_mask = NUMPY.loss_and_grads(params, x, cfg, np.zeros(cfg.total_latents, dtype=bool))
    without = NUMPY.loss_and_grads(params, x, cfg, None)
    assert float(with_mask[0].losses["auxk"]) == 0.0
    for name in params:
        np.testing.assert_array_equal(with_mask[1][name], without[1][name], err_msg=name)
    trainer.counter[7] = 10**6
    assert trainer._dead_mask() is not None and bool(trainer._dead_mask()[7])


def test_every_backend_trains_with_the_same_loop(backend_name):
    """The loop only uses the Backend interface: each backend learns the data too."""
    result = Trainer(CFG, tc(steps=90), ArraySource(sparse_data(), 128), backend_name, progress=False).run()
    # numpy: 0.77 at step 10, ~0.36 at step 90
    assert result.history[0]["fvu"] > 0.6 and result.history[-1]["fvu"] < 0.5
    assert result.sae.backend.name == backend_name


# -- fail fast ----------------------------------------------------------------------------
class _Poisoned(ArraySource):
    """ArraySource whose batch number `at` (1-based) gets `value` in one entry."""

    def __init__(self, data, at, value):
        super().__init__(data, 128, seed=0)
        self.calls, self.at, self.value = 0, at, value

    def next_batch(self, rows=None):
        batch = super().next_batch(rows).copy()
        self.calls += 1
        if self.calls == self.at:
            batch[7, 3] = self.value
        return batch


def test_nan_activations_stop_training_naming_step_and_tensor(tmp_path):
    trainer = Trainer(CFG, tc(steps=10, checkpoint_every=1, out_dir=str(tmp_path / "run")),
                      _Poisoned(sparse_data(), at=4, value=np.nan), NUMPY, progress=False)
    with pytest.raises(NonFiniteError, match=r"step 4: activations hold NaN/inf \(batch row 7, column 3\)"):
        trainer.run()
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step_00000002", "step_00000003"]
    assert read_checkpoint(tmp_path / "run").trainer_state["step"] == 3


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning",
                            "ignore:invalid value encountered:RuntimeWarning")
def test_overflowing_loss_stops_training_and_saves_nothing_corrupt(tmp_path):
    """Finite but huge activations make the float32 MSE overflow: stop at that step, keep the
    last good checkpoint, write nothing after it."""
    trainer = Trainer(CFG, tc(steps=10, checkpoint_every=1, out_dir=str(tmp_path / "run")),
                      _Poisoned(sparse_data(), at=3, value=1e30), NUMPY, progress=False)
    with pytest.raises(NonFiniteError, match="step 3: loss 'mse' is inf"):
        trainer.run()
    assert list_checkpoints(tmp_path / "run")[-1].name == "step_00000002"
    switchsae.load(tmp_path / "run", backend="numpy")  # loads: finite, complete


@pytest.mark.parametrize("make, error, message", [
    (lambda: (CFG, tc(), ArraySource(np.ones((64, D + 1), np.float32), 128)), DataError, "d_in=33"),
    (lambda: (CFG, tc(), ArraySource(sparse_data(256), 64)), ConfigError, "batch_size is 128"),
    (lambda: (CFG.replace(dtype="bfloat16"), tc(), ArraySource(sparse_data(256), 128)), ConfigError,
     "does not support dtype 'bfloat16'"),
])
def test_bad_setups_fail_before_any_work(make, error, message):
    cfg, train_cfg, source = make()
    with pytest.raises(error, match=message):
        Trainer(cfg, train_cfg, source, NUMPY, progress=False)
    assert source.epoch == 0 and source.offset == 0  # no batch was drawn


# -- evaluation and report ----------------------------------------------------------------
def test_evaluate_counts_tokens_latents_and_experts():
    sae = SwitchSAE.init(CFG, seed=3, backend=NUMPY)
    source = ArraySource(sparse_data(1000), 300, shuffle=False)
    result = evaluate(sae, source, max_tokens=900)
    assert result.tokens == 900
    # every token fires exactly k latents (positive pre-activations exist here), so the
    # frequencies sum to L0; the loads are fractions of tokens
    assert result.firing_frequency.sum() == pytest.approx(result.l0, rel=1e-6)
    assert sum(result.expert_load) == pytest.approx(1.0)
    assert result.dead_fraction == pytest.approx(np.mean(result.firing_frequency == 0))
    assert result.dense_fraction == pytest.approx(np.mean(result.firing_frequency > 0.1))
    x = sparse_data(1000)[:900]
    out = sae.forward(x)
    expected_fvu = np.mean([float(np.sum((x[i:i + 300] - out.x_hat[i:i + 300]) ** 2) /
                                  np.sum((x[i:i + 300] - x[i:i + 300].mean(0)) ** 2)) for i in (0, 300, 600)])
    assert result.fvu == pytest.approx(expected_fvu, rel=1e-5)


def test_evaluate_never_takes_a_one_row_batch():
    """601 rows in batches of 300 would leave one row for last, whose variance is 0; the second
    batch hands its last row on, so the batches are 300, 299 and 2 rows, all finite."""
    sae = SwitchSAE.init(CFG, seed=3, backend=NUMPY)
    x = sparse_data(1000)[:601]
    with np.errstate(all="raise"):
        result = evaluate(sae, ArraySource(sparse_data(1000), 300, shuffle=False), max_tokens=601)
    out = sae.forward(x)
    parts = [(0, 300), (300, 599), (599, 601)]
    expected = sum((b - a) * float(np.sum((x[a:b] - out.x_hat[a:b]) ** 2) /
                                   np.sum((x[a:b] - x[a:b].mean(0)) ** 2)) for a, b in parts) / 601
    assert result.tokens == 601 and np.isfinite(result.fvu)
    assert result.fvu == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("rows, max_tokens, error, message", [
    (1, None, DataError, "cannot evaluate on 1 token"), (64, 1, ConfigError, "max_tokens must be an integer >= 2")])
def test_evaluate_refuses_fewer_than_two_tokens(rows, max_tokens, error, message):
    sae = SwitchSAE.init(CFG, seed=3, backend=NUMPY)
    with pytest.raises(error, match=message):
        evaluate(sae, ArraySource(sparse_data(64)[:rows], rows), max_tokens)


def test_density_histogram_bins_log_frequency_and_counts_the_never_fired():
    freq = np.array([0.0, 0.0, 1e-3, 2e-3, 0.05, 0.5])
    edges, counts, dead = density_histogram(freq)
    assert dead == 2 and counts.sum() == 4 and edges[-1] == 0.0
    assert counts[np.searchsorted(edges, np.log10(0.5), side="right") - 1] == 1


def test_report_files(tmp_path):
    data = sparse_data()
    result = Trainer(CFG, tc(steps=20), ArraySource(data, 128), NUMPY, progress=False).run()
    evaluation = evaluate(result.sae, ArraySource(data, 512))
    paths = write_report(tmp_path, {"backend": "numpy", "steps": 20}, evaluation, "training data",
                         result.history)
    text = paths["report"].read_text()
    assert "FVU" in text and "never fired" in text and "backend" in text
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads(paths["eval"].read_text())["fvu"] == pytest.approx(evaluation.fvu)
