"""The evaluation experiments (experiments.paper, experiments.variants): the run plans, and a
smoke run of the variants experiment on a few MiniLM-L6 texts whose recorded numbers are
checked against the saved checkpoints, `switchsae.core.flops` and a fresh evaluation."""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import array_api_compat.numpy as xnp
import numpy as np
import pytest
from switchsae.core import metrics
from switchsae.core.config import SwitchSAEConfig
from switchsae.core.flops import forward_flops, train_flops

import switchsae
from switchsae.data import ArraySource

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # experiments/ is not installed
from experiments import paper, step_breakdown, variants

CFG_KW = {"auxk_coef": 1 / 32, "dead_tokens": 100_000}
NAMES = ["dense"] + [f"{fam} N=8 {v}" for fam in ("width-matched", "flop-matched")
                     for v in ("switch", "shared", "e=2", "shared+e=2")]


# -- plans ---------------------------------------------------------------------------------
def test_variant_plan_matches_width_and_training_flops_exactly_at_the_default_sizes():
    runs = variants.plan(384, 720, 16, 8, 2, **CFG_KW)
    assert [r.name for r in runs] == NAMES
    dense = runs[0].cfg
    assert (dense.n_experts, dense.total_latents) == (1, 720)
    for r in runs[1:]:
        c = r.cfg
        assert c.k == 16 and c.n_experts == 8 and c.auxk_coef == dense.auxk_coef
        assert c.experts_per_token == (2 if "e=2" in r.variant else 1)
        assert c.shared_latents == (c.expert_width if "shared" in r.variant else 0)
        assert c.shared_k == (4 if "shared" in r.variant else 0)
        if r.family == "width-matched":
            assert c.total_latents == 720
        else:
            assert train_flops(c)["total"] == train_flops(dense)["total"]
            assert abs(forward_flops(c)["total"] / forward_flops(dense)["total"] - 1) < 0.025
    widths = {r.name: r.cfg.expert_width for r in runs}
    assert widths["width-matched N=8 switch"] == 90 and widths["width-matched N=8 shared"] == 80
    assert widths["flop-matched N=8 switch"] == 696 and widths["flop-matched N=8 shared+e=2"] == 232


@pytest.mark.parametrize("match", ["train", "forward"])
def test_flop_matched_width_is_the_closest_integer_width(match):
    count = variants.MATCH[match]
    runs = variants.plan(384, 700, 12, 4, 3, shared_k=5, match=match, **CFG_KW)
    target = count(runs[0].cfg)["total"]
    for r in runs[5:]:
        c, m = r.cfg, r.cfg.expert_width
        gap = abs(count(c)["total"] - target)
        for other in (m - 1, m + 1):
            shared = {"shared_latents": other} if c.shared_latents else {}
            near = c.replace(n_latents=4 * other, **shared)
            assert abs(count(near)["total"] - target) >= gap, (r.name, other)


def test_plans_reject_widths_that_do_not_split():
    with pytest.raises(ValueError, match="9 experts"):
        variants.plan(384, 768, 16, 8, 2, **CFG_KW)  # 768 = 8 * 96, but not 9 * m
    with pytest.raises(ValueError, match="shared_k"):
        variants.plan(384, 720, 16, 8, 2, shared_k=16)
    with pytest.raises(ValueError, match="experts per token"):
        variants.plan(384, 720, 16, 8, 9)
    with pytest.raises(ValueError, match="split into 8"):
        paper.plan(384, 100, 4, (8,))


def test_paper_plan_and_names_are_unchanged():
    runs = paper.plan(384, 64, 4, (4, 8))
    assert [r.name for r in runs] == ["dense", "flop-matched N=4", "flop-matched N=8",
                                      "width-matched N=4", "width-matched N=8"]
    assert [r.cfg.n_latents for r in runs] == [64, 256, 512, 64, 64]


def test_measure_counts_duplicates_between_the_shared_and_routed_experts():
    cfg = SwitchSAEConfig(d_in=16, n_latents=24, n_experts=3, k=4, shared_latents=8, shared_k=1)
    sae = switchsae.SwitchSAE.init(cfg, seed=1, backend="numpy")
    params = sae.numpy_params()
    params["W_dec_shared"][:3] = params["W_dec"][1, :3] * 2.0  # 3 shared rows = routed rows
    sae = switchsae.SwitchSAE.from_params(cfg, params, "numpy")
    data = np.random.default_rng(0).normal(size=(64, 16)).astype(np.float32)
    row = paper.measure(paper.Run("width-matched", cfg, "shared"), sae, ArraySource(data, 64, shuffle=False),
                        [], 3, None)
    assert row["duplication"] == pytest.approx(6 / 32)  # both copies of each pair, of N*m + m_s
    assert row["total_latents"] == 32 and math.isnan(row["fidelity"])
    with pytest.raises(ValueError, match="as wide"):
        paper.expert_decoders(switchsae.SwitchSAE.init(cfg.replace(shared_latents=6), backend="numpy"))


# -- the smoke run ---------------------------------------------------------------------------
ARGS = ["--quick", "--steps", "6", "--max-texts", "40", "--fidelity-texts", "1", "--no-progress"]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("variants")
    assert variants.main([*ARGS, "--out", str(out)]) == 0
    return out, json.loads((out / "results.json").read_text())


def test_smoke_run_writes_the_table_the_plot_and_one_checkpoint_per_run(smoke):
    out, results = smoke
    rows = results["runs"]
    assert [r["name"] for r in rows] == NAMES
    md = (out / "results.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("| ") and not line.startswith("| run")]
    assert [line.split(" | ")[0][2:] for line in table] == NAMES
    assert (out / "fvu_vs_flops.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == sorted(r["checkpoint"] for r in rows)
    assert results["meta"]["match"] == "train" and results["meta"]["budget"]["steps"] == 6
    for r in rows:  # the table shows the recorded numbers
        line = next(line for line in table if line.startswith(f"| {r['name']} |"))
        assert f"| {r['fvu']:.4f} |" in line and f"| {r['duplication']:.3f} |" in line
        assert f"{r['flops_train']:,} (" in line and f"{r['flops_forward']:,} (" in line


def test_smoke_run_numbers_match_the_checkpoints_flops_and_a_fresh_evaluation(smoke):
    from switchsae.training import evaluate

    out, results = smoke
    rows = results["runs"]
    _, held_out, _ = paper.load_data(3, 256, 0, 40, progress=False)
    for r in rows:
        sae = switchsae.load(out / "checkpoints" / r["checkpoint"], backend="torch")
        cfg = sae.cfg
        assert r["flops_train"] == train_flops(cfg)["total"]
        assert r["flops_forward"] == forward_flops(cfg)["total"]
        assert (r["total_latents"], r["n_experts"], r["experts_per_token"], r["shared_latents"], r["k"]) == \
            (cfg.total_latents, cfg.n_experts, cfg.experts_per_token, cfg.shared_latents, cfg.k)
        blocks = [sae.numpy_params()["W_dec"]]
        if cfg.shared_latents:
            blocks.append(sae.numpy_params()["W_dec_shared"][None])
        W_dec = np.concatenate(blocks).astype(np.float64)
        assert r["duplication"] == pytest.approx(float(metrics.duplication_fraction(W_dec, xnp)))
        ev = evaluate(sae, held_out)
        assert ev.tokens == r["eval_tokens"]
        assert r["fvu"] == pytest.approx(ev.fvu, rel=1e-4)
        assert r["dead_fraction"] == pytest.approx(ev.dead_fraction)
        assert len(ev.firing_frequency) == cfg.total_latents
    dense = rows[0]
    width = [r for r in rows if r["family"] == "width-matched"]
    assert {r["total_latents"] for r in width} == {dense["total_latents"]}
    # "gap closed" in the table is recomputed from the FVUs
    switch = next(r["fvu"] for r in width if r["variant"] == "switch")
    md = (out / "results.md").read_text()
    for r in width:
        cell = re.search(rf"\| {re.escape(r['name'])} \|(?:[^|]*\|){{6}} ([-0-9.na]+) \|", md).group(1)
        assert float(cell) == pytest.approx((switch - r["fvu"]) / (switch - dense["fvu"]), abs=0.006)


def test_summarise_averages_seeds_and_divides_by_dense():
    def row(name, family, seed, fvu, wall, load):
        return {"name": name, "family": family, "seed": seed, "fvu": fvu, "train_wall_s": wall,
                "n_experts": len(load),
                "expert_load": load, **{k: 0.5 for k in paper.MEANS if k not in ("fvu", "train_wall_s")}}

    sizes = {"n_latents": 8, "expert_width": 8, "max_entropy": 1.0, "flops_forward": 1,
             "flops_train": 1}
    rows = [row("flop-matched N=2", "flop-matched", 0, 0.16, 12.0, [0.4, 0.6]), row("dense", "dense", 0, 0.20, 10.0, [1.0]),
            row("dense", "dense", 1, 0.22, 14.0, [1.0]), row("flop-matched N=2", "flop-matched", 1, 0.18, 12.0, [0.6, 0.4])]
    dense, switch = paper.summarise(rows)
    assert (dense["name"], switch["name"]) == ("dense", "flop-matched N=2")
    assert dense["fvu"] == pytest.approx(0.21) and dense["fvus"] == [0.20, 0.22] and dense["seeds"] == [0, 1]
    assert dense["fvu_sd"] == pytest.approx(0.02 / 2**0.5)  # sample sd of two values: |a - b| / sqrt 2
    assert switch["fvu_vs_dense"] == pytest.approx(0.17 / 0.21)
    assert switch["wall_vs_dense"] == pytest.approx(12.0 / 12.0) and switch["expert_load"] == [0.5, 0.5]
    assert paper.summarise(rows[:2])[0]["fvu_sd"] == 0.0  # one seed: no spread; dense first
    md = paper.table([{**sizes, **r} for r in paper.summarise(rows)])
    assert "| 0.2100 ± 0.0141 | 1.000 |" in md and "| 0.1700 ± 0.0141 | 0.810 |" in md


# -- step_breakdown -------------------------------------------------------------------------
def test_step_breakdown_times_the_hooks_of_training_steps_only():
    """The timer counts a step's loss and gradients with its encode and decode forwards inside
    (torch's encode_topk calls encode_topk_aux: timed once), the steps given a dead mask as AuxK
    steps, nothing from a forward outside a step, and leaves the class's hooks in place after."""
    from switchsae.core import adam_init, init_params, spec, train_step

    be = switchsae.get_backend("torch")
    cfg = SwitchSAEConfig(d_in=16, n_latents=64, n_experts=4, k=4, auxk_coef=1 / 32)
    params = be.training_layout({n: be.asarray(p, "float32") for n, p in init_params(cfg, 0).items()})
    state = adam_init(params, be.xp)
    x = be.asarray(np.random.default_rng(0).normal(size=(256, 16)), "float32")
    dead = be.asarray(np.arange(64) % 5 == 0)
    timer = step_breakdown.HookTimer(be)
    for mask in (dead, None, dead):
        params, state, _ = train_step(be, cfg, params, state, x, 1e-3, mask)
    assert timer.auxk_steps == 2
    seconds = dict(timer.seconds)
    assert all(seconds[g] > 0 for g in step_breakdown.HOOKS)
    assert seconds["encode"] + seconds["decode"] < seconds["loss_grads"]
    spec.forward(params, x, cfg, be, dead)  # an evaluation-like forward, outside a step
    assert dict(timer.seconds) == seconds and timer.auxk_steps == 2
    timer.restore()
    assert "update" not in vars(be) and type(be).update is be.update.__func__
    parts = step_breakdown.breakdown(seconds, 0.3, 3)
    assert parts["backward_rest"] == pytest.approx(1e3 * (seconds["loss_grads"] - seconds["encode"]
                                                          - seconds["decode"]) / 3)
    assert parts["rest"] == pytest.approx(100.0 - 1e3 * (seconds["optimiser"] + seconds["loss_grads"]) / 3)


def test_step_breakdown_refuses_a_backend_that_compiles_its_step():
    with pytest.raises(ValueError, match="eager backends only; 'jax'"):
        step_breakdown.HookTimer(switchsae.get_backend("jax"))
