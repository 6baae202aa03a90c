"""Token-exchange traffic of expert parallelism: all-gather vs all-to-all.

    python -m switchsae.bench.comm_volume                 # the model at d 768, N 16, R 8, 4096/rank
    python -m switchsae.bench.comm_volume --measure       # + measured on 2 gloo processes
    python -m switchsae.bench.comm_volume --scale         # bytes per process and per step, 2^20..2^30 latents
    python -m switchsae.bench.comm_volume --scale --check-log2-m 17   # + 2 gloo processes at 2^17

The model (`core.parallel.exchange_bytes`) counts the bytes each rank receives from the others per
training step, forward and backward.  --measure trains a few steps on 2 local gloo processes (CPU,
spawned here) with each exchange and reports, per step: the bytes the collectives counted (by
label, per rank), the model's figure for the routing that happened, the bytes that crossed the
loopback interface (Linux /proc/net/dev, both ranks, everything gloo sent, replicated-gradient
all-reduces included) and the wall time.  On the wire gloo's reduce-scatter moves twice what the
algorithm needs (as much as an all-reduce of its whole input, measured), so there the all-gather
exchange costs more than counted."""

from __future__ import annotations

import argparse
import json
import os
import socket
import time

import numpy as np
from switchsae.core.parallel import exchange_bytes, gradient_sum_bytes, process_bytes

LABELS = ("routing", "counts", "dispatch", "combine", "meta", "combine_backward", "dispatch_backward")
# the scale table: GPT-2 small's d, experts of 2048 latents, k 32, 4096 tokens per process
SCALE = {"d": 768, "width": 2048, "k": 32, "batch": 4096, "log2_m": (20, 24, 30), "world": (8, 64, 512)}


def scale_config(log2_m: int, d: int = SCALE["d"], width: int = SCALE["width"], k: int = SCALE["k"]):
    from switchsae.core import SwitchSAEConfig

    return SwitchSAEConfig(d_in=d, n_latents=2**log2_m, n_experts=2**log2_m // width, k=k)


def scale_row(cfg, world: int, batch: int = SCALE["batch"]) -> dict:
    """The model's bytes for one process of an expert-parallel run (float32, AuxK on, balanced
    routing): what it holds, what it receives per step (token exchange, all_to_all; gradient
    sum of the replicated parameters)."""
    held = process_bytes(cfg, world)
    return {**held, "exchange": exchange_bytes("all_to_all", batch, cfg.d_in, cfg.routed_k, world, auxk=True,
                                               n_experts=cfg.n_experts)["total"],
            "gradient_sum": gradient_sum_bytes(cfg, world)}


def scale_table() -> str:
    """The README's markdown table of `scale_row` over SCALE."""
    lines = ["| latents M | experts N | processes R | experts' params / process | replicated params | "
             "held / process (params, grads, Adam m, v) | token exchange / step | gradient sum / step |",
             "|---|---|---|---|---|---|---|---|"]
    for log2_m in SCALE["log2_m"]:
        cfg = scale_config(log2_m)
        for world in SCALE["world"]:
            r = scale_row(cfg, world)
            lines.append(f"| 2^{log2_m} | {cfg.n_experts:,} | {world} | {_gb(r['expert_params'])} | "
                         f"{_gb(r['replicated_params'])} | {_gb(r['total'])} | {_gb(r['exchange'])} | "
                         f"{_gb(r['gradient_sum'])} |")
    return "\n".join(lines)


def _gb(b) -> str:
    return f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.1f} MiB"


def _scale_worker(rank: int, world: int, port: int, log2_m: int, result_path: str) -> None:
    """One AuxK-on expert-parallel train step at 2^log2_m latents: the bytes this rank holds
    (parameters, gradients, moments) and received (by collective label)."""
    import torch
    import torch.distributed as dist
    from switchsae.backends.torch.distributed import parallel_backend, shutdown
    from switchsae.core import adam_init, init_params, train_step

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    cfg = scale_config(log2_m).replace(auxk_coef=1 / 32)
    be = parallel_backend("expert", device="cpu")
    params = be.shard_params({n: be.asarray(p, "float32") for n, p in init_params(cfg, 0).items()})
    opt = adam_init(params, be.xp)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(world * SCALE["batch"], cfg.d_in)).astype(np.float32)
    dead = torch.as_tensor(rng.random(cfg.total_latents) < 0.1)
    local = be.asarray(x[be.batch_rows(x.shape[0])])
    _, grads = be.loss_and_grads(params, local, cfg, dead)
    grad_bytes = sum(g.numel() * g.element_size() for g in grads.values())
    del grads
    before = dict(be.comm.received)
    params, opt, _ = train_step(be, cfg, params, opt, local, 1e-3, dead)
    counted = {k: be.comm.received[k] - before.get(k, 0) for k in be.comm.received}

    def nbytes(arrays):
        return sum(a.numel() * a.element_size() for a in arrays.values())

    report = {"held": nbytes(params) + grad_bytes + nbytes(opt.m) + nbytes(opt.v), "counted": counted}
    pieces = [None] * world
    dist.all_gather_object(pieces, report)
    if rank == 0:
        with open(result_path, "w") as f:
            json.dump(pieces, f)
    shutdown()


def check_scale(log2_m: int) -> list:
    """Run `_scale_worker` on 2 gloo processes; -> each rank's report."""
    return _spawn(_scale_worker, log2_m)


def _spawn(worker, arg):
    """worker(rank, 2, port, arg, result_path) on 2 local processes; -> what rank 0 wrote there."""
    import tempfile

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "report.json")
        mp.spawn(worker, args=(2, port, arg, path), nprocs=2, join=True)
        with open(path) as f:
            return json.load(f)


def model_table(d: int, n_experts: int, world: int, batch: int, k: int, itemsize: int = 4) -> dict:
    """{(scheme, auxk): exchange_bytes(...)} with balanced routing."""
    return {(scheme, auxk): exchange_bytes(scheme, batch, d, k, world, itemsize, auxk, n_experts)
            for scheme in ("all_gather", "all_to_all") for auxk in (False, True)}


def _loopback_bytes() -> int | None:
    try:
        with open("/proc/net/dev") as f:
            for line in f:
                name, _, rest = line.partition(":")
                if name.strip() == "lo":
                    return int(rest.split()[0])  # received bytes (= sent, on loopback)
    except OSError:
        pass
    return None


def _worker(rank: int, world: int, port: int, args, result_path: str) -> None:
    import torch
    import torch.distributed as dist
    from switchsae.core import SwitchSAEConfig, adam_init, init_params, train_step
    from switchsae.core.parallel import expert_range

    from switchsae.backends.torch.distributed import parallel_backend, shutdown

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    cfg = SwitchSAEConfig(d_in=args.d, n_latents=args.experts * args.width, n_experts=args.experts, k=args.k,
                          auxk_coef=1 / 32 if args.auxk else 0.0)
    rng = np.random.default_rng(0)
    batches = [rng.normal(size=(world * args.batch, args.d)).astype(np.float32) for _ in range(args.steps + 1)]
    dead = torch.as_tensor(rng.random(cfg.n_latents) < 0.5) if args.auxk else None
    report = {}
    for scheme in ("all_gather", "all_to_all"):
        be = parallel_backend("expert", device="cpu", exchange=scheme)
        params = be.shard_params({n: be.asarray(p, "float32") for n, p in init_params(cfg, 0).items()})
        opt = adam_init(params, be.xp)
        lo, hi = expert_range(cfg.n_experts, world, rank)
        remote = 0
        for i, x in enumerate(batches):
            if i == 1:  # the first step warms up
                dist.barrier()
                before, lo_before, t0 = dict(be.comm.received), _loopback_bytes(), time.perf_counter()
            params, opt, out = train_step(be, cfg, params, opt, be.asarray(x[be.batch_rows(x.shape[0])]), 1e-3, dead)
            if i >= 1:
                remote += int(((out.expert < lo) | (out.expert >= hi)).sum())
        dist.barrier()
        seconds, lo_after = time.perf_counter() - t0, _loopback_bytes()
        counted = {k: (be.comm.received[k] - before.get(k, 0)) / args.steps for k in be.comm.received}
        pieces = [None] * world
        dist.all_gather_object(pieces, {"counted": counted, "remote": remote})
        if rank == 0:
            total_remote = sum(p["remote"] for p in pieces) / (args.steps * world * args.batch)
            model = exchange_bytes(scheme, args.batch, args.d, args.k, world, 4, args.auxk, args.experts,
                                   remote_fraction=total_remote)
            report[scheme] = {
                "counted_per_rank": {k: sum(p["counted"].get(k, 0) for p in pieces) / world for k in LABELS},
                "counted_other_per_rank": {k: sum(p["counted"].get(k, 0) for p in pieces) / world
                                           for k in sorted(set().union(*(p["counted"] for p in pieces)) - {*LABELS})},
                "model_per_rank": model, "remote_fraction": total_remote,
                "loopback_bytes_per_step": None if lo_after is None else (lo_after - lo_before) / args.steps,
                "seconds_per_step": seconds / args.steps,
            }
    if rank == 0:
        with open(result_path, "w") as f:
            json.dump(report, f)
    shutdown()


def measure(args) -> dict:
    """Spawn 2 gloo processes, train `steps` steps with each exchange; -> the report."""
    return _spawn(_worker, args)


def _mb(b) -> str:
    return f"{b / 1e6:9.2f} MB"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--d", type=int, default=768)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--world", type=int, default=8, help="ranks for the model (the measurement uses 2)")
    p.add_argument("--batch", type=int, default=4096, help="tokens per rank")
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--measure", action="store_true", help="also measure on 2 local gloo processes")
    p.add_argument("--width", type=int, default=128, help="latents per expert for the measurement")
    p.add_argument("--steps", type=int, default=3, help="measured steps (after one warm-up)")
    p.add_argument("--auxk", action="store_true", help="measure with AuxK on (reconstructions are 2d wide)")
    p.add_argument("--scale", action="store_true",
                   help="print the table of bytes per process and per step for 2^20, 2^24, 2^30 latents")
    p.add_argument("--check-log2-m", type=int, metavar="L",
                   help="with --scale: check the model on 2 gloo processes at 2^L latents")
    args = p.parse_args(argv)
    if args.scale:
        print(f"model (core.parallel): expert parallel, d={SCALE['d']}, m={SCALE['width']} latents per expert, "
              f"k={SCALE['k']}, {SCALE['batch']} tokens per process, float32, AuxK on, balanced routing")
        print(scale_table())
        if args.check_log2_m:
            cfg = scale_config(args.check_log2_m)
            row, got = scale_row(cfg, 2), check_scale(args.check_log2_m)
            print(f"\n2 gloo processes at 2^{args.check_log2_m} latents (N={cfg.n_experts}), one step, per rank:")
            for r, piece in enumerate(got):
                exchange = sum(piece["counted"].get(k, 0) for k in LABELS)
                print(f"  rank {r}: held {piece['held']:,} B (model {row['total']:,}); token exchange "
                      f"{exchange:,} B (model, balanced routing, {row['exchange']:,}); gradient sum "
                      f"{piece['counted'].get('grads', 0):,} B (model {row['gradient_sum']:,})")
        return 0

    print(f"model: bytes received per rank per step (forward + backward), d={args.d}, N={args.experts}, "
          f"R={args.world}, {args.batch} tokens/rank, k={args.k}, float32, balanced routing")
    for (scheme, auxk), parts in model_table(args.d, args.experts, args.world, args.batch, args.k).items():
        print(f"  {scheme:10s} AuxK {'on ' if auxk else 'off'} {_mb(parts['total'])}   "
              + "  ".join(f"{k} {v / 1e6:.2f}" for k, v in parts.items() if k != "total" and v))
    for auxk in (False, True):
        table = model_table(args.d, args.experts, args.world, args.batch, args.k)
        g, a = table[("all_gather", auxk)]["total"], table[("all_to_all", auxk)]["total"]
        print(f"  AuxK {'on ' if auxk else 'off'}: all_to_all moves {a / g:.1%} of all_gather's bytes "
              f"(saves {_mb(g - a).strip()} per rank per step, {1 - a / g:.1%})")
    if args.measure:
        print(f"\nmeasured: 2 gloo processes on this machine, d={args.d}, N={args.experts}, m={args.width}, "
              f"{args.batch} tokens/rank, k={args.k}, AuxK {'on' if args.auxk else 'off'}, {args.steps} steps")
        report = measure(args)
        for scheme, r in report.items():
            counted, other = sum(r["counted_per_rank"].values()), sum(r["counted_other_per_rank"].values())
            print(f"  {scheme:10s} counted {_mb(counted)}/rank  model {_mb(r['model_per_rank']['total'])}/rank "
                  f"(remote share {r['remote_fraction']:.3f})  other collectives {_mb(other)}/rank  "
                  f"loopback {_mb(r['loopback_bytes_per_step'] or 0)} (both ranks)  "
                  f"{r['seconds_per_step'] * 1e3:.0f} ms/step")
        g = sum(report["all_gather"]["counted_per_rank"].values())
        a = sum(report["all_to_all"]["counted_per_rank"].values())
        print(f"  measured: all_to_all moves {a / g:.1%} of all_gather's token-exchange bytes (R = 2: model 50%)")
        print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
