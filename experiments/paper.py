"""The Switch SAE paper's comparisons at small scale, on MiniLM-L6 activations.

Trains a dense TopK SAE (N = 1, width m) and Switch SAEs with N experts (default 4, 8, 16)
(a) at matched FLOPs: the same expert width m, so M = N * m and the same encoder cost per
token, and (b) at matched width: M = m total latents, so the encoder is N times cheaper.
Every run has the same k, token budget and optimiser settings (the `switchsae train`
defaults, `switchsae.cli.DEFAULTS`), trained by `switchsae.training.Trainer` on Python's docs
through MiniLM-L6 (every 20th text held out) and measured on the held-out texts:

    FVU, L0, dead fraction (never fired on the held-out tokens), dense fraction (fires on
    > 10% of them), duplication (latents with a decoder row at cos > 0.9 in another expert),
    FLOPs per token (`switchsae.core.flops`), expert-load entropy, and downstream fidelity:
    the fraction of the MiniLM sentence-embedding cosine recovered when the reconstruction is
    spliced in (`switchsae.evaluation.splice_fidelity`, zero-ablation floor).

Writes results.md (the table), results.json and fvu_vs_flops.png, fvu_vs_width.png,
duplication.png, expert_load.png into --out.

    python -m experiments.paper --out runs/paper            # the default budget
    python -m experiments.paper --quick --out /tmp/smoke    # smoke test, tiny models
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass
from pathlib import Path

import array_api_compat.numpy as xnp
import numpy as np

from switchsae.core import metrics
from switchsae.core.config import SwitchSAEConfig
from switchsae.core.flops import forward_flops, train_flops
from switchsae.files import atomic_write_bytes, atomic_write_json
from switchsae.plots import pyplot, save_png

FULL = dict(width=768, k=16, experts=(4, 8, 16), steps=250, batch_size=1024, max_texts=None,
            fidelity_texts=64)
QUICK = dict(width=64, k=4, experts=(4, 8), steps=25, batch_size=256, max_texts=100,
             fidelity_texts=8)
HOLDOUT_EVERY = 20  # as switchsae.training.DataSpec: every 20th text is held out
FAMILIES = ("dense", "flop-matched", "width-matched")
LEGEND = """N experts, M total latents, m per expert.  FVU on held-out tokens.  dead: latents that
never fired on them; dense: latents firing on > 10% of them.  dup (other expert): latents with
a decoder row at cosine > 0.9 in another expert; dup (any): the same against every other
latent.  FLOPs/token: `switchsae.core.flops` (forward; training step with sparse backward).
load entropy / log N: 1 = perfectly balanced experts.  fidelity: fraction of the MiniLM
sentence-embedding cosine recovered with x_hat spliced in, against zero-ablating the layer.
"""


@dataclass(frozen=True)
class Run:
    """family: "dense", "flop-matched" or "width-matched"; cfg: the model trained; variant: a
    label for runs that differ in more than N (`experiments.variants`)."""

    family: str
    cfg: SwitchSAEConfig
    variant: str = ""  # a label appended to the name ("" for the paper's runs)

    @property
    def name(self) -> str:
        base = "dense" if self.family == "dense" else f"{self.family} N={self.cfg.n_experts}"
        return f"{base} {self.variant}" if self.variant else base


def plan(d_in: int, width: int, k: int, experts, **cfg_kw) -> list[Run]:
    """The dense baseline of `width` latents, then the FLOP- and width-matched Switch SAEs."""
    runs = [Run("dense", SwitchSAEConfig(d_in=d_in, n_latents=width, n_experts=1, k=k, **cfg_kw))]
    for n in experts:
        runs.append(Run("flop-matched", SwitchSAEConfig(d_in=d_in, n_latents=n * width, n_experts=n,
                                                        k=k, **cfg_kw)))
    for n in experts:
        if width % n or width // n < k:
            raise ValueError(f"width-matched N={n}: width {width} must split into {n} experts of "
                             f">= k={k} latents")
        runs.append(Run("width-matched", SwitchSAEConfig(d_in=d_in, n_latents=width, n_experts=n,
                                                         k=k, **cfg_kw)))
    return runs


def load_data(layer: int, batch_size: int, seed: int, max_texts: int | None, progress: bool):
    """-> (training source, held-out source, held-out texts).  All texts: the trainer's cached
    sources (`switchsae.training.build_sources`); else the first `max_texts`, in memory."""
    from switchsae.data import ArraySource, default_texts, harvest
    from switchsae.training import DataSpec, build_sources

    texts = default_texts()[:max_texts]
    held = [t for i, t in enumerate(texts) if i % HOLDOUT_EVERY == HOLDOUT_EVERY - 1]
    if max_texts is None:
        train, held_out, _ = build_sources(DataSpec(layer=layer, holdout_every=HOLDOUT_EVERY),
                                           batch_size, seed, progress)
        return train, held_out, held
    per_text = list(harvest(None, texts, layer, batch_size=1, progress=progress))  # one model load
    is_held = [i % HOLDOUT_EVERY == HOLDOUT_EVERY - 1 for i in range(len(texts))]
    train = np.concatenate([a for a, h in zip(per_text, is_held) if not h])
    held_acts = np.concatenate([a for a, h in zip(per_text, is_held) if h])
    return ArraySource(train, batch_size, seed), ArraySource(held_acts, len(held_acts), shuffle=False), held


def expert_decoders(sae) -> np.ndarray:
    """(groups, m, d) float64 decoder rows by expert, for the duplication metrics: the N routed
    experts, then the shared expert as one more when it has one (it must be m wide)."""
    params, cfg = sae.numpy_params(), sae.cfg
    W_dec = params["W_dec"].astype(np.float64)
    if not cfg.shared_latents:
        return W_dec
    if cfg.shared_latents != cfg.expert_width:
        raise ValueError(f"duplication needs the shared expert ({cfg.shared_latents} latents) as wide as "
                         f"a routed one ({cfg.expert_width})")
    return np.concatenate([W_dec, params["W_dec_shared"].astype(np.float64)[None]])


def measure(run: Run, sae, eval_source, fidelity_texts, layer: int, model) -> dict:
    """The table's numbers for a trained `sae` on the held-out data.  A shared expert counts
    as one more expert for duplication and in the dead / dense fractions; no fidelity
    (NaN) without `fidelity_texts`."""
    from switchsae.evaluation import splice_fidelity
    from switchsae.training import evaluate

    ev = evaluate(sae, eval_source)
    W_dec = expert_decoders(sae)
    fid = splice_fidelity(sae, fidelity_texts, layer, model) if len(fidelity_texts) else None
    cfg = run.cfg
    return {
        "name": run.name, "family": run.family, "variant": run.variant, "n_experts": cfg.n_experts,
        "n_latents": cfg.n_latents, "expert_width": cfg.expert_width, "k": cfg.k,
        "experts_per_token": cfg.experts_per_token, "shared_latents": cfg.shared_latents,
        "shared_k": cfg.shared_k, "total_latents": cfg.total_latents,
        "fvu": ev.fvu, "l0": ev.l0, "dead_fraction": ev.dead_fraction,
        "dense_fraction": float(metrics.dense_fraction(ev.firing_frequency, xnp)),
        "duplication": float(metrics.duplication_fraction(W_dec, xnp)),
        "duplication_any": float(metrics.duplication_fraction(W_dec, xnp, across_experts=False)),
        "flops_forward": forward_flops(cfg)["total"], "flops_train": train_flops(cfg)["total"],
        "load_entropy": ev.load_entropy, "max_entropy": math.log(cfg.n_experts),
        "expert_load": ev.expert_load, "fidelity": fid.fraction_recovered if fid else float("nan"),
        "fidelity_detail": fid.summary() if fid else None, "eval_tokens": ev.tokens,
    }


def table(rows: list[dict]) -> str:
    """Markdown table of the results."""
    head = ("| run | N | M | m | FVU | L0 | dead | dense | dup (other expert) | dup (any) "
            "| FLOPs/token fwd | FLOPs/token train | load entropy / log N | fidelity |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        entropy = "-" if r["n_experts"] == 1 else f"{r['load_entropy'] / r['max_entropy']:.3f}"
        lines.append(
            f"| {r['name']} | {r['n_experts']} | {r['n_latents']} | {r['expert_width']} | {r['fvu']:.4f} "
            f"| {r['l0']:.1f} | {r['dead_fraction']:.3f} | {r['dense_fraction']:.3f} "
            f"| {r['duplication']:.3f} | {r['duplication_any']:.3f} | {r['flops_forward']:,} "
            f"| {r['flops_train']:,} | {entropy} | {r['fidelity']:.3f} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], out: Path) -> list[Path]:
    """The four figures; returns their paths."""
    plt = pyplot()

    styles = {"dense": ("k", "s"), "flop-matched": ("tab:blue", "o"), "width-matched": ("tab:orange", "^")}
    paths = []
    for x_key, x_label, fname in [("flops_forward", "forward FLOPs per token", "fvu_vs_flops.png"),
                                  ("n_latents", "total latents M", "fvu_vs_width.png")]:
        fig, ax = plt.subplots(figsize=(5.5, 4))
        for fam in FAMILIES:
            sel = [r for r in rows if r["family"] == fam]
            color, marker = styles[fam]
            ax.plot([r[x_key] for r in sel], [r["fvu"] for r in sel], marker=marker, color=color,
                    label=fam, linestyle="-" if len(sel) > 1 else "none")
            for r in sel:
                ax.annotate(f"N={r['n_experts']}", (r[x_key], r["fvu"]), textcoords="offset points",
                            xytext=(4, 4), fontsize=7)
        ax.set_xscale("log")
        ax.set(xlabel=x_label, ylabel="FVU (held-out)", title=f"FVU vs {x_label}")
        ax.legend()
        paths.append(save_png(fig, out / fname))

    switch = [r for r in rows if r["n_experts"] > 1]
    ns = sorted({r["n_experts"] for r in switch})
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for i, fam in enumerate(("flop-matched", "width-matched")):
        vals = {r["n_experts"]: r["duplication"] for r in switch if r["family"] == fam}
        ax.bar(np.arange(len(ns)) + (i - 0.5) * 0.4, [vals.get(n, 0.0) for n in ns], 0.4,
               label=fam, color=styles[fam][0])
    dense_any = [r["duplication_any"] for r in rows if r["family"] == "dense"]
    if dense_any:
        ax.axhline(dense_any[0], color="k", linestyle="--", label="dense: any other latent")
    ax.set_xticks(np.arange(len(ns)), [f"N={n}" for n in ns])
    ax.set(ylabel="fraction of latents", title="latents duplicated in another expert (cos > 0.9)")
    ax.set_ylim(bottom=0)
    ax.legend()
    paths.append(save_png(fig, out / "duplication.png"))

    fig, axes = plt.subplots(1, len(switch), figsize=(2.6 * len(switch), 2.8), squeeze=False)
    for ax, r in zip(axes[0], switch):
        load = np.sort(np.asarray(r["expert_load"]))[::-1]
        ax.bar(np.arange(len(load)), load, color=styles[r["family"]][0])
        ax.axhline(1 / len(load), color="k", linestyle="--", linewidth=0.8)
        ax.set_title(f"{r['family']}\nN={r['n_experts']}", fontsize=8)
        ax.set_xticks([])
    axes[0][0].set_ylabel("fraction of tokens (sorted)")
    paths.append(save_png(fig, out / "expert_load.png"))
    return paths


def add_common_args(p: argparse.ArgumentParser, full: dict, quick: dict, out: str,
                    width_help: str = "dense width") -> None:
    """The options every experiment here shares (budget, data, backend, output)."""
    p.add_argument("--out", default=out, help=f"output directory (default {out})")
    p.add_argument("--quick", action="store_true", help="tiny models and data: a smoke test")
    p.add_argument("--backend", help="numpy, torch, jax or mlx (default: torch if installed)")
    p.add_argument("--width", type=int, help=f"{width_help} (default {full['width']}, quick {quick['width']})")
    p.add_argument("--k", type=int, help=f"active latents (default {full['k']}, quick {quick['k']})")
    p.add_argument("--steps", type=int, help=f"updates per run (default {full['steps']}, quick {quick['steps']})")
    p.add_argument("--batch-size", type=int, help=f"tokens per update (default {full['batch_size']})")
    p.add_argument("--max-texts", type=int, help=f"use only the first texts (default all; quick {quick['max_texts']})")
    p.add_argument("--fidelity-texts", type=int, help=f"held-out texts for the fidelity splice, 0 = skip it "
                                                      f"(default {full['fidelity_texts']})")
    p.add_argument("--layer", type=int, default=3, help="MiniLM hidden-state index (default 3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")


def budget_from(args, full: dict, quick: dict) -> dict:
    """FULL or QUICK, overridden by the options given."""
    budget = dict(quick if args.quick else full)
    budget.update({key: getattr(args, key) for key in budget if getattr(args, key, None) is not None})
    return budget


@dataclass
class Setup:
    """What every run of an experiment shares: backend, data, schedule, the MiniLM model."""

    backend: object
    train_src: object
    eval_src: object
    held: list
    tc: object
    model: object
    progress: bool


def prepare(args, budget: dict) -> Setup:
    """Load the data (`load_data`) and the model; the shared `TrainConfig` (the `switchsae
    train` defaults for lr and warm-up)."""
    from switchsae import get_backend
    from switchsae.cli import DEFAULTS, default_backend
    from switchsae.evaluation import load_model
    from switchsae.training import TrainConfig

    backend = get_backend(args.backend or default_backend())
    progress = not args.no_progress
    train_src, eval_src, held = load_data(args.layer, budget["batch_size"], args.seed,
                                          budget["max_texts"], progress)
    tc = TrainConfig(steps=budget["steps"], batch_size=budget["batch_size"], lr=DEFAULTS["lr"],
                     warmup_steps=min(DEFAULTS["warmup"], budget["steps"] // 2), seed=args.seed,
                     log_every=max(1, budget["steps"] // 10))
    return Setup(backend, train_src, eval_src, held, tc, load_model() if budget["fidelity_texts"] else None,
                 progress)


def cfg_defaults() -> dict:
    """Config fields every run takes from the `switchsae train` defaults."""
    from switchsae.cli import DEFAULTS

    return {"auxk_coef": DEFAULTS["auxk_coef"], "dead_tokens": DEFAULTS["dead_tokens"]}


def train_all(runs: list[Run], setup: Setup, budget: dict, args, checkpoints: Path | None = None):
    """Train and `measure` every run in order; with `checkpoints`, save each trained SAE to
    checkpoints/<row["checkpoint"]>.  -> (rows, meta)."""
    from switchsae.checkpoint import save
    from switchsae.training import Trainer

    rows, started = [], time.perf_counter()
    print(f"{len(runs)} runs on {setup.backend.name}: {budget}; {setup.train_src.n_rows} training tokens, "
          f"{setup.eval_src.n_rows} held-out", flush=True)
    for i, run in enumerate(runs):
        t0 = time.perf_counter()
        result = Trainer(run.cfg, setup.tc, setup.train_src, setup.backend, progress=setup.progress).run()
        row = measure(run, result.sae, setup.eval_src, setup.held[:budget["fidelity_texts"]], args.layer,
                      setup.model)
        row["train_seconds"] = round(time.perf_counter() - t0, 1)
        if checkpoints is not None:
            row["checkpoint"] = f"{i:02d}_" + "".join(c if c.isalnum() else "_" for c in run.name)
            save(result.sae, checkpoints / row["checkpoint"])
        rows.append(row)
        print(f"{run.name:>20}: FVU {row['fvu']:.4f}  dup {row['duplication']:.3f}  "
              f"fidelity {row['fidelity']:.3f}  ({row['train_seconds']} s)", flush=True)
    meta = {"backend": setup.backend.name, "budget": budget, "layer": args.layer, "seed": args.seed,
            "train_config": setup.tc.to_dict(), "training_tokens": setup.train_src.n_rows,
            "held_out_tokens": setup.eval_src.n_rows, "seconds": round(time.perf_counter() - started, 1)}
    return rows, meta


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.paper", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    add_common_args(p, FULL, QUICK, "runs/paper", "dense width m = expert width when FLOP-matched")
    p.add_argument("--experts", type=int, nargs="+", help=f"Switch expert counts (default {FULL['experts']})")
    args = p.parse_args(argv)
    budget = budget_from(args, FULL, QUICK)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    setup = prepare(args, budget)
    try:
        runs = plan(setup.train_src.d_in, budget["width"], budget["k"], budget["experts"], **cfg_defaults())
    except ValueError as e:
        p.error(str(e))
    rows, meta = train_all(runs, setup, budget, args)
    atomic_write_json(out / "results.json", {"meta": meta, "runs": rows}, indent=1)
    md = (f"# Switch SAE vs dense TopK on MiniLM-L6 layer {args.layer}\n\n"
          f"{budget['steps']} steps x {budget['batch_size']} tokens, k = {budget['k']}, dense width "
          f"{budget['width']}, backend {meta['backend']}; metrics on {meta['held_out_tokens']} held-out tokens, "
          f"fidelity on {min(len(setup.held), budget['fidelity_texts'])} held-out texts.\n\n{table(rows)}\n{LEGEND}")
    atomic_write_bytes(out / "results.md", md.encode())
    plot(rows, out)
    print(md)
    print(f"wrote {out}/results.md, results.json and 4 plots in {meta['seconds']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
