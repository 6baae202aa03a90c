"""Train-step throughput of the MLX backend in tokens/s: the compiled shared train step, per
number of experts (N = 1 is a plain TopK SAE; only the routed expert's encoder runs, so the
encoder cost shrinks ~N x).  Every record names the device it ran on.

    python -m switchsae.bench.mlx_throughput            # paper-like sizes (d 768, M 24576)
    python -m switchsae.bench.mlx_throughput --quick    # seconds-long smoke run
    python -m switchsae.bench.mlx_throughput --json results.json
"""

from __future__ import annotations

import argparse
import functools
import sys

import numpy as np
from switchsae.backends import load_backend
from switchsae.core import SwitchSAEConfig, adam_init, init_params, train_step
from switchsae.files import atomic_write_json

from .machine import describe
from .timing import measure

FULL = {"d_in": 768, "n_latents": 24576, "k": 32, "batch": 4096, "experts": (1, 8, 32, 128)}
QUICK = {"d_in": 64, "n_latents": 512, "k": 8, "batch": 256, "experts": (1, 8)}


def step_throughput(backend, cfg: SwitchSAEConfig, batch: int, repeats: int) -> dict:
    """Median seconds and tokens/s of one compiled train step at this size."""
    params = {n: backend.asarray(p, cfg.dtype) for n, p in init_params(cfg, 0).items()}
    x = backend.asarray(np.random.default_rng(0).normal(size=(batch, cfg.d_in)), cfg.dtype)
    opt = adam_init(params, backend.xp)
    step = backend.compile_step(functools.partial(train_step, backend, cfg))
    timing = measure(lambda: step(params, opt, x, cfg.default_lr), backend, warmup=2, repeats=repeats)
    return {"d_in": cfg.d_in, "n_latents": cfg.n_latents, "n_experts": cfg.n_experts, "k": cfg.k,
            "batch": batch, "dtype": cfg.dtype, **timing, "tokens_per_s": batch / timing["median_s"]}


def run(quick: bool, dtype: str) -> dict:
    backend = load_backend("mlx")
    sizes = QUICK if quick else FULL
    results = []
    for n in sizes["experts"]:
        cfg = SwitchSAEConfig(d_in=sizes["d_in"], n_latents=sizes["n_latents"], n_experts=n,
                              k=sizes["k"], dtype=dtype)
        results.append(step_throughput(backend, cfg, sizes["batch"], repeats=3 if quick else 10))
    return {"benchmark": "mlx_throughput", "quick": quick, "device": backend.device_name(),
            "machine": describe([backend]), "results": results}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke test")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--json", help="also write the records to this file")
    args = parser.parse_args(argv)
    record = run(args.quick, args.dtype)
    print(f"MLX train step on {record['device']} ({record['machine']['platform']})")
    print(f"{'N':>5} {'batch':>6} {'dtype':>9} {'ms/step':>9} {'tokens/s':>11}")
    for r in record["results"]:
        print(f"{r['n_experts']:>5} {r['batch']:>6} {r['dtype']:>9} {1e3 * r['median_s']:>9.2f} "
              f"{r['tokens_per_s']:>11.0f}")
    if args.json:
        atomic_write_json(args.json, record, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
