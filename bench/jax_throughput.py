"""Train-step throughput (tokens/s) of the JAX backend, with the torch backend beside it when
it is importable.  Both run the shared `core.train_step` through their `compile_step`.

    python -m switchsae.bench.jax_throughput            # d_in 768, M 24576, N 16, k 32, batch 4096
    python -m switchsae.bench.jax_throughput --quick    # small sizes, a smoke run

Prints one JSON object: the config, then per backend tokens/s, ms per step and the time of the
first (compiling) steps.  A smoke benchmark: a few timed steps on one fixed batch."""

from __future__ import annotations

import argparse
import functools
import json
import time

import numpy as np

from switchsae.backends import load_backend
from switchsae.core import SwitchSAEConfig, adam_init, init_params, train_step

FULL = {"d_in": 768, "n_latents": 24576, "n_experts": 16, "k": 32, "batch": 4096}
QUICK = {"d_in": 64, "n_latents": 1024, "n_experts": 8, "k": 8, "batch": 512}


def measure(backend, cfg: SwitchSAEConfig, batch: int, steps: int, warmup: int = 2, seed: int = 0) -> dict:
    """Time `steps` compiled train steps after `warmup` ones (which include compilation)."""
    params = {n: backend.asarray(p, cfg.dtype) for n, p in init_params(cfg, seed).items()}
    state = adam_init(params, backend.xp)
    x = backend.asarray(np.random.default_rng(seed).normal(size=(batch, cfg.d_in)), cfg.dtype)
    step = backend.compile_step(functools.partial(train_step, backend, cfg))

    def run(n):
        nonlocal params, state
        start = time.perf_counter()
        for _ in range(n):
            params, state, out = step(params, state, x, cfg.default_lr)
        float(backend.to_numpy(out.losses["total"]))  # waits for the device
        return time.perf_counter() - start

    first = run(warmup)
    elapsed = run(steps)
    return {"tokens_per_s": round(batch * steps / elapsed, 1), "ms_per_step": round(1e3 * elapsed / steps, 2),
            "first_steps_s": round(first, 2), "device": _device(backend)}


def _device(backend) -> str:
    if backend.name == "jax":
        import jax

        return str(jax.devices()[0].device_kind)
    return str(getattr(backend, "device", "unknown"))


def _torch_or_reason():
    try:
        return load_backend("torch"), None
    except Exception as err:  # noqa: BLE001 - not installed or not built yet: reported, not fatal
        return None, f"{type(err).__name__}: {err}"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (smoke run)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 10, quick 5)")
    parser.add_argument("--batch", type=int, default=None, help="override the batch size")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    args = parser.parse_args(argv)
    sizes = dict(QUICK if args.quick else FULL)
    batch = args.batch or sizes.pop("batch")
    sizes.pop("batch", None)
    steps = args.steps or (5 if args.quick else 10)
    cfg = SwitchSAEConfig(dtype=args.dtype, **sizes)

    results = {"jax": measure(load_backend("jax"), cfg, batch, steps)}
    torch_backend, reason = _torch_or_reason()
    if torch_backend is None:
        results["torch"] = {"skipped": reason}
    else:
        try:
            results["torch"] = measure(torch_backend, cfg, batch, steps)
        except Exception as err:  # noqa: BLE001 - a backend still in progress: reported, not fatal
            results["torch"] = {"skipped": f"{type(err).__name__}: {err}"}
    report = {"config": {**cfg.to_dict(), "batch": batch}, "timed_steps": steps, "results": results}
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
