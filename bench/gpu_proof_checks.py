"""The checks of the GPU proof (`bench/gpu_proof.py`) that need torch, one per command:

    python -m switchsae.bench.gpu_proof_checks environment  --out DIR --device cuda
    python -m switchsae.bench.gpu_proof_checks conformance  --out DIR --device cuda --backend torch
    python -m switchsae.bench.gpu_proof_checks triton       --out DIR --device cuda
    python -m switchsae.bench.gpu_proof_checks allocation   --out DIR --device cuda
    python -m switchsae.bench.gpu_proof_checks data-parallel --out DIR --device cuda

Each writes DIR/<check>.json ({"passed": bool, ...}) and exits 1 when the check fails.  `--tiny`
runs the same check at CPU-sized shapes (the proof's --cpu-dry-run): on CPU, `triton` needs
TRITON_INTERPRET=1 in the environment (set before triton is imported) and `data-parallel` uses
gloo instead of NCCL.

  environment    the device, torch / CUDA / Triton / JAX versions; fails on a GPU run without
                 CUDA or Triton.
  conformance    `pytest conformance` on the device, float32 and bfloat16 (the suite's own
                 parametrisation), parsed into per-dtype counts.
  triton         the Triton kernels, compiled for the device, against the torch (eager) path
                 of `sparse.py` at the paper's shapes: the sparse products and the decode and
                 fused encoder autograd functions, and each product's time both ways.
  allocation     no tensor of (batch, n_latents) size in a train step (AuxK live, the
                 backend's fused update), recorded at the dispatcher.
  data-parallel  `torchrun --nproc-per-node 1 -m switchsae train --parallel data` on synthetic
                 shards (NCCL on CUDA), checked from its metrics and checkpoint.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

# -- shapes ------------------------------------------------------------------------------------
# The paper's: d 768, M 24576 (32x) in N = 16 experts, k 32, batch 8192.  Tiny: a d that spans
# two of the kernels' 128-wide blocks, the second partial, and latents that some rows never use.
PAPER = dict(batch=8192, d=768, n_latents=24576, n_experts=16, k=32)
TINY = dict(batch=32, d=200, n_latents=96, n_experts=4, k=4)
ALLOC_PAPER = dict(batch=8192, d=768, n_latents=65536, n_experts=16, k=32)
ALLOC_TINY = dict(batch=256, d=16, n_latents=512, n_experts=8, k=4)
DP_PAPER = dict(d=768, latents=24576, experts=16, k=32, batch=8192, steps=40, dtype="bfloat16")
DP_TINY = dict(d=16, latents=64, experts=4, k=4, batch=64, steps=8, dtype="bfloat16")

# Tolerances of Triton against the eager path (relative to the result's max |value|): float32,
# both sum the same <= ~100 products in float32 in different orders (error ~1e-6 of the scale);
# bfloat16, both accumulate in float32 and round once, so they differ by at most one bfloat16
# ulp, 2**-7 of the scale.
TRITON_RTOL = {"float32": 1e-5, "bfloat16": 2**-7}
DP_TIMEOUT_S = 300
# ATen ops whose output size or value the host needs (a GPU stream drains for each): counted per
# train step, as a lead for where a GPU step waits.
HOST_SYNC_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2", "equal", "is_nonzero"}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m switchsae.bench.gpu_proof_checks",
                                     description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("check", choices=sorted(CHECKS))
    parser.add_argument("--out", required=True, help="results directory (DIR/<check>.json)")
    parser.add_argument("--device", default="cuda", help="torch device (default cuda)")
    parser.add_argument("--tiny", action="store_true", help="CPU-sized shapes (the dry run)")
    parser.add_argument("--backend", default="torch", help="conformance: the backend to check")
    parser.add_argument("-k", dest="select", help="conformance: pytest -k expression (a subset)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = CHECKS[args.check](args, out)
    name = args.check if args.check != "conformance" else f"conformance-{args.backend}"
    from switchsae.files import atomic_write_json

    atomic_write_json(out / f"{name}.json", record, indent=1)
    print(json.dumps({k: v for k, v in record.items() if k in ("passed", "summary")}))
    return 0 if record["passed"] else 1


# -- environment -------------------------------------------------------------------------------

def environment(args, out: Path) -> dict:
    import torch

    from .machine import describe

    rec = {"machine": describe(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
           "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        rec.update(device_name=p.name, capability=f"sm_{p.major}{p.minor}", multiprocessors=p.multi_processor_count,
                   memory_gib=round(p.total_memory / 2**30, 1), device_count=torch.cuda.device_count())
    rec["nvidia_smi"] = _nvidia_smi()
    try:
        import triton

        rec["triton"] = triton.__version__
    except ImportError as err:
        rec["triton"] = None
        rec["triton_error"] = str(err)
    rec["jax"] = _jax_devices()
    gpu_ok = rec["cuda_available"] and rec["triton"] is not None
    rec["passed"] = True if args.tiny else bool(gpu_ok)
    rec["summary"] = (f"{rec.get('device_name', 'no CUDA device')}, torch {rec['torch']} (CUDA {rec['torch_cuda']}), "
                      f"triton {rec['triton']}, jax: {rec['jax'].get('platforms') or rec['jax'].get('error')}")
    return rec


def _nvidia_smi() -> str | None:
    try:
        proc = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.max.sm",
                               "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout.strip() or None


def _jax_devices() -> dict:
    """JAX's platforms in a child process (JAX must not take the GPU's memory in this one)."""
    code = "import jax, json; print(json.dumps(sorted({d.platform for d in jax.devices()})))"
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
    try:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    except subprocess.TimeoutExpired:
        return {"error": "timed out"}
    if proc.returncode:
        return {"error": (proc.stderr.strip().splitlines() or ["jax did not import"])[-1]}
    return {"platforms": json.loads(proc.stdout.strip().splitlines()[-1])}


# -- conformance -------------------------------------------------------------------------------

def conformance(args, out: Path) -> dict:
    """pytest conformance for one backend on the device; -> counts per dtype and the failures."""
    xml = out / f"conformance-{args.backend}.xml"
    env = dict(os.environ, SWITCHSAE_CONFORMANCE_BACKENDS=args.backend, SWITCHSAE_DEVICE=args.device,
               XLA_PYTHON_CLIENT_PREALLOCATE="false")
    if args.backend == "jax" and not args.tiny:
        env["JAX_PLATFORMS"] = "cuda"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "conformance", f"--junitxml={xml}"]
    if args.select:
        cmd += ["-k", args.select]
    proc = subprocess.run(cmd, env=env, text=True, capture_output=True)
    print(proc.stdout[-6000:], proc.stderr[-3000:], sep="\n")
    rec = {"backend": args.backend, "device": args.device, "selection": args.select, "pytest_exit": proc.returncode}
    rec.update(_junit_counts(xml) if xml.exists() else {"tests": 0, "failed": [], "by_dtype": {}})
    rec["passed"] = proc.returncode == 0 and rec["tests"] > 0 and not rec["failed"]
    dtypes = ", ".join(f"{dt} {n}" for dt, n in sorted(rec["by_dtype"].items()))
    rec["summary"] = (f"{rec['tests'] - len(rec['failed']) - rec.get('skipped', 0)}/{rec['tests']} passed ({dtypes})"
                      + (f"; failed: {', '.join(rec['failed'][:4])}" if rec["failed"] else ""))
    return rec


def _junit_counts(xml: Path) -> dict:
    cases = ET.parse(xml).getroot().iter("testcase")
    failed, skipped, by_dtype, total = [], 0, {}, 0
    for case in cases:
        total += 1
        name = case.get("name", "")
        if case.find("failure") is not None or case.find("error") is not None:
            failed.append(name)
        elif case.find("skipped") is not None:
            skipped += 1
        dtype = next((dt for dt in ("float32", "bfloat16") if dt in name), "other")
        by_dtype[dtype] = by_dtype.get(dtype, 0) + 1
    return {"tests": total, "failed": failed, "skipped": skipped, "by_dtype": by_dtype}


# -- Triton against the eager path -------------------------------------------------------------

@contextlib.contextmanager
def _sparse_impl(impl):
    """Every sparse product routed to `impl` (the Triton module or sparse._TorchImpl)."""
    from switchsae.backends.torch import sparse

    chosen = sparse._impl
    sparse._impl = lambda t: impl
    try:
        yield
    finally:
        sparse._impl = chosen


def triton_check(args, out: Path) -> dict:
    import torch
    from switchsae.backends.torch import Backend as TorchBackend
    from switchsae.backends.torch import sparse
    from switchsae.backends.torch import triton_kernels as tk

    from .timing import measure

    device = torch.device(args.device)
    sizes = TINY if args.tiny else PAPER
    backend = TorchBackend(device)
    rec = {"device": backend.device_name(), "sizes": sizes, "interpreted": os.environ.get("TRITON_INTERPRET") == "1",
           "checks": {}}
    probe = torch.zeros(1, device=device)
    rec["cuda_tensors_take_triton"] = sparse._impl(probe) is tk
    eager = sparse._TorchImpl
    for dtype in ("float32", "bfloat16"):
        inputs = _triton_inputs(torch, sizes, getattr(torch, dtype), device)
        for name, run in _triton_cases(torch, sparse, inputs).items():
            with _sparse_impl(tk):
                got = run()
            with _sparse_impl(eager):
                want = run()
            err, scale = _max_rel_error(got, want)
            entry = {"max_error_rel": err, "scale": scale, "tolerance_rel": TRITON_RTOL[dtype],
                     "ok": err <= TRITON_RTOL[dtype] and all(g.dtype == w.dtype for g, w in zip(got, want))}
            if not args.tiny and name in ("gather_sum", "sampled_dot", "scatter_outer"):
                for label, impl in (("triton", tk), ("eager", eager)):
                    with _sparse_impl(impl):
                        entry[f"{label}_ms"] = 1e3 * measure(run, backend, warmup=2, repeats=10)["median_s"]
                entry["speedup_vs_eager"] = entry["eager_ms"] / entry["triton_ms"]
            rec["checks"][f"{name} {dtype}"] = entry
    bad = [name for name, e in rec["checks"].items() if not e["ok"]]
    on_gpu = device.type == "cuda"
    rec["passed"] = not bad and (rec["cuda_tensors_take_triton"] or not on_gpu)
    worst = max(rec["checks"].items(), key=lambda kv: kv[1]["max_error_rel"] / kv[1]["tolerance_rel"])
    speed = [f"{n.split()[0]} {e['speedup_vs_eager']:.1f}x" for n, e in rec["checks"].items()
             if "speedup_vs_eager" in e and n.endswith("bfloat16")]
    rec["summary"] = (f"{len(rec['checks']) - len(bad)}/{len(rec['checks'])} match eager"
                      f" (worst {worst[0]}: {worst[1]['max_error_rel']:.1e} of {worst[1]['tolerance_rel']:.1e})"
                      + (f"; bf16 vs eager: {', '.join(speed)}" if speed else "")
                      + ("" if rec["passed"] or not on_gpu or rec["cuda_tensors_take_triton"]
                         else "; CUDA tensors do NOT take the Triton kernels"))
    if bad:
        rec["summary"] += f"; mismatch: {', '.join(bad)}"
    return rec


def _triton_inputs(torch, sizes, dtype, device):
    """A decode's pattern: each token's k distinct latents inside its expert's block, at the
    given sizes; weights, the (M, d) table and (T, d) rows drawn in float32 then cast."""
    g = torch.Generator().manual_seed(0)
    T, d, M, N, k = sizes["batch"], sizes["d"], sizes["n_latents"], sizes["n_experts"], sizes["k"]
    m = M // N
    expert = torch.randint(N, (T,), generator=g)
    local = torch.rand(T, m, generator=g).argsort(-1)[:, :k]
    cast = lambda t: t.to(device=device, dtype=dtype)
    return {"indices": (expert[:, None] * m + local).to(device), "expert": expert.to(device),
            "values": cast(torch.randn(T, k, generator=g)), "table": cast(torch.randn(M, d, generator=g)),
            "rows": cast(torch.randn(T, d, generator=g)),
            "W_enc": cast(torch.randn(N, d, m, generator=g) / math.sqrt(d)), "k": k}


def _triton_cases(torch, sparse, inp) -> dict:
    """name -> a function returning the tensors to compare (output, then gradients)."""
    from switchsae.backends.torch.decode import decode as sparse_decode
    from switchsae.backends.torch.encode import ExpertEncodeTopK

    p = sparse.fixed_pattern(inp["indices"], inp["table"].shape[0])
    w = inp["values"].reshape(-1)

    def decode():
        values, table = inp["values"].clone().requires_grad_(), inp["table"].clone().requires_grad_()
        out = sparse_decode(values, inp["indices"], table)
        return (out.detach(), *torch.autograd.grad(out, (values, table), torch.ones_like(out)))

    def encode_topk():
        x, W = inp["rows"].clone().requires_grad_(), inp["W_enc"].clone().requires_grad_()
        b_pre = torch.zeros(x.shape[1], dtype=x.dtype, device=x.device, requires_grad=True)
        _, values, _ = ExpertEncodeTopK.apply(x, b_pre, W, None, inp["expert"], inp["k"], False)
        grad_x, _, grad_W = torch.autograd.grad(values, (x, b_pre, W), torch.ones_like(values))
        # b_pre's gradient (-sum_t grad_x[t]) is left out: a sum of T values that may each differ
        # by an ulp is not within one ulp; grad_x and grad_W are each rounded once, like the rest
        return values.detach(), grad_x, grad_W

    return {
        "gather_sum": lambda: (sparse.gather_sum(p, w, inp["table"]),),
        "sampled_dot": lambda: (sparse.sampled_dot(p, inp["rows"], inp["table"]),),
        "scatter_outer": lambda: (sparse.scatter_outer(p, w, inp["rows"]),),
        "decode_autograd": decode,
        "encode_topk_autograd": encode_topk,
    }


def _max_rel_error(got, want) -> tuple[float, float]:
    """Largest |got - want| over all pairs, relative to each pair's max |want|; and that scale."""
    worst, scale_of_worst = 0.0, 0.0
    for a, b in zip(got, want):
        scale = max(float(b.double().abs().max()), 1e-12)
        err = float((a.double() - b.double()).abs().max()) / scale
        if err >= worst:
            worst, scale_of_worst = err, scale
    return worst, scale_of_worst


# -- no (batch, M) allocation ------------------------------------------------------------------

def allocation(args, out: Path) -> dict:
    """One train step (AuxK live with half the latents dead, the backend's fused update) with
    every ATen op's dense outputs recorded; fails on any of >= batch * n_latents / 2 elements."""
    import torch
    from switchsae.backends.torch import Backend as TorchBackend
    from switchsae.core import SwitchSAEConfig, adam_init, init_params, train_step
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    s = ALLOC_TINY if args.tiny else ALLOC_PAPER
    dtype = "bfloat16"  # what GPUs train in; the dry run takes the same path on CPU
    backend = TorchBackend(args.device)
    cfg = SwitchSAEConfig(d_in=s["d"], n_latents=s["n_latents"], n_experts=s["n_experts"], k=s["k"],
                          auxk_coef=1 / 32, k_aux=2 * s["k"], dtype=dtype)
    rng = np.random.default_rng(0)
    params = {n: backend.asarray(p, dtype) for n, p in init_params(cfg, 0).items()}
    x = backend.asarray(rng.normal(size=(s["batch"], cfg.d_in)), dtype)
    dead = backend.asarray(rng.random(cfg.total_latents) < 0.5)
    opt = adam_init(params, backend.xp)
    sizes: dict[tuple, int] = {}
    syncs: dict[str, int] = {}  # ops whose result the host must wait for on a GPU

    class Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            result = func(*args, **(kwargs or {}))
            name = func.overloadpacket.__name__
            if name in HOST_SYNC_OPS:
                syncs[name] = syncs.get(name, 0) + 1
            for t in tree_flatten(result)[0]:
                if isinstance(t, torch.Tensor) and t.layout == torch.strided:
                    sizes[tuple(t.shape)] = t.numel()
            return result

    params, opt, _ = train_step(backend, cfg, params, opt, x, cfg.default_lr, dead)  # warm-up: probes, kernels
    backend.block_until_ready(None)
    on_cuda = backend.device.type == "cuda"
    if on_cuda:
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    with Recorder():
        train_step(backend, cfg, params, opt, x, cfg.default_lr, dead)
    backend.block_until_ready(None)
    limit = s["batch"] * cfg.n_latents // 2
    too_big = sorted((shape for shape, n in sizes.items() if n >= limit), key=lambda sh: -sizes[sh])
    largest = max(sizes, key=sizes.get)
    expert_acts = (s["batch"], cfg.expert_width)
    itemsize = 2 if dtype == "bfloat16" else 4
    rec = {"device": backend.device_name(), "dtype": dtype, "sizes": s, "limit_elements": limit,
           "recorded_shapes": len(sizes), "largest": list(largest), "too_big": [list(t) for t in too_big],
           "saw_expert_activations": expert_acts in sizes, "host_syncs": syncs,
           "dense_activation_bytes": s["batch"] * cfg.n_latents * itemsize}
    if on_cuda:
        rec["step_peak_bytes"] = torch.cuda.max_memory_allocated() - before
    rec["passed"] = not too_big and rec["saw_expert_activations"]
    rec["summary"] = (f"batch {s['batch']}, M {cfg.n_latents}: largest tensor {tuple(largest)}"
                      + (f" (dense (batch, M) would be {tuple((s['batch'], cfg.n_latents))})" if not too_big
                         else f"; TOO BIG: {too_big[:3]}")
                      + ("" if rec["saw_expert_activations"] else "; the recorder missed (batch, m)")
                      + f"; {sum(syncs.values())} host syncs"
                      + (f"; step peak {rec['step_peak_bytes'] / 2**20:.0f} MiB vs "
                         f"{rec['dense_activation_bytes'] / 2**20:.0f} MiB for one (batch, M)" if on_cuda else ""))
    return rec


# -- 1-process data parallel through torchrun ---------------------------------------------------

def data_parallel(args, out: Path) -> dict:
    """Synthetic shards, then `torchrun --nproc-per-node 1 -m switchsae train --parallel data`."""
    s = DP_TINY if args.tiny else DP_PAPER
    kept = out / "data-parallel"  # the run's metrics, report, plot and log (not its shards or checkpoints)
    if kept.exists():  # this check's own folder, from an earlier run
        shutil.rmtree(kept)
    kept.mkdir()
    with tempfile.TemporaryDirectory(prefix="switchsae-dp-") as work:
        rec = _data_parallel_run(args, s, Path(work), kept)
    return rec


def _data_parallel_run(args, s: dict, work: Path, kept: Path) -> dict:
    from switchsae.checkpoint import list_checkpoints, read_checkpoint
    from switchsae.data import ShardWriter
    from switchsae.evaluation.synthetic import SyntheticBenchmark

    shards, run = work / "shards", work / "run"
    tokens = s["batch"] * min(s["steps"] + 2, 8)  # at most 8 batches: the run goes over them in epochs
    bench = SyntheticBenchmark(d=s["d"], n_features=4 * s["d"], n_clusters=s["experts"], mean_active=8.0, seed=0)
    with ShardWriter(shards, shard_tokens=max(tokens // 4, 1), overwrite=True) as writer:
        for i in range(0, tokens, 8192):
            writer.append(bench.batch(min(8192, tokens - i), i // 8192).x)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
           "-m", "switchsae", "train", "--parallel", "data", "--backend", "torch", "--data", str(shards),
           "--out", str(run), "--d-in", str(s["d"]), "--latents", str(s["latents"]), "--experts", str(s["experts"]),
           "--k", str(s["k"]), "--dtype", s["dtype"], "--steps", str(s["steps"]), "--batch-size", str(s["batch"]),
           "--warmup", "2", "--log-every", str(max(s["steps"] // 4, 1)), "--checkpoint-every", str(s["steps"]),
           "--eval-tokens", str(s["batch"]), "--no-progress"]
    env = dict(os.environ, SWITCHSAE_DEVICE=args.device, OMP_NUM_THREADS="1")
    if args.device.startswith("cuda"):
        env.pop("SWITCHSAE_DEVICE")  # the rank's device: cuda:$LOCAL_RANK
        env["NCCL_DEBUG"] = "INFO"
    try:
        proc = subprocess.run(cmd, env=env, text=True, capture_output=True, timeout=DP_TIMEOUT_S)
        log, exit_code = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as err:
        log, exit_code = f"{err.stdout or ''}{err.stderr or ''}\ntimed out after {DP_TIMEOUT_S} s", -1
    (kept / "torchrun.log").write_text(log if isinstance(log, str) else log.decode(errors="replace"))
    for name in ("metrics.jsonl", "report.txt", "curves.png", "eval.json"):
        if (run / name).exists():
            shutil.copy(run / name, kept / name)
    print(log[-4000:])
    rec = {"command": " ".join(cmd[1:]).replace(sys.executable, "python"), "sizes": s, "exit_code": exit_code,
           "data_parallel_line": "data parallel, 1 process" in log,
           "collective_backend": "nccl" if "NCCL INFO" in log else ("gloo" if exit_code == 0 else None)}
    metrics = run / "metrics.jsonl"
    lines = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    steps = [r for r in lines if "fvu" in r]
    if steps:
        first, last = steps[0], steps[-1]
        rec.update(first_fvu=first["fvu"], last_fvu=last["fvu"], steps_logged=len(steps),
                   tokens_per_s=last.get("tokens_per_s"), learned=last["fvu"] < first["fvu"])
    ckpts = list_checkpoints(run) if run.exists() else []
    finite = bool(ckpts) and all(np.isfinite(p).all() for p in read_checkpoint(ckpts[-1]).params.values())
    rec["checkpoint_finite"] = finite
    want_backend = "nccl" if args.device.startswith("cuda") else "gloo"
    rec["passed"] = (exit_code == 0 and rec["data_parallel_line"] and rec["collective_backend"] == want_backend
                     and finite and rec.get("learned", False))
    rec["summary"] = (f"{want_backend}, exit {exit_code}, FVU {rec.get('first_fvu', float('nan')):.3f} -> "
                      f"{rec.get('last_fvu', float('nan')):.3f} over {s['steps']} steps of {s['batch']}"
                      + (f", {rec['tokens_per_s']:.0f} tokens/s" if rec.get("tokens_per_s") else "")
                      + ("" if finite else ", no finite checkpoint"))
    return rec


CHECKS = {"environment": environment, "conformance": conformance, "triton": triton_check,
          "allocation": allocation, "data-parallel": data_parallel}


if __name__ == "__main__":
    sys.exit(main())
