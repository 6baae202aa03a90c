"""The dictionary-size sweep: training throughput and process peak memory as M grows at a fixed
expert width m (so the encoder's work per token stays the same), with AuxK live.

    python -m switchsae.bench.scale_sweep --device cpu --threads 1 --out bench/results/scale-cpu
    python -m switchsae.bench.scale_sweep --device cuda --dtype bfloat16 --out DIR
    switchsae bench scale-sweep ...                      # the same

Each size runs in a fresh process (so its peak resident set, or CUDA's peak allocation, is its
own): the torch backend's `core.train_step` with the Trainer's defaults (`TrainConfig`: Adam
betas, clip 1.0, the paper's lr for M), a fixed random 10% of the latents dead (AuxK on, coef
1/32, k_aux d/2), the selection bias (`core.selection_bias`, the Trainer's default) and the
dead-latent counter updated every step as the Trainer does, on random
Gaussian activations.  d 384, m 1024, k 32, batch 4096 by default; both optimisers (dense
"adam" up to --dense-max-log2-m).  The AuxK check times the N = 16 step (d 768, M 24576) with
10% dead against no dead mask, interleaved (`--auxk-check-only`: that alone, printed).  Writes
scale_sweep.json and scale_sweep.png."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

DEAD_FRACTION = 0.1


def measure_size(log2_m: int, optimizer: str, device: str, dtype: str, threads: int | None, d: int, m: int,
                 k: int, batch: int, steps: int) -> dict:
    """One size in this process: -> tokens/s (median step), peak memory, parameter bytes."""
    import numpy as np
    import torch

    if threads:
        torch.set_num_threads(threads)
    from switchsae.backends.torch import Backend
    from switchsae.core import SwitchSAEConfig, adam_init, init_params, train_step
    from switchsae.core import selection_bias
    from switchsae.core.dead_latents import update_tokens_since_fired
    from switchsae.training import TrainConfig

    from .memory import _reset_high_water_mark, _status_bytes
    from .timing import measure

    be = Backend(device)
    cuda = be.device.type == "cuda"
    if not cuda:
        _reset_high_water_mark()
    M = 2**log2_m
    cfg = SwitchSAEConfig(d_in=d, n_latents=M, n_experts=M // m, k=k, auxk_coef=1 / 32, dtype=dtype)
    tc = TrainConfig(batch_size=batch, optimizer=optimizer)
    params = be.training_layout({n: be.asarray(p, dtype) for n, p in init_params(cfg, 0).items()})  # as the Trainer
    state = adam_init(params, be.xp)
    rng = np.random.default_rng(1)
    x = be.asarray(rng.normal(size=(batch, d)), dtype)
    dead = be.asarray(rng.random(M) < DEAD_FRACTION)
    counter = be.asarray(np.zeros(M, np.float32))
    lr, bias_step = tc.learning_rate(cfg), tc.selection_bias_step(cfg)
    box = [params, state, counter, selection_bias.init_state(cfg, be) if bias_step else None]

    def step():
        bias = box[3]
        p, s, out = train_step(be, cfg, box[0], box[1], x, lr, dead, None if bias is None else bias.bias,
                               max_grad_norm=tc.max_grad_norm, optimizer=tc.optimizer)
        box[:] = [p, s, update_tokens_since_fired(box[2], out.top_indices, out.top_values, be),
                  None if bias is None else selection_bias.update(bias, out, cfg, be, bias_step,
                                                                  tc.selection_bias_floor)]
        return out.losses["total"]

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    timing = measure(step, be, warmup=2, repeats=steps)
    peak = torch.cuda.max_memory_allocated() if cuda else _status_bytes("VmHWM")
    param_bytes = 4 * sum(int(np.prod(s)) for s in cfg.param_shapes().values())
    return {"log2_m": log2_m, "n_latents": M, "n_experts": cfg.n_experts, "optimizer": optimizer,
            "tokens_per_s": batch / timing["median_s"], "step": timing,
            "peak_memory_bytes": peak, "memory_measure": "torch.cuda.max_memory_allocated" if cuda else
            "process VmHWM (whole process)", "fp32_param_bytes": param_bytes,
            "peak_over_fp32_params": peak / param_bytes}


def auxk_check(device: str, dtype: str, threads: int | None, repeats: int = 9) -> dict:
    """The N = 16 step (d 768, M 24576, k 32, batch 4096) with 10% dead latents (AuxK on)
    against no dead mask, alternating so both see the same machine load; both optimisers.
    Medians of wall time (the ratio the issue asks for) and of this thread's CPU time (which
    leaves out time the step waited for a shared core)."""
    import numpy as np
    import torch

    if threads:
        torch.set_num_threads(threads)
    from switchsae.backends.torch import Backend
    from switchsae.core import SwitchSAEConfig, adam_init, init_params, train_step

    be = Backend(device)
    cfg = SwitchSAEConfig(d_in=768, n_latents=24576, n_experts=16, k=32, auxk_coef=1 / 32, dtype=dtype)
    rng = np.random.default_rng(1)
    x = be.asarray(rng.normal(size=(4096, 768)), dtype)
    dead = be.asarray(rng.random(cfg.n_latents) < DEAD_FRACTION)
    result = {}
    for optimizer in ("adam", "lazy_adam"):
        params = be.training_layout({n: be.asarray(p, dtype) for n, p in init_params(cfg, 0).items()})  # as the Trainer
        box = [params, adam_init(params, be.xp)]
        times = {(w, clock): [] for w in ("no_mask", "dead_10pct") for clock in ("wall", "cpu")}
        for i in range(2 * (repeats + 1)):
            which = "no_mask" if i % 2 == 0 else "dead_10pct"
            t0, c0 = time.perf_counter(), time.thread_time()
            p, s, out = train_step(be, cfg, box[0], box[1], x, 1e-4, None if which == "no_mask" else dead,
                                   optimizer=optimizer)
            be.block_until_ready(out.losses["total"])
            box[:] = [p, s]
            if i >= 2:  # the first of each is warm-up
                times[which, "wall"].append(time.perf_counter() - t0)
                times[which, "cpu"].append(time.thread_time() - c0)
        med = {key: float(np.median(t)) for key, t in times.items()}
        result[optimizer] = {"no_mask_s": med["no_mask", "wall"], "dead_10pct_s": med["dead_10pct", "wall"],
                             "ratio_dead_over_no_mask_speed": med["no_mask", "wall"] / med["dead_10pct", "wall"],
                             "no_mask_cpu_s": med["no_mask", "cpu"], "dead_10pct_cpu_s": med["dead_10pct", "cpu"],
                             "cpu_ratio_dead_over_no_mask_speed": med["no_mask", "cpu"] / med["dead_10pct", "cpu"]}
    return result


def run_child(command: list, what: str) -> dict:
    """Run one `--one` measurement in a fresh process; -> its JSON row (its last stdout line)."""
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"scale_sweep: {what} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def plot(record: dict, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from switchsae.files import atomic_write

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for optimizer in ("lazy_adam", "adam"):
        rows = [r for r in record["sizes"] if r["optimizer"] == optimizer]
        if rows:
            xs = [r["n_latents"] for r in rows]
            a.plot(xs, [r["tokens_per_s"] for r in rows], marker="o", label=optimizer)
            b.plot(xs, [r["peak_over_fp32_params"] for r in rows], marker="o", label=optimizer)
    c = record["config"]
    a.set(xscale="log", yscale="log", xlabel="dictionary size M", ylabel="tokens / s",
          title=f"train step, m {c['m']}, d {c['d']}, k {c['k']}, batch {c['batch']}, 10% dead")
    b.axhline(3.5, color="grey", linestyle="--", label="3.5x fp32 parameters")
    b.set(xscale="log", xlabel="dictionary size M", ylabel="peak memory / fp32 parameter bytes",
          title=f"{record['device']} ({record['dtype']})")
    for ax in (a, b):
        ax.set_xscale("log", base=2)
        ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m switchsae.bench.scale_sweep", description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--out", default="bench-results/scale", help="directory for scale_sweep.json/.png")
    parser.add_argument("--min-log2-m", type=int, default=14)
    parser.add_argument("--max-log2-m", type=int, default=20)
    parser.add_argument("--dense-max-log2-m", type=int,
                        help="largest size run with dense Adam too (default: --max-log2-m)")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--d", type=int, default=384)
    parser.add_argument("--m", type=int, default=1024, help="expert width (fixed)")
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per size (after 2 warm-up)")
    parser.add_argument("--skip-auxk-check", action="store_true", help="skip the N = 16 AuxK step check")
    parser.add_argument("--auxk-check-only", action="store_true",
                        help="run only the N = 16 AuxK step check and print it (writes nothing)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: "log2_m,optimizer" in this process
    args = parser.parse_args(argv)
    if args.min_log2_m > args.max_log2_m or 2**args.min_log2_m < args.m:
        parser.error(f"need 2^min-log2-m >= m ({args.m}) and min <= max")
    common = (args.device, args.dtype, args.threads)
    if args.auxk_check_only:
        print("AuxK check (N 16, d 768):", json.dumps(auxk_check(*common)), flush=True)
        return 0
    if args.one:
        log2_m, optimizer = args.one.split(",")
        print(json.dumps(measure_size(int(log2_m), optimizer, *common, args.d, args.m, args.k, args.batch,
                                      args.steps)))
        return 0
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            parser.error("--device cuda: torch sees no CUDA device")
    from switchsae.files import atomic_write_json

    from .machine import describe

    os.makedirs(args.out, exist_ok=True)
    dense_max = args.max_log2_m if args.dense_max_log2_m is None else args.dense_max_log2_m
    sizes = []
    for log2_m in range(args.min_log2_m, args.max_log2_m + 1):
        for optimizer in ("lazy_adam", "adam") if log2_m <= dense_max else ("lazy_adam",):
            child = [sys.executable, "-m", "switchsae.bench.scale_sweep", "--one", f"{log2_m},{optimizer}",
                     "--device", args.device, "--dtype", args.dtype, "--d", str(args.d), "--m", str(args.m),
                     "--k", str(args.k), "--batch", str(args.batch), "--steps", str(args.steps)]
            if args.threads:
                child += ["--threads", str(args.threads)]
            row = run_child(child, f"M = 2^{log2_m} ({optimizer})")
            sizes.append(row)
            print(f"M 2^{log2_m} {optimizer:9s}: {row['tokens_per_s']:>9,.0f} tokens/s, peak "
                  f"{row['peak_memory_bytes'] / 2**30:.2f} GiB = {row['peak_over_fp32_params']:.2f}x fp32 params",
                  flush=True)
    record = {"machine": describe(), "device": args.device, "dtype": args.dtype, "threads": args.threads,
              "config": {"d": args.d, "m": args.m, "k": args.k, "batch": args.batch, "dead_fraction": DEAD_FRACTION,
                         "auxk_coef": 1 / 32, "steps": args.steps},
              "sizes": sizes}
    for optimizer in ("lazy_adam", "adam"):
        rows = {r["log2_m"]: r for r in sizes if r["optimizer"] == optimizer}
        if args.min_log2_m in rows and len(rows) > 1:
            top = max(rows)
            record.setdefault("ratios", {})[optimizer] = {
                f"tokens_per_s_2^{top}_over_2^{args.min_log2_m}":
                    rows[top]["tokens_per_s"] / rows[args.min_log2_m]["tokens_per_s"],
                f"peak_over_fp32_params_2^{top}": rows[top]["peak_over_fp32_params"]}
    if not args.skip_auxk_check:
        record["auxk_check"] = auxk_check(*common)
        print("AuxK check (N 16, d 768):", json.dumps(record["auxk_check"]), flush=True)
    path = atomic_write_json(os.path.join(args.out, "scale_sweep.json"), record, indent=1)
    png = plot(record, os.path.join(args.out, "scale_sweep.png"))
    print(f"wrote {path}, {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
