"""Small runs for choosing the library's defaults: train each given variant of a config on the
MiniLM-L6 activations of `experiments.paper` and print one JSON line per run (held-out FVU,
the trainer's dead fraction at the end, latents that never fired on the held-out tokens, the
learning rate and dead-latent window in effect, the training loop's wall time and the seconds
of the whole run with its evaluation).

Each run is a JSON object of `SwitchSAEConfig` fields, plus `TrainConfig` fields prefixed
with `tc_` and an optional `seed`:

    python -m experiments.recipe_search --steps 300 --batch-size 1024 \\
        '{"n_latents": 768, "k": 16}' '{"n_latents": 12288, "n_experts": 16, "k": 16, "tc_lr": 0.008}'
"""

from __future__ import annotations

import json
import time

from .paper import experiment_parser


def add_run_args(p, backend: bool = True) -> None:
    """The options of a recipe run (`train_and_measure`): runs, budget, data (and backend)."""
    p.add_argument("runs", nargs="+", help="JSON objects: config fields, tc_<TrainConfig field>, seed")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--corpus", help="a corpus of switchsae.data.corpora (default: the embedded docs)")
    p.add_argument("--max-texts", type=int, help="the corpus's first texts only")
    p.add_argument("--layer", type=int, default=3)
    if backend:
        p.add_argument("--backend", default="torch")


def train_and_measure(fields: dict, args, backend, trainer_cls=None) -> dict:
    """Train one run (`fields`: config fields, tc_<TrainConfig field>, seed; consumed) with
    `trainer_cls` (default `Trainer`) on `backend` -> its measurements on the held-out data."""
    from switchsae import SwitchSAEConfig, TrainConfig, Trainer
    from switchsae.training import evaluate

    from .paper import load_data

    fields = dict(fields)
    seed = fields.pop("seed", 0)
    train_fields = {key[3:]: fields.pop(key) for key in list(fields) if key.startswith("tc_")}
    train_src, eval_src, _ = load_data(args.layer, args.batch_size, seed, args.max_texts, False, args.corpus)
    cfg = SwitchSAEConfig(d_in=train_src.d_in, **fields)
    tc = TrainConfig(steps=args.steps, batch_size=args.batch_size, seed=seed,
                     log_every=max(1, args.steps // 4), **train_fields)
    t0 = time.perf_counter()
    trainer = (trainer_cls or Trainer)(cfg, tc, train_src, backend, progress=False)
    result = trainer.run()
    ev = evaluate(result.sae, eval_src)
    return {"fvu": round(ev.fvu, 4), "train_dead": round(result.history[-1]["dead_fraction"], 3),
            "heldout_never_fired": round(ev.dead_fraction, 3), "lr": trainer.peak_lr,
            "dead_tokens": trainer.dead_tokens, "train_wall_s": round(result.wall_time, 3),
            "seconds": round(time.perf_counter() - t0, 1)}


def parse_run_args(name: str, doc: str, argv=None):
    """`python -m experiments.<name>`'s runs and options (`add_run_args`) -> (args, backend)."""
    p = experiment_parser(name, doc)
    add_run_args(p)
    args = p.parse_args(argv)
    from switchsae import get_backend

    return args, get_backend(args.backend)


def main(argv=None) -> int:
    args, backend = parse_run_args("recipe_search", __doc__, argv)
    for spec in args.runs:
        print(json.dumps({"run": spec, **train_and_measure(json.loads(spec), args, backend)}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
