"""`switchsae inspect CKPT`: build the feature browser of a checkpoint.

    switchsae inspect runs/a                     # Python's docs through MiniLM-L6 (as in training)
    switchsae inspect runs/a --text corpus.txt --out browser --max-tokens 50000

The text, model and layer default to those the checkpoint was trained on (its trainer
state), else to the built-in default: Python's docs through the packaged MiniLM-L6.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from switchsae.validation import OneLineParser, check_output_dir, nonnegative_int, positive_int

from .geometry import MAP_METHODS


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The `inspect` options, on `p` (its own parser or a `switchsae` subcommand's)."""
    p.add_argument("checkpoint", metavar="CKPT", help="checkpoint or training run directory")
    p.add_argument("--out", metavar="DIR", help="output directory (default: CKPT/browser for a run "
                   "directory, else CKPT-browser beside the checkpoint)")
    g = p.add_argument_group("data (default: what the checkpoint was trained on, else Python's docs "
                             "through the packaged MiniLM-L6)")
    g.add_argument("--text", metavar="FILE", help="text file to harvest (paragraphs, or .jsonl 'text' fields)")
    g.add_argument("--model", metavar="PATH", help="local transformers model directory")
    g.add_argument("--layer", type=int, help="hidden-state index to harvest (0 = embeddings)")
    g.add_argument("--max-texts", type=positive_int, metavar="N", help="use only the first N texts")
    g.add_argument("--max-tokens", type=positive_int, metavar="N", help="use only the first N tokens")
    s = p.add_argument_group("site")
    s.add_argument("--contexts", type=positive_int, default=10, metavar="N", help="top contexts per feature (default 10)")
    s.add_argument("--neighbours", type=nonnegative_int, default=5, metavar="N",
                   help="nearest features in other experts (default 5)")
    s.add_argument("--map", choices=MAP_METHODS, default="auto",
                   help="2-D map of decoder directions: pca, umap, or auto = umap if installed (default)")
    p.add_argument("--backend", help="numpy, torch, jax or mlx (default: the active backend)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="switchsae inspect", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return p


def _trained_on(path) -> dict:
    """The data description a `switchsae train` checkpoint records (empty if none)."""
    from switchsae.checkpoint import STATE_FILE, _read_json, resolve

    state = resolve(path) / STATE_FILE
    spec = _read_json(state).get("data_spec") if state.is_file() else None
    return spec if isinstance(spec, dict) else {}


def _default_out(path: Path) -> Path:
    return path / "browser" if (path / "checkpoints").is_dir() else path.with_name(path.name + "-browser")


def run(args: argparse.Namespace) -> int:
    """Build the site for parsed `args`; -> exit status."""
    from switchsae import get_backend
    from switchsae.interop import load
    from switchsae.data import DEFAULT_LAYER, DataError, read_texts
    from switchsae.training import DataSpec

    from .collect import collect
    from .site import build_site, check_site_dir

    out = Path(args.out) if args.out else _default_out(Path(args.checkpoint))
    check_site_dir(check_output_dir(out, "browser directory"))
    sae = load(args.checkpoint, backend=get_backend(args.backend))
    spec = _trained_on(args.checkpoint)
    text = args.text or spec.get("text")
    if spec.get("shards") and not args.text:
        raise DataError(f"{args.checkpoint} was trained on activation shards, which hold no text: pass "
                        "--text FILE (with --model / --layer of the model that made them)")
    model = args.model or spec.get("model")
    layer = args.layer if args.layer is not None else spec.get("layer", DEFAULT_LAYER)
    how = {} if args.text else {k: spec[k] for k in ("text_column", "one_per_line") if k in spec}
    width = DataSpec(text=text, model=model, layer=layer, holdout_every=0, **how).d_in()
    if width != sae.cfg.d_in:
        raise DataError(f"{args.checkpoint} expects activations of width d_in={sae.cfg.d_in} but "
                        f"{model or 'MiniLM-L6'} has hidden size {width}: pass the --model it was trained on")
    corpus = collect(model, read_texts(text, **how) if text else None, layer, max_texts=args.max_texts,
                     max_tokens=args.max_tokens, max_length=spec.get("max_length", 128),
                     progress=not args.no_progress)
    source = f"{text or 'Python docs (pydoc_data.topics)'} through {model or 'MiniLM-L6'} layer {layer}"
    index = build_site(sae, corpus, out, n_contexts=args.contexts, n_neighbours=args.neighbours,
                       map_method=args.map, source=source)
    print(f"feature browser of {sae!r} on {len(corpus.tokens)} tokens of {source}: {index.resolve()}")
    return 0


def main(argv=None) -> int:
    """Entry point: `switchsae inspect` arguments -> exit status (2 on a usage or data error)."""
    from switchsae.cli import run_command

    return run_command("inspect", run, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
