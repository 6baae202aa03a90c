"""The hardware benchmark: throughput, memory and roofline fraction per backend and config.

For every backend and grid config it measures tokens/s of encode, forward and a full train
step (warm-up, repeats, median and spread), the step's achieved FLOP/s (useful FLOPs counted
by `core.flops.train_flops`) over the backend's own measured matmul peak in the same dtype,
peak memory of a train step, and Switch vs dense TopK at equal width plus the naive
per-expert-loop baseline (torch).
"""

from __future__ import annotations

import functools

import numpy as np

from switchsae.core import adam_init, init_params, spec, train_step
from switchsae.core.config import SwitchSAEConfig
from switchsae.core.flops import forward_flops, train_flops

from .memory import peak_memory
from .timing import PAPER_BATCH, measure, timer_name

# Backends whose CPU build is far from the machine's speed (the NumPy reference encodes every
# expert densely; MLX's Linux CPU matmul is ~20x slower than NumPy's) run a smaller grid.
SMALL_GRID_BACKENDS = {"numpy", "mlx"}
# The paper's configuration: GPT-2 small's residual stream (d 768), a 32x dictionary, k 32, and
# its batch (`timing.PAPER_BATCH`).


GRIDS = ("default", "quick", "gpu")
# The bf16 matmul peak of a GPU needs a product that runs well past launch overhead and fills
# every multiprocessor: 8192^3 (1.1 TFLOP, ~1.4 ms on an H100/H200).  CPUs reach theirs at 2048.
GPU_PEAK_SIZE = 8192


def grid(name: str, backend_name: str, batch: int | None = None, d_in: int | None = None) -> dict:
    """The configs to time: "speed" (N sweep at fixed width), "memory" (M sweep at fixed N).
    batch: replaces the full-size grids' batch (the paper's 8192).  d_in: replaces the width
    (the full-size grids then keep a 32x dictionary, M = 32 d_in).  "gpu" is the full grid
    with the memory sweep up to M = 2^20 and a GPU-sized matmul peak."""
    if name not in GRIDS:
        raise ValueError(f"unknown grid {name!r}; choose from {', '.join(GRIDS)}")
    small = backend_name in SMALL_GRID_BACKENDS or name == "quick"
    if small:
        base = dict(d_in=d_in or 128, n_latents=4096, k=16, batch=batch if name == "quick" and batch else 1024)
        return {"speed": [dict(base, n_experts=n) for n in (1, 8, 16)],
                "memory": [dict(base, n_experts=8, n_latents=M) for M in (1024, 4096)],
                "naive": 16, "peak_size": 1024}
    d = d_in or 768
    base = dict(d_in=d, n_latents=32 * d, k=32, batch=batch or PAPER_BATCH)
    sizes = (2**16, 2**18, 2**20) if name == "gpu" else (8 * d, 32 * d, 128 * d)
    return {"speed": [dict(base, n_experts=n) for n in (1, 8, 16, 32)],
            "memory": [dict(base, n_experts=16, n_latents=M) for M in sizes],
            "naive": 16, "peak_size": GPU_PEAK_SIZE if name == "gpu" else 2048}


def matmul_peak(backend, dtype: str, size: int, repeats: int = 5) -> dict:
    """FLOP/s of a (size, size) @ (size, size) product on this backend: the roofline ceiling."""
    a, b = _peak_operands(backend, dtype, size)
    matmul = backend.compile_forward(lambda a, b, *_: a @ b)
    t = measure(lambda: matmul(a, b), backend, warmup=2, repeats=repeats)
    return {"size": size, "flop_per_s": 2 * size**3 / t["median_s"], **t}


@functools.lru_cache(maxsize=2)
def _peak_operands(backend, dtype: str, size: int):
    """Two random normal (size, size) arrays: made once per backend, dtype and size, since the
    peak is measured again after every config (at 8192 the NumPy draw alone takes seconds)."""
    rng = np.random.default_rng(0)
    return tuple(backend.asarray(rng.standard_normal((size, size), dtype=np.float32), dtype) for _ in range(2))


def peak_size(backend, g: dict) -> int:
    """The matmul size of the roofline ceiling: the grid's on a CPU, `GPU_PEAK_SIZE` on a GPU
    or TPU (a 2048 product is launch-bound there and would flatter every fraction)."""
    device = backend.device_name()
    on_cpu = device.startswith("cpu") or " cpu" in device or device == "numpy"
    return g["peak_size"] if on_cpu else max(g["peak_size"], GPU_PEAK_SIZE)


def _model(backend, cfg, batch: int):
    params = {n: backend.asarray(p, cfg.dtype) for n, p in init_params(cfg, 0).items()}
    x = backend.asarray(np.random.default_rng(1).normal(size=(batch, cfg.d_in)), cfg.dtype)
    return params, x


def time_config(backend, cfg: SwitchSAEConfig, batch: int, repeats: int) -> dict:
    """Encode, forward and train-step timings of one config, with FLOP rates and memory."""
    params, x = _model(backend, cfg, batch)
    encode = backend.compile_forward(lambda p, x, *_: spec.encode(p, x, cfg, backend).top_values)
    forward = backend.compile_forward(lambda p, x, *_: spec.forward(p, x, cfg, backend).x_hat)
    record = {"n_experts": cfg.n_experts, "n_latents": cfg.n_latents, "d_in": cfg.d_in, "k": cfg.k,
              "batch": batch, "dtype": cfg.dtype}
    for name, fn in (("encode", encode), ("forward", forward)):
        t = measure(lambda fn=fn: fn(params, x), backend, warmup=1, repeats=repeats)
        record[name] = {**t, "tokens_per_s": batch / t["median_s"]}

    step = backend.compile_step(functools.partial(train_step, backend, cfg))
    state = {"params": params, "opt": adam_init(params, backend.xp)}

    def one_step():
        state["params"], state["opt"], out = step(state["params"], state["opt"], x, cfg.default_lr)
        return out.losses["total"]

    t = measure(one_step, backend, warmup=1, repeats=repeats)
    flops = train_flops(cfg.replace(auxk_coef=0.0))["total"] * batch  # no dead mask: AuxK does not run
    record["train_step"] = {**t, "tokens_per_s": batch / t["median_s"],
                            "useful_flop": flops, "flop_per_s": flops / t["median_s"]}
    record["forward"]["flop_per_s"] = forward_flops(cfg)["total"] * batch / record["forward"]["median_s"]
    mem, how = peak_memory(one_step, backend)
    record["train_step"].update(peak_memory_bytes=mem, memory_measure=how)
    return record


def naive_baseline(backend, cfg, batch: int, repeats: int) -> dict | None:
    """Train-step timing of the naive per-expert loop (torch only)."""
    if backend.name != "torch":
        return None
    from .torch_speedup import NaiveBackend, step_throughput

    return step_throughput(NaiveBackend(getattr(backend, "device", None)), cfg, batch, repeats)


def run_backend(backend, grid_name: str, dtype: str | None, repeats: int, log=print,
                batch: int | None = None, d_in: int | None = None) -> dict:
    """Every measurement for one backend (batch, d_in: see `grid`; dtype None: `default_dtype`).

    The matmul peak is measured before the sweep and again after every config, and the roofline
    fractions use the largest of these: a machine whose speed drifts during the run (shared,
    thermally throttled) then cannot flatter a fraction."""
    dtype = dtype or default_dtype(backend)
    g = grid(grid_name, backend.name, batch, d_in)
    size = peak_size(backend, g)
    peaks = [matmul_peak(backend, dtype, size)]
    log(f"[{backend.name}] matmul peak {peaks[0]['flop_per_s'] / 1e9:.1f} GFLOP/s ({dtype}, n={size})")
    speed, memory = [], []
    for sizes in g["speed"]:
        cfg = SwitchSAEConfig(dtype=dtype, **{k: v for k, v in sizes.items() if k != "batch"})
        speed.append(time_config(backend, cfg, sizes["batch"], repeats))
        peaks.append(matmul_peak(backend, dtype, size))
        log(_row(backend.name, speed[-1], peaks[-1]["flop_per_s"]))
    out_of_memory = []
    for sizes in g["memory"]:
        cfg = SwitchSAEConfig(dtype=dtype, **{k: v for k, v in sizes.items() if k != "batch"})
        try:
            rec = time_config(backend, cfg, sizes["batch"], max(1, repeats // 2))
        except _memory_errors(backend) as err:  # the largest M may not fit this device: say so, go on
            out_of_memory.append({**sizes, "error": str(err).splitlines()[0][:300]})
            log(f"[{backend.name}] N={cfg.n_experts} M={cfg.n_latents}: out of memory")
            _release_memory(backend)
            continue
        memory.append(rec)
        peaks.append(matmul_peak(backend, dtype, size))
        log(_row(backend.name, rec, peaks[-1]["flop_per_s"]))
    peak = max(peaks, key=lambda p: p["flop_per_s"])
    for rec in speed + memory:
        rec["train_step"]["roofline_fraction"] = rec["train_step"]["flop_per_s"] / peak["flop_per_s"]
    log(f"[{backend.name}] roofline fractions against the largest peak measured, "
        f"{peak['flop_per_s'] / 1e9:.1f} GFLOP/s: "
        + ", ".join(f"N={r['n_experts']} M={r['n_latents']} {r['train_step']['roofline_fraction']:.0%}"
                    for r in speed + memory))
    by_n = {r["n_experts"]: r["train_step"]["tokens_per_s"] for r in speed}
    naive_sizes = next(s for s in g["speed"] if s["n_experts"] == g["naive"])
    naive_cfg = SwitchSAEConfig(dtype=dtype, **{k: v for k, v in naive_sizes.items() if k != "batch"})
    naive = naive_baseline(backend, naive_cfg, naive_sizes["batch"], repeats)
    speedups = {f"N{n}_vs_dense": by_n[n] / by_n[1] for n in by_n if n != 1}
    if naive is not None:
        speedups[f"N{g['naive']}_vs_naive_loop"] = by_n[g["naive"]] / naive["tokens_per_s"]
        log(f"[{backend.name}] naive loop N={g['naive']}: {naive['tokens_per_s']:.0f} tokens/s")
    return {"backend": backend.name, "device": backend.device_name(), "dtype": dtype,
            "grid": grid_name, "timer": timer_name(backend), "matmul_peak": peak,
            "matmul_peaks_flop_per_s": [p["flop_per_s"] for p in peaks],
            "speed": speed, "memory": memory, "out_of_memory": out_of_memory, "naive_loop": naive,
            "speedups": speedups}


def _memory_errors(backend) -> tuple:
    """The exceptions that mean "this config does not fit" on this backend."""
    if backend.name.startswith("torch"):
        import torch

        return (MemoryError, torch.OutOfMemoryError)
    return (MemoryError,)


def _release_memory(backend) -> None:
    """Hand a failed config's cached device memory back before the next one."""
    if backend.name.startswith("torch") and backend.device_name().startswith("cuda"):
        import torch

        torch.cuda.empty_cache()


def default_dtype(backend) -> str:
    """bfloat16 on CUDA (what GPUs train SAEs in), float32 elsewhere."""
    return "bfloat16" if backend.device_name().startswith("cuda") else "float32"


def _row(name, rec, peak: float | None = None) -> str:
    """One config's line; with the peak measured after it, the step's fraction of that peak."""
    step = rec["train_step"]
    roof = step["flop_per_s"] / peak if peak else None
    return (f"[{name}] N={rec['n_experts']:>3} M={rec['n_latents']:>6}  encode {rec['encode']['tokens_per_s']:>9.0f}"
            f"  forward {rec['forward']['tokens_per_s']:>9.0f}  step {step['tokens_per_s']:>8.0f} tok/s"
            f" (spread {step['min_s'] * 1e3:.0f}-{step['max_s'] * 1e3:.0f} ms)"
            + (f"  roofline {roof:.0%}" if roof is not None else "")
            + f"  peak mem {step['peak_memory_bytes'] / 2**20:.0f} MiB")
