"""`switchsae` command line: train, eval, harvest, inspect, bench.

    switchsae train                      # MiniLM-L6 activations of Python's docs, ~2 min on CPU
    switchsae train --data SHARDS --experts 16 --k 64 --steps 5000 --out runs/big
    switchsae train --resume runs/big    # continue after an interruption, same data order
    torchrun --nproc-per-node 2 -m switchsae train --parallel data --data SHARDS   # 2 processes
    switchsae eval runs/big [SHARDS]     # FVU, nMSE, L0, dead fraction, expert load
    switchsae harvest OUT --text corpus.parquet --model gpt2-dir --layer 6
    switchsae export runs/big out/sae --format saelens   # or sparsify (N = 1)
    switchsae inspect runs/big --out browser   # static feature browser (opens from disk)
    switchsae bench --grid quick               # hardware benchmark (python -m switchsae.bench)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from switchsae.training.run_dir import check_new_run_dir
from switchsae.validation import (OneLineParser, check_model_dir, check_output_dir, finite_float,
                                  int_at_least, nonnegative_int, positive_int)

# Sizes and bookkeeping of `switchsae train` with no arguments (N = 8, k = 32, M = 8 * d_in).
# The losses, learning rate, warm-up and dead-latent window are the library's defaults
# (`SwitchSAEConfig`, `TrainConfig`: measured, README "Training defaults"); --preset paper
# takes the paper's.
DEFAULTS = {"experts": 8, "k": 32, "expansion": 8, "steps": 1000, "batch_size": 2048,
            "log_every": 10, "checkpoint_every": 250, "seed": 0, "eval_tokens": 65_536}
PRESETS = ("default", "paper")
# options that a resumed run takes from its checkpoint instead
_RUN_OPTIONS = ("data", "text", "model", "layer", "eval_data", "holdout_every", "d_in", "latents",
                "experts", "k", "preset", "lb_coef", "auxk_coef", "dtype", "steps", "batch_size", "lr", "warmup",
                "seed", "log_every", "checkpoint_every", "dead_tokens", "no_normalize", "no_cache",
                "text_column", "one_per_line", "max_length", "optimizer", "selection_bias")


class CLIError(Exception):
    """A usage error reported as one line, exit status 2."""


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # the benchmark owns its options (switchsae bench --help)
        from switchsae.bench.__main__ import main as bench_main

        return bench_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return run_command(args.command, args.handler, args)


def run_command(command: str, handler, args) -> int:
    """handler(args), with every library error as one line on stderr: exit 2 for bad input
    (found before any work), 1 for a training run that started and had to stop.  Any other
    exception is a bug and keeps its traceback."""
    from switchsae.training import TrainingError
    from switchsae.validation import library_errors

    try:
        return handler(args)
    except (CLIError, *library_errors()) as e:
        print(f"switchsae {command}: error: {e}", file=sys.stderr)
        return 1 if isinstance(e, TrainingError) else 2


# -- parser -------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="switchsae", description="Train and evaluate Switch Sparse Autoencoders.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineParser)
    _train_parser(sub)
    _eval_parser(sub)
    _harvest_parser(sub)
    _export_parser(sub)
    from switchsae.inspect.cli import add_arguments as add_inspect_arguments, run as run_inspect

    p = sub.add_parser("inspect", help="build the static feature browser of a checkpoint")
    add_inspect_arguments(p)
    p.set_defaults(handler=run_inspect)
    sub.add_parser("bench", help="hardware benchmark (its options: switchsae bench --help)")
    return parser


def _add_backend(p) -> None:
    p.add_argument("--backend", help="numpy, torch, jax or mlx (default: torch if installed, else numpy)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _add_text_source(p, with_data: bool) -> None:
    g = p.add_argument_group("data (default: Python's docs through the packaged MiniLM-L6)")
    if with_data:
        g.add_argument("--data", metavar="DIR", help="directory of activation shards (.npy/.safetensors)")
    g.add_argument("--text", metavar="SOURCE", help="text to harvest: .txt/.md (paragraphs), .jsonl, .csv, "
                   ".parquet or a datasets save_to_disk folder")
    g.add_argument("--text-column", metavar="NAME", help="column holding the text (default 'text')")
    g.add_argument("--one-per-line", action="store_true", help="a .txt/.md file holds one document per line")
    g.add_argument("--model", metavar="PATH", help="local transformers model directory (default: MiniLM-L6)")
    g.add_argument("--layer", type=int, help="hidden-state index to harvest (0 = embeddings; default 3)")
    g.add_argument("--max-length", type=positive_int, metavar="T",
                   help="tokens per window; longer documents are split into windows (default 128)")
    g.add_argument("--device", help="where the model runs: cpu, cuda, cuda:1, ... (default: CUDA if present)")


def _train_parser(sub) -> None:
    from switchsae.core.config import AUXK_COEF, LB_ALPHA, LR_ANCHOR, LR_MAX
    from switchsae.training.config import SELECTION_BIAS_STEP

    d = DEFAULTS
    p = sub.add_parser("train", help="train a Switch SAE", description=(
        "Train a Switch SAE; writes checkpoints, metrics.jsonl, report.txt, curves.png and eval.json "
        "to the output directory and prints the evaluation FVU."))
    _add_backend(p)
    _add_text_source(p, with_data=True)
    g = p.add_argument_group("data (continued)")
    g.add_argument("--eval-data", metavar="DIR", help="held-out shard directory for the final evaluation "
                   "(with --data; default: evaluate on the training shards)")
    g.add_argument("--holdout-every", type=nonnegative_int, metavar="N",
                   help="harvested text: hold out every N-th document for evaluation, 0 = none (default 20)")
    g.add_argument("--no-cache", action="store_true", help="do not cache harvested activations")
    g.add_argument("--harvest-batch-size", type=positive_int, default=32, metavar="B",
                   help="windows per model forward pass when harvesting (default 32)")
    m = p.add_argument_group("model")
    m.add_argument("--d-in", type=positive_int, help="expected activation width (checked against the data)")
    m.add_argument("--latents", type=positive_int, metavar="M", help=f"total latents (default {d['expansion']} * d_in)")
    m.add_argument("--experts", type=positive_int, metavar="N", help=f"experts (default {d['experts']})")
    m.add_argument("--k", type=positive_int, help=f"active latents per token (default {d['k']})")
    m.add_argument("--preset", choices=PRESETS, help="'paper': the paper's losses and schedule (lb 3 * d_in, no "
                   "AuxK, lr 2e-4 / sqrt(M / 2^14), no warm-up); default: the library's measured defaults")
    m.add_argument("--lb-coef", type=finite_float, help=f"load-balancing weight (default {LB_ALPHA:g} * d_in)")
    m.add_argument("--auxk-coef", type=finite_float, help=f"AuxK dead-latent loss weight (default {AUXK_COEF:g})")
    m.add_argument("--dtype", help="float32 (default), bfloat16, float16, float64")
    t = p.add_argument_group("optimisation")
    t.add_argument("--steps", type=positive_int, help=f"updates (default {d['steps']})")
    t.add_argument("--batch-size", type=positive_int, help=f"tokens per update (default {d['batch_size']})")
    t.add_argument("--lr", type=finite_float, help=f"peak Adam learning rate (default {LR_ANCHOR:g} / sqrt(m / 2^14), "
                   f"m = latents per expert, at most {LR_MAX:g})")
    t.add_argument("--warmup", type=nonnegative_int, help="warm-up steps (default 1%% of --steps)")
    t.add_argument("--dead-tokens", type=positive_int, help="tokens without firing = dead, counted in the tokens "
                   "routed to the latent's expert (default 5%% of those in the run, at most 10M)")
    t.add_argument("--optimizer", choices=("adam", "lazy_adam"),
                   help="adam (dense, default) or lazy_adam (updates only the latents that got gradient)")
    t.add_argument("--selection-bias", type=finite_float,
                   help=f"step of the latents' selection bias, which lifts under-firing latents into the TopK "
                        f"(0: off; default {SELECTION_BIAS_STEP:g} with top-1 routing; README \"Dead latents\")")
    t.add_argument("--no-normalize", action="store_true", help="train on raw activations (no scaling)")
    t.add_argument("--seed", type=nonnegative_int, help=f"initialisation and data-order seed (default {d['seed']})")
    t.add_argument("--parallel", choices=("data", "expert"),
                   help="'data' splits every batch, 'expert' also splits the experts: torch over the "
                        "processes of a torchrun launch, jax over its devices, mlx (data only) over "
                        "the processes of an mlx.launch; rank 0 writes the outputs")
    o = p.add_argument_group("output")
    o.add_argument("--out", metavar="DIR", help="run directory (default runs/<timestamp>)")
    o.add_argument("--resume", metavar="DIR",
                   help="continue the run in DIR (its settings, backend included, come from the checkpoint); "
                        "with --out, continue into that new directory instead")
    o.add_argument("--log-every", type=positive_int, help=f"steps between metric lines (default {d['log_every']})")
    o.add_argument("--checkpoint-every", type=positive_int,
                   help=f"steps between checkpoints (default {d['checkpoint_every']})")
    o.add_argument("--eval-tokens", type=int_at_least(2),
                   help=f"tokens for the final evaluation, at least 2 (default {d['eval_tokens']})")
    o.add_argument("--wandb", metavar="PROJECT",
                   help="also log the metrics to this Weights & Biases project (WANDB_MODE=offline works)")
    p.set_defaults(handler=cmd_train)


def _eval_parser(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a checkpoint", description=(
        "Print FVU, normalised MSE, L0, dead fraction and expert load of a checkpoint (switchsae, "
        "SAELens or sparsify directory, or a run directory) on activation shards, or, without DATA, "
        "on harvested text (default: the held-out part of Python's docs).  With a causal language "
        "--model also SAELens's ce_loss_score and kl_div_score (the reconstruction spliced in)."))
    p.add_argument("checkpoint", metavar="CKPT")
    p.add_argument("data", metavar="DATA", nargs="?", help="directory of activation shards")
    _add_backend(p)
    _add_text_source(p, with_data=False)
    p.add_argument("--dtype", help="load the model in this dtype (e.g. float32 for a bfloat16 model on numpy)")
    p.add_argument("--max-tokens", type=int_at_least(2),
                   help="evaluate at most this many tokens, at least 2: FVU needs a variance (default: all)")
    p.add_argument("--harvest-batch-size", type=positive_int, default=32, metavar="B",
                   help="windows per model forward pass (default 32)")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    p.set_defaults(handler=cmd_eval)


def _harvest_parser(sub) -> None:
    p = sub.add_parser("harvest", help="write activation shards + manifest", description=(
        "Run a local transformers model over text and write hidden states as activation shards "
        "with a manifest.json (usable with `switchsae train --data OUT`)."))
    p.add_argument("out", metavar="OUT", help="output directory")
    _add_text_source(p, with_data=False)
    p.add_argument("--max-tokens", type=positive_int, help="stop after this many tokens")
    p.add_argument("--batch-size", type=positive_int, default=32, help="windows per model forward pass (default 32)")
    p.add_argument("--format", choices=("npy", "safetensors"), default="npy", help="shard format")
    p.add_argument("--shard-tokens", type=positive_int, default=65536, help="rows per shard")
    p.add_argument("--overwrite", action="store_true", help="replace activation data already in OUT")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(handler=cmd_harvest)


def _export_parser(sub) -> None:
    from switchsae.interop import FORMATS

    p = sub.add_parser("export", help="write a checkpoint as a SAELens or sparsify SAE", description=(
        "Write CKPT (a checkpoint or run directory) to the new directory OUT in the layout of SAELens "
        "or sparsify.  N = 1 becomes the peer's own TopK SAE; N > 1 a SAELens 'switch' SAE, loadable "
        "by sae_lens.SAE.load_from_disk after `import switchsae.integrations.saelens`."))
    p.add_argument("checkpoint", metavar="CKPT")
    p.add_argument("out", metavar="OUT", help="new output directory")
    p.add_argument("--format", choices=FORMATS, required=True)
    p.add_argument("--hook-name", help="SAELens metadata hook_name (e.g. blocks.6.hook_resid_pre)")
    p.add_argument("--model-name", help="SAELens metadata model_name")
    p.set_defaults(handler=cmd_export)


# -- commands -----------------------------------------------------------------------------
def default_backend() -> str:
    from switchsae.backends import installed_backends

    return "torch" if "torch" in installed_backends() else "numpy"


def cmd_train(args) -> int:
    from switchsae.backends import load_parallel_backend

    from switchsae import get_backend

    state = _resume_state(args) if args.resume else None
    resumed = state.get("backend") if state else None  # the backend the run used
    name = args.backend or resumed or default_backend()
    backend = load_parallel_backend(name, args.parallel) if args.parallel else get_backend(name)
    try:
        return _train(args, backend, state)
    except BaseException:
        backend.shutdown(failed=True)
        raise


def _train(args, backend, state: dict | None = None) -> int:
    """Train on `backend`; state: the checkpoint's trainer state when resuming (read here if None)."""
    from switchsae.training import DataSpec, TrainConfig, Trainer, build_sources

    main = backend.rank == 0  # parallel: rank 0 alone prints and writes
    progress = not args.no_progress and main

    def sources(spec, batch_size, seed):
        """Rank 0 first (it may harvest into the cache), then the others (they read it)."""
        if not main:
            backend.barrier()
        built = build_sources(spec, batch_size, seed, progress, device=args.device,
                              harvest_batch_size=args.harvest_batch_size)
        if main:
            backend.barrier()
        return built

    if args.resume:
        state = state or _resume_state(args)
        spec = DataSpec.from_dict(state["data_spec"])
        tc = TrainConfig.from_dict(state["train_config"])  # checked by _resume_state
        if args.out:
            check_new_run_dir(args.out)
        train_src, eval_src, eval_label = sources(spec, tc.batch_size, tc.seed)
        trainer = Trainer.resume(args.resume, train_src, backend, out_dir=args.out, progress=progress)
        tracked = {"data_spec": state["data_spec"], **state["train_config"]}
    else:
        spec, cfg, tc = _new_run(args, backend)
        train_src, eval_src, eval_label = sources(spec, tc.batch_size, tc.seed)
        trainer = Trainer(cfg, tc, train_src, backend, data_spec=spec.to_dict(), progress=progress)
        tracked = {"data_spec": spec.to_dict(), **cfg.to_dict(), **tc.to_dict()}
    tracker = _tracker(args, trainer.out_dir, tracked) if main else None  # once the set-up is valid
    if tracker:
        trainer.on_record = tracker.log
    if main:
        where = f" ({backend.describe_parallel()})" if backend.parallel else ""
        print(f"training {trainer.cfg.n_experts} experts x {trainer.cfg.expert_width} latents, k={trainer.cfg.k}, "
              f"on {spec.describe()} with {backend.name}{where}; output {trainer.out_dir}", flush=True)
    result = trainer.run()
    backend.shutdown()  # everything rank 0 needs is gathered: leave the group
    if main:
        evaluation = _finish(args, trainer, result, spec, eval_src, eval_label)
        if tracker:
            tracker.finish({f"eval/{k}": v for k, v in evaluation.summary().items()
                            if isinstance(v, (int, float))})
    return 0


def _tracker(args, run_dir, config: dict):
    """The --wandb tracker of a run (None without --wandb)."""
    if not args.wandb:
        return None
    from switchsae.training.tracking import WandbTracker

    return WandbTracker(args.wandb, run_dir, config)


def _resume_state(args) -> dict:
    """The checked trainer state of `--resume DIR` (after refusing run settings given again)."""
    from switchsae.checkpoint import CheckpointError
    from switchsae.training.trainer import read_resumable

    given = [f"--{name.replace('_', '-')}" for name in _RUN_OPTIONS if getattr(args, name) not in (None, False)]
    if given:
        raise CLIError(f"--resume takes its settings from the checkpoint; drop {', '.join(given)}")
    _, state, _ = read_resumable(args.resume)
    if not state.get("data_spec"):
        raise CheckpointError(f"{args.resume} was not written by `switchsae train`: "
                              "no data description to resume with")
    return state


def _new_run(args, backend):
    """(DataSpec, SwitchSAEConfig, TrainConfig) of the arguments, everything checked that can
    be before the data is read: the output directory, the configs, the memory they need."""
    from switchsae.core.config import SwitchSAEConfig
    from switchsae.training import DataSpec, TrainConfig
    from switchsae.training.trainer import check_config

    def pick(name):
        return DEFAULTS[name] if getattr(args, name) is None else getattr(args, name)

    out = Path(args.out) if args.out else Path("runs") / time.strftime("%Y%m%d-%H%M%S")
    check_new_run_dir(out)
    given = {"layer": args.layer, "holdout_every": args.holdout_every, "text_column": args.text_column,
             "max_length": args.max_length}
    spec = DataSpec(shards=args.data, text=args.text, model=args.model, eval_shards=args.eval_data,
                    cache=not args.no_cache, one_per_line=args.one_per_line,
                    **{k: v for k, v in given.items() if v is not None})
    if args.eval_data and not args.data:
        raise CLIError("--eval-data needs --data")
    d_in = spec.d_in()
    if args.d_in is not None and args.d_in != d_in:
        raise CLIError(f"--d-in {args.d_in} does not match the data, whose activations have d_in={d_in}")
    given_cfg = {"lb_coef": args.lb_coef, "auxk_coef": args.auxk_coef, "dead_tokens": args.dead_tokens,
                 "dtype": args.dtype}
    cfg = SwitchSAEConfig.preset(args.preset or "default", d_in=d_in,
                                 n_latents=args.latents or DEFAULTS["expansion"] * d_in,
                                 n_experts=pick("experts"), k=pick("k"),
                                 **{k: v for k, v in given_cfg.items() if v is not None})
    given_tc = {"lr": args.lr, "warmup_steps": args.warmup, "optimizer": args.optimizer,
                "selection_bias": args.selection_bias}
    tc = TrainConfig.preset(args.preset or "default", steps=pick("steps"), batch_size=pick("batch_size"),
                            seed=pick("seed"), log_every=pick("log_every"),
                            checkpoint_every=pick("checkpoint_every"), normalize=not args.no_normalize,
                            out_dir=str(out), **{k: v for k, v in given_tc.items() if v is not None})
    check_config(cfg, tc, backend)
    return spec, cfg, tc


def _finish(args, trainer, result, spec, eval_src, eval_label) -> None:
    from switchsae.training import evaluate, write_report

    cfg, tc = trainer.cfg, trainer.tc
    evaluation = evaluate(result.sae, eval_src,
                          DEFAULTS["eval_tokens"] if args.eval_tokens is None else args.eval_tokens)
    last = result.history[-1] if result.history else {}
    summary = {
        "backend": trainer.backend.name, "data": spec.describe(),
        "model": f"d_in={cfg.d_in} M={cfg.n_latents} N={cfg.n_experts} m={cfg.expert_width} k={cfg.k} "
                 f"dtype={cfg.dtype}",
        "losses": f"lb_coef={cfg.lb_weight:g} auxk_coef={cfg.auxk_coef:g} dead_tokens={trainer.dead_tokens} "
                  f"selection_bias={trainer.bias_step:g}",
        "steps": f"{result.step} x {tc.batch_size} tokens = {result.step * tc.batch_size} tokens",
        "learning rate": f"{trainer.peak_lr:g} (warm-up {tc.warmup}, linear decay over the last "
                         f"{tc.decay_fraction:.0%})",
        "activation scale": f"{trainer.scale:g}" + ("" if tc.normalize else " (normalisation off)"),
        "training time": f"{result.wall_time:.1f} s "
                         f"({result.step * tc.batch_size / max(result.wall_time, 1e-9):,.0f} tokens/s)",
        "final train FVU": f"{last.get('fvu', float('nan')):.4f}",
        "checkpoint": str(result.checkpoint),
    }
    paths = write_report(trainer.out_dir, summary, evaluation, eval_label, result.history)
    print(evaluation.format())
    print(f"FVU ({eval_label}): {evaluation.fvu:.4f}")
    print(f"checkpoint: {result.checkpoint}\nreport: {paths['report']}\nplot: {paths['plot']}")
    return evaluation


def _text_spec(args):
    """The DataSpec of harvested text that `eval` names."""
    from switchsae.training import DataSpec

    given = {"layer": args.layer, "text_column": args.text_column, "max_length": args.max_length}
    return DataSpec(text=args.text, model=args.model, one_per_line=args.one_per_line,
                    **{k: v for k, v in given.items() if v is not None})


def cmd_eval(args) -> int:
    from switchsae import get_backend, load
    from switchsae.data import ShardSource
    from switchsae.training import build_sources, evaluate

    sae = load(args.checkpoint, backend=get_backend(args.backend or default_backend()), dtype=args.dtype)
    lm = None
    if args.data:
        if args.text or args.model or args.layer is not None:
            raise CLIError("give DATA shards or --text/--model/--layer, not both")
        source, label = ShardSource(args.data, 4096, shuffle=False, expected_d_in=sae.cfg.d_in), args.data
    else:
        spec = _text_spec(args)
        if spec.d_in() != sae.cfg.d_in:
            raise CLIError(f"the model's width is {spec.d_in()} but the checkpoint expects d_in={sae.cfg.d_in}")
        _, source, label = build_sources(spec, 4096, 0, progress=not args.no_progress, device=args.device,
                                         harvest_batch_size=args.harvest_batch_size)
        lm = _lm_scores(args, sae, spec)
    if source.d_in != sae.cfg.d_in:
        raise CLIError(f"the data has d_in={source.d_in} but the checkpoint expects d_in={sae.cfg.d_in}")
    result = evaluate(sae, source, args.max_tokens)
    scores = lm.summary() if lm else {}
    if args.json:
        print(json.dumps({"checkpoint": args.checkpoint, "data": label, **result.summary(),
                          **{k: v for k, v in scores.items() if k != "layer"}}))
    else:
        print(f"{sae!r} on {label}\n{result.format()}")
        if lm:
            print(f"ce_loss_score {lm.ce_loss_score:.4f}  kl_div_score {lm.kl_div_score:.4f}  (SAELens's, "
                  f"spliced at layer {lm.layer}; CE clean {lm.ce_loss_clean:.4f}, with SAE "
                  f"{lm.ce_loss_with_sae:.4f}, zero-ablated {lm.ce_loss_with_ablation:.4f}; "
                  f"{lm.n_tokens} predictions)")
    return 0


def _lm_scores(args, sae, spec):
    """SAELens's CE/KL scores on the held-out texts when --model is a causal LM, else None."""
    from switchsae.evaluation.lm_scores import is_causal_lm, lm_scores

    if spec.model is None or not is_causal_lm(spec.model):
        return None
    kept, held = spec.split_texts()
    return lm_scores(sae, held or kept, spec.layer, spec.model, batch_size=args.harvest_batch_size,
                     max_length=spec.max_length, max_tokens=args.max_tokens, device=args.device,
                     progress=not args.no_progress)


def cmd_harvest(args) -> int:
    from switchsae.data import DEFAULT_LAYER, cache_activations, read_texts

    check_output_dir(args.out, "harvest output directory")
    if args.model:
        check_model_dir(args.model)
    texts = read_texts(args.text, text_column=args.text_column or "text", one_per_line=args.one_per_line) \
        if args.text else None
    layer = DEFAULT_LAYER if args.layer is None else args.layer
    manifest = cache_activations(args.model, texts, layer, args.out,
                                 shard_tokens=args.shard_tokens, format=args.format,
                                 batch_size=args.batch_size, max_length=args.max_length or 128,
                                 device=args.device, progress=not args.no_progress,
                                 max_tokens=args.max_tokens, overwrite=args.overwrite)
    print(f"wrote {manifest['total_tokens']} tokens x d_in={manifest['d_in']} in "
          f"{len(manifest['shards'])} shard(s) to {args.out}")
    return 0


def cmd_export(args) -> int:
    from switchsae.interop import export

    metadata = {k: v for k, v in (("hook_name", args.hook_name), ("model_name", args.model_name)) if v}
    out = export(args.checkpoint, args.out, format=args.format, metadata=metadata)
    print(f"exported {args.checkpoint} as a {args.format} SAE to {out}")
    return 0
