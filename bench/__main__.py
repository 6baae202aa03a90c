"""`python -m switchsae.bench` (or `switchsae bench`): the hardware benchmark.

    python -m switchsae.bench                       # every installed backend, default grid
    python -m switchsae.bench --backends torch --dtype bfloat16 --out bench/results/h100
    python -m switchsae.bench --grid quick          # a one-minute smoke run
    python -m switchsae.bench --backends torch --grid gpu --d-in 2304   # on a GPU: M up to 2^20
    python -m switchsae.bench scale-sweep --threads 1  # the M sweep at fixed m (bench/scale_sweep.py)
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from switchsae.backends import BackendError, installed_backends, load_backend
from switchsae.files import atomic_write_json
from switchsae.validation import OneLineParser

from .machine import describe
from .plots import plot
from .run import GRIDS, run_backend


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["scale-sweep"]:  # the dictionary-size sweep owns its options
        from .scale_sweep import main as scale_sweep_main

        return scale_sweep_main(argv[1:])
    parser = OneLineParser(prog="switchsae bench", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--backends", default=",".join(installed_backends()),
                        help="comma-separated backends (default: every installed one)")
    parser.add_argument("--grid", choices=GRIDS, default="default",
                        help="default: d 768, M 24576, k 32, batch 8192 (the paper's) for torch/jax (smaller for "
                             "numpy/mlx); gpu: the same N sweep, the M sweep up to 2^20 and an 8192 matmul peak")
    parser.add_argument("--batch", type=int, help="batch of the full-size torch/jax grid (default 8192)")
    parser.add_argument("--d-in", type=int, help="activation width of the grid (default 768; full-size grids keep M = 32 d)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"),
                        help="default: bfloat16 on CUDA, float32 elsewhere")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per measurement")
    parser.add_argument("--out", default="bench-results", help="directory for results.json and the PNGs")
    parser.add_argument("--threads", type=int, help="torch CPU threads (one thread is robust to a shared machine)")
    args = parser.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    try:
        backends = [load_backend(name) for name in args.backends.split(",") if name]
    except BackendError as e:
        parser.error(str(e))
    os.makedirs(args.out, exist_ok=True)
    start = time.perf_counter()
    results = []
    for backend in backends:
        if args.dtype and args.dtype not in backend.dtypes:
            print(f"[{backend.name}] has no {args.dtype}; skipped")
            continue
        results.append(run_backend(backend, args.grid, args.dtype, args.repeats, batch=args.batch, d_in=args.d_in))
    record = {"machine": describe(backends), "grid": args.grid, "batch": args.batch, "d_in": args.d_in,
              "dtype": args.dtype,
              "threads": args.threads,
              "seconds": time.perf_counter() - start, "results": results}
    path = atomic_write_json(os.path.join(args.out, "results.json"), record, indent=1)
    pngs = plot(record, args.out)
    print(f"wrote {path}, {', '.join(pngs)} in {record['seconds']:.0f} s")
    for res in results:
        print(f"[{res['backend']}] speed-ups: " + ", ".join(f"{k} {v:.2f}x" for k, v in res["speedups"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
