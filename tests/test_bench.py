"""The benchmark machinery on a tiny config: records are complete and self-consistent."""

import json

import numpy as np

from switchsae.backends import load_backend
from switchsae.bench import run as bench_run
from switchsae.bench.__main__ import main as bench_main
from switchsae.bench.plots import plot
from switchsae.core.config import SwitchSAEConfig
from switchsae.core.flops import train_flops


def test_time_config_record_is_consistent():
    backend = load_backend("numpy")
    cfg = SwitchSAEConfig(d_in=16, n_latents=64, n_experts=4, k=4)
    rec = bench_run.time_config(backend, cfg, batch=64, repeats=2)
    step = rec["train_step"]
    assert step["min_s"] <= step["median_s"] <= step["max_s"]
    # the timed step has no dead mask, so AuxK (on in the default config) runs no FLOPs
    assert cfg.auxk_coef > 0 and step["useful_flop"] == train_flops(cfg.replace(auxk_coef=0.0))["total"] * 64
    np.testing.assert_allclose(step["flop_per_s"], step["useful_flop"] / step["median_s"])
    np.testing.assert_allclose(step["tokens_per_s"], 64 / step["median_s"])
    assert step["peak_memory_bytes"] >= 0 and step["memory_measure"]
    for part in ("encode", "forward"):
        assert rec[part]["tokens_per_s"] > 0


def test_full_grid_takes_the_papers_batch_unless_told():
    for backend in ("torch", "jax"):
        assert {c["batch"] for c in bench_run.grid("default", backend)["speed"]} == {bench_run.PAPER_BATCH}
        sizes = bench_run.grid("default", backend, 4096)
        assert {c["batch"] for c in sizes["speed"] + sizes["memory"]} == {4096}
    assert {c["batch"] for c in bench_run.grid("default", "numpy", 4096)["speed"]} == {1024}  # small grid


def test_gpu_grid_sweeps_experts_and_dictionary_size_at_any_width():
    for d in (768, 2304):
        g = bench_run.grid("gpu", "torch", d_in=d)
        assert [(c["n_experts"], c["n_latents"], c["d_in"], c["k"]) for c in g["speed"]] == \
            [(n, 32 * d, d, 32) for n in (1, 8, 16, 32)]
        assert [c["n_latents"] for c in g["memory"]] == [2**16, 2**18, 2**20]
        assert {c["batch"] for c in g["speed"] + g["memory"]} == {bench_run.PAPER_BATCH}
    assert [c["n_latents"] for c in bench_run.grid("default", "torch")["memory"]] == [6144, 24576, 98304]
    assert bench_run.grid("quick", "torch", 256, 32)["speed"][0]["batch"] == 256


def test_a_gpu_measures_its_peak_on_a_gpu_sized_product():
    """A 2048^3 product is launch-bound on an H100 (~20 us): its FLOP/s would understate the
    peak and overstate every fraction, so accelerators measure at 8192."""

    class Device:
        def __init__(self, name):
            self.device_name = lambda: name

    g = bench_run.grid("default", "torch")
    assert bench_run.peak_size(Device("cuda:0 (NVIDIA H200)"), g) == 8192
    assert bench_run.peak_size(Device("jax gpu (NVIDIA H200)"), g) == 8192
    assert bench_run.peak_size(Device("cpu"), g) == 2048
    assert bench_run.peak_size(Device("jax cpu (cpu)"), g) == 2048


def test_roofline_uses_the_largest_peak_measured_during_the_run(monkeypatch):
    """A machine that speeds up after the first peak measurement must not flatter a fraction:
    the fractions use the largest of the peaks measured before and after every config."""
    tiny = {"speed": [dict(d_in=16, n_latents=64, k=4, batch=64, n_experts=n) for n in (1, 4)],
            "memory": [], "naive": 4, "peak_size": 32}
    peaks = iter([1e9, 5e9, 2e9])  # before the sweep, after N=1, after N=4

    def fake_peak(backend, dtype, size, repeats=5):
        return {"size": size, "flop_per_s": next(peaks)}

    monkeypatch.setattr(bench_run, "grid", lambda name, backend, batch=None, d_in=None: tiny)
    monkeypatch.setattr(bench_run, "matmul_peak", fake_peak)
    res = bench_run.run_backend(load_backend("numpy"), "default", None, 1, log=lambda *_: None)
    assert res["matmul_peaks_flop_per_s"] == [1e9, 5e9, 2e9] and res["matmul_peak"]["flop_per_s"] == 5e9
    for r in res["speed"]:
        np.testing.assert_allclose(r["train_step"]["roofline_fraction"], r["train_step"]["flop_per_s"] / 5e9)
    assert res["dtype"] == "float32" and res["timer"] == "wall clock"


def test_cuda_runs_default_to_bfloat16_and_cuda_events():
    from switchsae.bench.timing import timer_name

    class OnCuda:
        name = "torch"

        def device_name(self):
            return "cuda:0 (NVIDIA H100)"

    assert bench_run.default_dtype(OnCuda()) == "bfloat16" and timer_name(OnCuda()) == "cuda events"
    cpu = load_backend("torch")
    assert bench_run.default_dtype(cpu) == "float32" and timer_name(cpu) == "wall clock"


def test_a_config_that_runs_out_of_memory_is_recorded_and_the_sweep_goes_on(monkeypatch, tmp_path):
    """The memory sweep's largest M may not fit a device (M = 2^20 at d 2304 on an 80 GB GPU):
    the record says so and keeps every other config."""
    tiny = {"speed": [dict(d_in=16, n_latents=64, k=4, batch=64, n_experts=n) for n in (1, 4)],
            "memory": [dict(d_in=16, n_latents=M, k=4, batch=64, n_experts=4) for M in (32, 64)],
            "naive": 4, "peak_size": 32}
    real = bench_run.time_config

    def time_config(backend, cfg, batch, repeats):
        if cfg.n_latents == 32:
            raise MemoryError("Unable to allocate 19.3 GiB")
        return real(backend, cfg, batch, repeats)

    monkeypatch.setattr(bench_run, "grid", lambda name, backend, batch=None, d_in=None: tiny)
    monkeypatch.setattr(bench_run, "time_config", time_config)
    res = bench_run.run_backend(load_backend("numpy"), "default", None, 1, log=lambda *_: None)
    assert [r["n_latents"] for r in res["memory"]] == [64] and len(res["speed"]) == 2
    assert res["out_of_memory"] == [dict(tiny["memory"][0], error="Unable to allocate 19.3 GiB")]
    assert plot({"results": [dict(res, memory=[])]}, tmp_path)  # nothing fitted: no memory series


def test_matmul_peak_counts_2n3_flops():
    peak = bench_run.matmul_peak(load_backend("numpy"), "float32", 64, repeats=2)
    np.testing.assert_allclose(peak["flop_per_s"], 2 * 64**3 / peak["median_s"])


def test_cli_writes_json_and_plots(tmp_path, monkeypatch):
    tiny = {"speed": [dict(d_in=16, n_latents=64, k=4, batch=64, n_experts=n) for n in (1, 4)],
            "memory": [dict(d_in=16, n_latents=M, k=4, batch=64, n_experts=4) for M in (32, 64)],
            "naive": 4, "peak_size": 64}
    monkeypatch.setattr(bench_run, "grid", lambda name, backend, batch=None, d_in=None: tiny)
    monkeypatch.setattr("switchsae.bench.__main__.run_backend", bench_run.run_backend)
    assert bench_main(["--backends", "numpy", "--repeats", "1", "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "results.json").read_text())
    res = record["results"][0]
    assert record["machine"]["cores"] >= 1 and res["device"] == "cpu"
    assert [r["n_experts"] for r in res["speed"]] == [1, 4]
    by_n = {r["n_experts"]: r["train_step"]["tokens_per_s"] for r in res["speed"]}
    np.testing.assert_allclose(res["speedups"]["N4_vs_dense"], by_n[4] / by_n[1])
    for r in res["speed"]:
        np.testing.assert_allclose(r["train_step"]["roofline_fraction"],
                                   r["train_step"]["flop_per_s"] / res["matmul_peak"]["flop_per_s"])
    assert (tmp_path / "throughput.png").stat().st_size > 1000 and (tmp_path / "memory.png").stat().st_size > 1000
    assert plot(record, tmp_path)


def test_peak_rss_sees_an_allocation_after_a_larger_one_was_freed():
    """Memory a previous measurement freed (and the allocator kept) must not hide this one's: the
    measure once reported 0 MiB for a step run after a bigger one."""
    from switchsae.bench.memory import PeakRSS

    big = np.ones(40_000_000)  # 320 MB, touched, then freed
    del big
    with PeakRSS() as rss:
        a = np.ones(10_000_000)  # 80 MB
        del a
    assert 0.9 * 80e6 <= rss.peak_delta <= 1.5 * 80e6, (rss.peak_delta, rss.how)


def test_mlx_peak_memory_uses_its_counter():
    from switchsae.bench.memory import peak_memory

    backend = load_backend("mlx")
    import mlx.core as mx

    peak, how = peak_memory(lambda: mx.ones((1000, 1000)) * 2.0, backend)
    assert how == "mx.get_peak_memory" and 4e6 <= peak <= 1.2e7


def test_scale_sweep_runs_sizes_in_their_own_processes_and_records_ratios(tmp_path, monkeypatch):
    """`switchsae bench scale-sweep`: every (size, optimiser) is measured by a child process
    (--one) whose JSON line becomes a row; dense Adam stops at --dense-max-log2-m; the ratios
    compare the largest size with the smallest; JSON and PNG are written."""
    from switchsae.bench import scale_sweep

    calls = []

    def fake_child(cmd, what):
        log2_m, optimizer = cmd[cmd.index("--one") + 1].split(",")
        calls.append((int(log2_m), optimizer, cmd[cmd.index("--threads") + 1]))
        M = 2 ** int(log2_m)
        row = {"log2_m": int(log2_m), "n_latents": M, "optimizer": optimizer, "tokens_per_s": 1e6 / M,
               "peak_memory_bytes": 3 * 4 * M * 16, "peak_over_fp32_params": 3.0 + M / 2**14}
        return row

    monkeypatch.setattr(scale_sweep, "run_child", fake_child)
    assert bench_main(["scale-sweep", "--min-log2-m", "11", "--max-log2-m", "13", "--dense-max-log2-m", "12",
                       "--m", "1024", "--threads", "1", "--skip-auxk-check", "--out", str(tmp_path)]) == 0
    assert calls == [(11, "lazy_adam", "1"), (11, "adam", "1"), (12, "lazy_adam", "1"), (12, "adam", "1"),
                     (13, "lazy_adam", "1")]
    record = json.loads((tmp_path / "scale_sweep.json").read_text())
    assert record["ratios"]["lazy_adam"] == {"tokens_per_s_2^13_over_2^11": 0.25, "peak_over_fp32_params_2^13": 3.5}
    assert record["ratios"]["adam"]["tokens_per_s_2^12_over_2^11"] == 0.5
    assert (tmp_path / "scale_sweep.png").stat().st_size > 0


def test_scale_sweep_measures_one_size_with_auxk_live():
    """The child's measurement, in process on a tiny size: a lazy step with AuxK's dead mask
    runs, and the peak memory is the whole process's (above the parameters' bytes)."""
    from switchsae.bench.scale_sweep import measure_size

    row = measure_size(10, "lazy_adam", "cpu", "float32", 1, d=32, m=256, k=4, batch=64, steps=1)
    assert row["n_experts"] == 4 and row["tokens_per_s"] > 0
    assert row["fp32_param_bytes"] == 4 * (2 * 1024 * 32 + 2 * 32 + 4 * 32)
    assert row["peak_memory_bytes"] > row["fp32_param_bytes"]
