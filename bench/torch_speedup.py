"""Train-step speed of the PyTorch backend per number of experts, and against a naive Switch SAE.

torch backend: grouped-GEMM dispatch, sparse decode, sparse backward.  Naive (the obvious
PyTorch port): a Python loop over experts, each expert's tokens selected and encoded, dense
(tokens, m) activations, a dense decode, autograd -- and the same optimiser step.

Both run core.train_step.train_step as the Trainer does, so both use the backend's fused
in-place optimiser update (TorchBackend.update).

    python -m switchsae.bench.torch_speedup             # d 768, M 24576, k 32, batch 8192, fp32
    python -m switchsae.bench.torch_speedup --quick     # seconds-long smoke run
    python -m switchsae.bench.torch_speedup --out torch_speedup.json

On CPU much of a step is page-faulting fresh (N, m, d)-sized allocations; torch's
THP_MEM_ALLOC_ENABLE=1 (set before torch is imported) backs them with huge pages.  The record
notes whether it was set.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

import numpy as np
import torch
from switchsae.backends.torch import Backend as TorchBackend
from switchsae.core import SwitchSAEConfig, adam_init, init_params, train_step
from switchsae.core import losses as L
from switchsae.core.spec import ForwardOutput
from switchsae.files import atomic_write_json

from .machine import describe
from .timing import PAPER_BATCH, measure

FULL = {"d_in": 768, "n_latents": 24576, "k": 32, "batch": PAPER_BATCH, "experts": (1, 8, 16, 32), "naive": 16}
QUICK = {"d_in": 64, "n_latents": 1024, "k": 8, "batch": 512, "experts": (1, 8, 16), "naive": 16}
TARGETS = {"N16_vs_N1": 6.0, "N16_vs_naive": 3.0}


class NaiveBackend(TorchBackend):
    """The torch backend with a naive loss_and_grads (loop over experts, dense activations)."""

    name = "torch-naive"

    def loss_and_grads(self, params, x, cfg, dead_mask=None, select_bias=None):
        if dead_mask is not None or select_bias is not None or cfg.experts_per_token != 1 or cfg.shared_latents or cfg.encoder_bias:
            raise NotImplementedError("the naive baseline covers the paper's plain Switch SAE only")
        return self.differentiate(params, lambda p: self._forward(p, x, cfg))

    def _forward(self, p, x, cfg):
        m, k = cfg.expert_width, cfg.k
        probs = torch.softmax((x - p["b_router"]) @ p["W_router"].T, dim=-1)
        expert = probs.argmax(-1)
        gate = probs.gather(1, expert[:, None]) if cfg.router_scale == "soft" else torch.ones_like(probs[:, :1])
        x_centered = x - p["b_pre"]
        x_hat = torch.zeros_like(x)
        top_values = x.new_zeros((x.shape[0], k))
        top_indices = torch.zeros((x.shape[0], k), dtype=torch.int64, device=x.device)
        for e in range(cfg.n_experts):
            rows = torch.nonzero(expert == e).squeeze(1)
            if rows.numel() == 0:
                continue
            acts = torch.relu(x_centered[rows] @ p["W_enc"][e])             # (n_e, m) dense
            kept, local = torch.topk(acts, k, dim=-1)
            gated = kept * gate[rows]
            dense = torch.zeros_like(acts).scatter(1, local, gated)          # (n_e, m) dense
            x_hat = x_hat.index_add(0, rows, dense @ p["W_dec"][e])          # dense decode
            top_values = top_values.index_copy(0, rows, gated)
            top_indices = top_indices.index_copy(0, rows, local + e * m)
        x_hat = x_hat + p["b_pre"]
        xp = self.xp
        mse = L.mse_loss(x - x_hat, xp)
        lb = L.load_balance_loss(probs, L.expert_fractions(expert, cfg.n_experts, probs.dtype, xp), xp)
        losses = {"mse": mse, "lb": lb, "auxk": torch.zeros_like(mse), "total": mse + cfg.lb_weight * lb}
        return ForwardOutput(x_hat, expert, probs, top_values, top_indices, losses)


def step_throughput(backend, cfg, batch: int, repeats: int) -> dict:
    """Median seconds and tokens/s of one train step (updates carried from step to step)."""
    state = {"params": {n: backend.asarray(p, cfg.dtype) for n, p in init_params(cfg, 0).items()}}
    state["opt"] = adam_init(state["params"], backend.xp)
    x = backend.asarray(np.random.default_rng(0).normal(size=(batch, cfg.d_in)), cfg.dtype)
    step = backend.compile_step(functools.partial(train_step, backend, cfg))

    def run():
        state["params"], state["opt"], out = step(state["params"], state["opt"], x, cfg.default_lr)
        return out.losses["total"]

    timing = measure(run, backend, warmup=1, repeats=repeats)
    return {"implementation": backend.name, "n_experts": cfg.n_experts,
            "d_in": cfg.d_in, "n_latents": cfg.n_latents, "k": cfg.k, "batch": batch,
            "dtype": cfg.dtype, **timing, "tokens_per_s": batch / timing["median_s"]}


def check_naive_matches(fast, naive, cfg, batch: int) -> float:
    """Largest relative difference (to each gradient's max |value|) between the two
    implementations' gradients on one batch: the baseline must compute the same thing."""
    params = {n: fast.asarray(p, cfg.dtype) for n, p in init_params(cfg, 0).items()}
    x = fast.asarray(np.random.default_rng(0).normal(size=(batch, cfg.d_in)), cfg.dtype)
    a, b = fast.loss_and_grads(params, x, cfg)[1], naive.loss_and_grads(params, x, cfg)[1]
    return max(float((a[n] - b[n]).abs().max() / b[n].abs().max()) for n in a)


def ratios(results: list[dict], naive_n: int) -> dict:
    fast = {r["n_experts"]: r["tokens_per_s"] for r in results if r["implementation"] == "torch"}
    naive = [r["tokens_per_s"] for r in results if r["implementation"] == "torch-naive"]
    out = {}
    if naive_n in fast and 1 in fast:
        out[f"N{naive_n}_vs_N1"] = fast[naive_n] / fast[1]
    if naive_n in fast and naive:
        out[f"N{naive_n}_vs_naive"] = fast[naive_n] / naive[0]
    return out


def run(quick: bool, device=None, repeats=None) -> dict:
    sizes = QUICK if quick else FULL
    fast, naive = TorchBackend(device), NaiveBackend(device)
    repeats = repeats or (2 if quick else 3)
    cfg_of = lambda n: SwitchSAEConfig(d_in=sizes["d_in"], n_latents=sizes["n_latents"],
                                       n_experts=n, k=sizes["k"])
    results = []
    for n in sizes["experts"]:
        results.append(step_throughput(fast, cfg_of(n), sizes["batch"], repeats))
        _print_row(results[-1])
    results.append(step_throughput(naive, cfg_of(sizes["naive"]), sizes["batch"], repeats))
    _print_row(results[-1])
    return {
        "benchmark": "torch_speedup", "quick": quick, "device": fast.device_name(),
        "threads": torch.get_num_threads(), "thp_mem_alloc": os.environ.get("THP_MEM_ALLOC_ENABLE", "0"),
        "machine": describe([fast]), "results": results,
        "naive_grad_rel_diff": check_naive_matches(fast, naive, cfg_of(sizes["naive"]), sizes["batch"]),
        "ratios": ratios(results, sizes["naive"]),
        "targets": TARGETS,
    }


def _print_row(r):
    print(f"{r['implementation']:>12} {r['n_experts']:>4} {1e3 * r['median_s']:>10.1f} "
          f"{r['tokens_per_s']:>11.0f}", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke test")
    parser.add_argument("--device", help="torch device (default: $SWITCHSAE_DEVICE, else cuda if present, else cpu)")
    parser.add_argument("--repeats", type=int, help="timed steps per configuration")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--out", help="write the records to this JSON file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"{'impl':>12} {'N':>4} {'ms/step':>10} {'tokens/s':>11}")
    record = run(args.quick, args.device, args.repeats)
    print(f"device {record['device']}, {record['threads']} threads; naive vs torch gradients: "
          f"{record['naive_grad_rel_diff']:.1e} relative")
    shown = ", ".join(f"{name} {value:.2f}x (target {TARGETS.get(name, '-')})"
                      for name, value in record["ratios"].items())
    print(f"speed-ups: {shown}")
    if args.out:
        atomic_write_json(args.out, record, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
