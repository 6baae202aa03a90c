"""Train-step throughput (tokens/s) and peak memory of the JAX backend against torch's, in one
run: the same config on both, as real training has it (AuxK live over a fixed random 10 % of
dead latents, the dead counter updated every step, the Trainer's lr and clip), each optimizer.

    python -m switchsae.bench.jax_throughput --out bench/results/cpu-2core-jax-lazy
    python -m switchsae.bench.jax_throughput --quick    # small sizes, a smoke run
    python -m switchsae.bench.jax_throughput --profile /tmp/trace   # top XLA ops of the N = 16 step

Every measurement runs in a fresh process pinned to one CPU core (one torch thread, one XLA
thread), JAX and torch back to back for each config so both see the same machine load; its
peak memory is the process's resident high-water mark (VmHWM, whole process).  Records
tokens/s (median step), and the ratios: JAX / torch at each N, JAX N = 16 over its own N = 1,
the dead-mask step over the no-mask step.  Writes results.json to --out (and prints it)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

FULL = {"d_in": 768, "n_latents": 24576, "k": 32, "batch": 4096}
QUICK = {"d_in": 64, "n_latents": 1024, "k": 8, "batch": 512}
DEAD_FRACTION = 0.1


def measure_one(backend_name: str, n_experts: int, optimizer: str, dead: bool, sizes: dict, steps: int,
                profile: str | None = None) -> dict:
    """One config in this (pinned, one-thread) process -> its row (with `profile`, a folder: the
    JAX trace's top ops instead of timings)."""
    import numpy as np

    from switchsae.backends import load_backend
    from switchsae.core import SwitchSAEConfig, adam_init, init_params, train_step
    from switchsae.core.dead_latents import update_tokens_since_fired
    from switchsae.training import TrainConfig

    from .memory import _reset_high_water_mark, _status_bytes
    from .timing import measure

    if backend_name == "torch":
        import torch

        torch.set_num_threads(1)
    be = load_backend(backend_name)
    _reset_high_water_mark()
    batch = sizes["batch"]
    cfg = SwitchSAEConfig(d_in=sizes["d_in"], n_latents=sizes["n_latents"], n_experts=n_experts, k=sizes["k"])
    tc = TrainConfig(batch_size=batch, optimizer=optimizer)
    rng = np.random.default_rng(1)
    params = {n: be.asarray(p, cfg.dtype) for n, p in init_params(cfg, 0).items()}
    x = be.asarray(rng.normal(size=(batch, cfg.d_in)), cfg.dtype)
    dead_mask = be.asarray(rng.random(cfg.total_latents) < DEAD_FRACTION) if dead else None
    step_fn = be.compile_step(lambda p, s, xs, lr, dm, sb: train_step(be, cfg, p, s, xs, lr, dm, sb, max_grad_norm=tc.max_grad_norm,
                                                                  optimizer=optimizer))
    lr = tc.learning_rate(cfg)
    box = [params, adam_init(params, be.xp), be.asarray(np.zeros(cfg.total_latents, np.float32))]

    def step():
        p, s, out = step_fn(box[0], box[1], x, lr, dead_mask)
        box[:] = [p, s, update_tokens_since_fired(box[2], out.top_indices, out.top_values, be)]
        return out.losses["total"]

    if profile:  # two traced steps after the warm-up ones
        import jax

        for _ in range(2):
            be.block_until_ready(step())
        with jax.profiler.trace(profile, create_perfetto_trace=True):
            for _ in range(2):
                be.block_until_ready(step())
        return {"backend": backend_name, "n_experts": n_experts, "optimizer": optimizer, "dead_mask": dead,
                "top_ops": top_ops(profile, steps=2)}
    timing = measure(step, be, warmup=2, repeats=steps)
    return {"backend": backend_name, "n_experts": n_experts, "optimizer": optimizer, "dead_mask": dead,
            "tokens_per_s": batch / timing["median_s"], "step": timing, "peak_memory_bytes": _status_bytes("VmHWM"),
            "device": be.device_name()}


def top_ops(folder: str, steps: int, n: int = 25) -> list:
    """The XLA ops (HLO names; nested loops count inside their parents too) taking the most time
    in the perfetto trace under `folder` -> [{"op", "ms_per_step", "calls_per_step"}]."""
    import collections
    import glob
    import gzip

    path = sorted(glob.glob(os.path.join(folder, "**", "perfetto_trace.json.gz"), recursive=True))[-1]
    with gzip.open(path) as f:
        events = json.load(f)
    events = events["traceEvents"] if isinstance(events, dict) else events
    total, calls = collections.Counter(), collections.Counter()
    for e in events:  # device work only: the Python frames ($file:line) and the executor's waits are left out
        if e.get("ph") == "X" and not e["name"].startswith("$") and "ThunkExecutor" not in e["name"] \
                and "np.asarray" not in e["name"]:
            total[e["name"]] += e.get("dur", 0)
            calls[e["name"]] += 1
    return [{"op": name, "ms_per_step": round(us / 1e3 / steps, 1), "calls_per_step": calls[name] / steps}
            for name, us in total.most_common(n)]


def _child(args: list, core: int) -> dict:
    env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") +
                                      " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1").strip(),
               OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "switchsae.bench.jax_throughput", "--one", *args]
    done = subprocess.run(["taskset", "-c", str(core), *command], capture_output=True, text=True, env=env)
    if done.returncode:
        raise SystemExit(f"jax_throughput: {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def ratios(rows: list) -> dict:
    """The ratios the issue asks for, per optimizer (dead mask on unless named)."""
    def get(backend, n, optimizer, dead=True):
        return next((r for r in rows if (r["backend"], r["n_experts"], r["optimizer"], r["dead_mask"])
                     == (backend, n, optimizer, dead)), None)

    out = {}
    for optimizer in sorted({r["optimizer"] for r in rows}):
        entry = {}
        for n in sorted({r["n_experts"] for r in rows}):
            j, t = get("jax", n, optimizer), get("torch", n, optimizer)
            if j and t:
                entry[f"jax_over_torch_tokens_per_s_N{n}"] = j["tokens_per_s"] / t["tokens_per_s"]
                entry[f"jax_over_torch_peak_memory_N{n}"] = j["peak_memory_bytes"] / t["peak_memory_bytes"]
        n_max = max(r["n_experts"] for r in rows)
        one, many = get("jax", 1, optimizer), get("jax", n_max, optimizer)
        if one and many and n_max > 1:
            entry[f"jax_N{n_max}_over_jax_N1_tokens_per_s"] = many["tokens_per_s"] / one["tokens_per_s"]
        for backend in ("jax", "torch"):
            live, none = get(backend, n_max, optimizer), get(backend, n_max, optimizer, False)
            if live and none:
                entry[f"{backend}_N{n_max}_dead_mask_over_no_mask_tokens_per_s"] = live["tokens_per_s"] / none["tokens_per_s"]
        out[optimizer] = entry
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (smoke run)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per config (after 2 warm-up)")
    parser.add_argument("--experts", default="1,16", help="comma-separated N to measure")
    parser.add_argument("--optimizers", default="adam,lazy_adam")
    parser.add_argument("--backends", default="jax,torch")
    parser.add_argument("--core", type=int, default=0, help="the CPU core every measurement is pinned to")
    parser.add_argument("--out", help="folder for results.json")
    parser.add_argument("--profile", metavar="DIR", help="trace the JAX N = 16 step (dead mask, --optimizers' "
                        "first) into DIR and print its top ops, instead of the benchmark")
    parser.add_argument("--one", nargs=4, metavar=("BACKEND", "N", "OPTIMIZER", "DEAD"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    if args.one:
        backend, n, optimizer, dead = args.one
        row = measure_one(backend, int(n), optimizer, dead == "dead", sizes, args.steps, args.profile)
        print(json.dumps(row))
        return row

    from .machine import describe

    experts = [int(n) for n in args.experts.split(",")]
    if args.profile:
        row = _child(["jax", str(max(experts)), args.optimizers.split(",")[0], "dead", "--profile", args.profile,
                      *(["--quick"] if args.quick else [])], args.core)
        print(json.dumps(row, indent=2))
        return row
    rows = []
    for optimizer in args.optimizers.split(","):
        for n in experts:
            for dead in (("dead", "none") if n == max(experts) else ("dead",)):
                for backend in args.backends.split(","):
                    extra = ["--quick"] if args.quick else []
                    rows.append(_child([backend, str(n), optimizer, dead, "--steps", str(args.steps), *extra],
                                       args.core))
                    print(json.dumps(rows[-1]), file=sys.stderr)
    report = {"machine": describe(), "config": {**sizes, "dead_fraction": DEAD_FRACTION, "dtype": "float32",
                                                "threads": 1, "trainer_defaults": "TrainConfig lr and clip"},
              "command": "python -m switchsae.bench.jax_throughput " + " ".join(argv if argv is not None else sys.argv[1:]),
              "rows": rows, "ratios": ratios(rows)}
    print(json.dumps(report, indent=2))
    if args.out:
        from switchsae.files import atomic_write_json

        os.makedirs(args.out, exist_ok=True)
        atomic_write_json(os.path.join(args.out, "results.json"), report, indent=2)
    return report


if __name__ == "__main__":
    main()
