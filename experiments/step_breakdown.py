"""Where a training step's time goes: train each given run as `experiments.recipe_search` does
and time the backend's hooks inside the Trainer's steps, with timers rather than a profiler (the
profiler's per-op bookkeeping inflates the small ops that separate two such runs).  Prints one
JSON line per run: milliseconds per step of

  step            the training loop's wall time / steps (`TrainResult.wall_time`)
  optimiser       Backend.update or lazy_update (clip, decoder projection, Adam, renormalisation)
  loss_grads      Backend.loss_and_grads or loss_and_row_grads (forward and backward), of which
    encode        the encoder hook's forward (encode_topk / encode_topk_aux: GEMM, TopK, AuxK's choice)
    decode        the decoder hook's forward (decode / decode_with_aux)
    backward_rest loss_grads - encode - decode: routing, the losses, every backward
  rest            step - optimiser - loss_grads: the data, the dead-latent and selection-bias
                  bookkeeping, logging

and how many steps ran AuxK (their loss had its AuxK term: a dead mask and auxk_coef > 0).  For example, the FLOP-matched N = 8 run
against dense TopK:

    taskset -c 1 env OMP_NUM_THREADS=1 python -m experiments.step_breakdown --corpus python-docs \\
        --max-texts 6000 --steps 1000 '{"n_latents": 768, "k": 16}' '{"n_latents": 6144, "n_experts": 8, "k": 16}'

Eager backends only (torch, numpy): a backend that compiles its step (JAX, MLX) runs the hooks
once, while tracing."""

from __future__ import annotations

import collections
import functools
import json
import time

from switchsae.core.backend import Backend
from switchsae.core.spec import uses_auxk

from .recipe_search import parse_run_args, train_and_measure

# timed hook groups: a hook called from another of its group (torch's encode_topk calls
# encode_topk_aux) is counted once, in the outer call; the forward hooks (encode, decode) only
# inside a training step's loss_grads (not in the evaluation after it)
HOOKS = {"optimiser": ("update", "lazy_update"), "loss_grads": ("loss_and_grads", "loss_and_row_grads"),
         "encode": ("encode_topk", "encode_topk_aux"), "decode": ("decode", "decode_with_aux")}


class HookTimer:
    """Times `backend`'s HOOKS by replacing them on the instance (the class is left alone).
    seconds: group -> total; auxk_steps: steps whose loss had its AuxK term."""

    def __init__(self, backend):
        if type(backend).compile_step is not Backend.compile_step:
            raise ValueError(f"step_breakdown times eager backends only; {backend.name!r} compiles its "
                             "step, so its hooks run once while tracing")
        self.backend = backend
        self.seconds = collections.Counter()
        self.auxk_steps = 0
        self.depth = {group: 0 for group in HOOKS}
        for group, names in HOOKS.items():
            for name in names:
                setattr(backend, name, self._timed(group, getattr(backend, name)))

    def _timed(self, group: str, hook):
        forward_part = group in ("encode", "decode")

        @functools.wraps(hook)
        def timed(*args, **kwargs):
            if self.depth[group] or (forward_part and not self.depth["loss_grads"]):
                return hook(*args, **kwargs)
            if group == "loss_grads":  # (params, x, cfg, dead_mask, ...): the step's loss has AuxK
                cfg, mask = args[2], kwargs.get("dead_mask", args[3] if len(args) > 3 else None)
                self.auxk_steps += uses_auxk(cfg, mask)
            self.depth[group] += 1
            t0 = time.perf_counter()
            try:
                return self.backend.block_until_ready(hook(*args, **kwargs))
            finally:
                self.seconds[group] += time.perf_counter() - t0
                self.depth[group] -= 1
        return timed

    def restore(self) -> None:
        for names in HOOKS.values():
            for name in names:
                delattr(self.backend, name)


def breakdown(seconds: dict, wall_s: float, steps: int) -> dict:
    """Per-step milliseconds of the groups and the derived parts (module docstring)."""
    ms = {group: 1e3 * seconds.get(group, 0.0) / steps for group in HOOKS}
    step = 1e3 * wall_s / steps
    return {"step": step, "optimiser": ms["optimiser"], "loss_grads": ms["loss_grads"], "encode": ms["encode"],
            "decode": ms["decode"], "backward_rest": ms["loss_grads"] - ms["encode"] - ms["decode"],
            "rest": step - ms["optimiser"] - ms["loss_grads"]}


def main(argv=None) -> int:
    args, backend = parse_run_args("step_breakdown", __doc__, argv)
    for spec in args.runs:
        timer = HookTimer(backend)
        try:
            measured = train_and_measure(json.loads(spec), args, backend)
        finally:
            timer.restore()
        parts = breakdown(timer.seconds, measured["train_wall_s"], args.steps)
        print(json.dumps({"run": spec, "ms_per_step": {k: round(v, 2) for k, v in parts.items()},
                          "auxk_steps": timer.auxk_steps, "fvu": measured["fvu"],
                          "train_wall_s": measured["train_wall_s"]}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
