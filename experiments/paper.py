"""The Switch SAE paper's comparisons at small scale, on MiniLM-L6 activations.

Trains a dense TopK SAE (N = 1, width m) and Switch SAEs with N experts (default 4, 8, 16, 32)
(a) at matched FLOPs: the same expert width m, so M = N * m and the same encoder cost per
token, and (b) at matched width: M = m total latents, so the encoder is N times cheaper.
Every run has the same k and token budget and the library's default losses, learning rate,
warm-up and dead-latent window (`SwitchSAEConfig`, `TrainConfig`: nothing tuned per run),
trained by `switchsae.training.Trainer` on MiniLM-L6 activations of Python's embedded docs or
of a larger corpus (`--corpus python-docs`, `switchsae.data.corpora`; every 20th text held
out), once per seed (`--seeds`), and measured on the held-out texts:

    FVU, L0, dead fraction (never fired on the held-out tokens), dense fraction (fires on
    > 10% of them), duplication (latents with a decoder row at cos > 0.9 in another expert),
    FLOPs per token (`switchsae.core.flops`), expert-load entropy, and downstream fidelity:
    the fraction of the MiniLM sentence-embedding cosine recovered when the reconstruction is
    spliced in (`switchsae.evaluation.splice_fidelity`, zero-ablation floor).

plus the trainer's own dead fraction at the end of training and the training wall time.
The table gives the mean over seeds with the standard deviation; the plots show the spread.
Writes results.md (the table), results.json and fvu_vs_flops.png, fvu_vs_width.png,
duplication.png, expert_load.png into --out.

    python -m experiments.paper --out runs/paper            # the default budget
    python -m experiments.paper --corpus python-docs --seeds 0 1 2 --out docs/results/paper
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
from switchsae.data.corpora import CORPORA
from switchsae.files import atomic_write_bytes, atomic_write_json
from switchsae.plots import pyplot, save_png

# 1M training tokens per run (at 200 steps every expert of N = 16 saw only ~13k tokens and its
# latents died; README "Evaluation and the paper's claims"); one seed takes ~15 minutes on a core
FULL = dict(width=768, k=16, experts=(4, 8, 16, 32), steps=1000, batch_size=1024, max_texts=None,
            fidelity_texts=32)
QUICK = dict(width=64, k=4, experts=(4, 8), steps=25, batch_size=256, max_texts=100,
             fidelity_texts=8)
HOLDOUT_EVERY = 20  # as switchsae.training.DataSpec: every 20th text is held out
FAMILIES = ("dense", "flop-matched", "width-matched")
LEGEND = """N experts, M total latents, m per expert.  FVU on held-out tokens (mean ± sd over seeds),
and over dense TopK's.  dead (held-out): latents that never fired on them; dead (trainer,
end): the trainer's own dead fraction at the last step (silent for the run's dead-latent
window); dense: latents firing on > 10% of the held-out tokens.  dup (other expert): latents with
a decoder row at cosine > 0.9 in another expert; dup (any): the same against every other
latent.  FLOPs/token: `switchsae.core.flops` (forward; training step with sparse backward).
load entropy / log N: 1 = perfectly balanced experts.  fidelity: fraction of the MiniLM
sentence-embedding cosine recovered with x_hat spliced in, against zero-ablating the layer.
train wall s: the training loop's wall time (mean over seeds), and over dense TopK's.
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


def corpus_file(corpus: str, max_texts: int | None = None) -> Path:
    """Corpus `corpus` (`switchsae.data.corpora`; its first `max_texts` documents) written as
    JSON lines into the activation cache's folder, for `DataSpec(text=...)` (whose cache is
    keyed by the texts)."""
    from switchsae.data import corpora
    from switchsae.training.data import cache_root

    path = cache_root() / "corpora" / (f"{corpus}.jsonl" if max_texts is None else f"{corpus}-{max_texts}.jsonl")
    corpora.write_jsonl(corpus, path, max_texts)
    return path


def load_data(layer: int, batch_size: int, seed: int, max_texts: int | None, progress: bool,
              corpus: str | None = None):
    """-> (training source, held-out source, held-out texts) of the first `max_texts` texts
    of the embedded docs or of `corpus`.  A corpus, or all of the embedded docs: the trainer's
    cached sources (`switchsae.training.build_sources`); else in memory."""
    from switchsae.data import ArraySource, corpora, default_texts, harvest
    from switchsae.training import DataSpec, build_sources

    texts = (corpora.texts(corpus) if corpus else default_texts())[:max_texts]
    held = [t for i, t in enumerate(texts) if i % HOLDOUT_EVERY == HOLDOUT_EVERY - 1]
    if corpus or max_texts is None:
        text = str(corpus_file(corpus, max_texts)) if corpus else None
        train, held_out, _ = build_sources(DataSpec(text=text, layer=layer, holdout_every=HOLDOUT_EVERY),
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


MEANS = ("fvu", "l0", "dead_fraction", "train_dead_fraction", "dense_fraction", "duplication",
         "duplication_any", "load_entropy", "fidelity", "train_wall_s")


def summarise(rows: list[dict]) -> list[dict]:
    """One row per run over its seeds (dense, then each family by N): the first seed's row with the
    means of `MEANS`, `fvu_sd` (standard deviation over seeds, 0 for one), `fvus` and `seeds`
    (per seed), `expert_load` averaged, and `fvu_vs_dense` / `wall_vs_dense`: the mean FVU and
    training wall time over the dense run's."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["name"], []).append(r)
    out = []
    for group in groups.values():
        row = dict(group[0])
        for key in MEANS:
            row[key] = float(np.mean([r[key] for r in group]))
        row["fvus"] = [r["fvu"] for r in group]
        row["seeds"] = [r["seed"] for r in group]
        row["fvu_sd"] = float(np.std(row["fvus"], ddof=1)) if len(group) > 1 else 0.0
        row["expert_load"] = np.mean([r["expert_load"] for r in group], axis=0).tolist()
        out.append(row)
    out.sort(key=lambda r: (FAMILIES.index(r["family"]) if r["family"] in FAMILIES else len(FAMILIES),
                            r["n_experts"]))
    dense = next((r for r in out if r["family"] == "dense"), None)
    for r in out:
        r["fvu_vs_dense"] = r["fvu"] / dense["fvu"] if dense else float("nan")
        r["wall_vs_dense"] = r["train_wall_s"] / dense["train_wall_s"] if dense else float("nan")
    return out


def table(rows: list[dict]) -> str:
    """Markdown table of `summarise`d results (one row per run, means over seeds)."""
    head = ("| run | N | M | m | FVU (mean ± sd) | FVU / dense | L0 | dead (held-out) | dead (trainer, end) "
            "| dense | dup (other expert) | dup (any) | FLOPs/token fwd | FLOPs/token train "
            "| load entropy / log N | fidelity | train wall s | wall / dense |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        entropy = "-" if r["n_experts"] == 1 else f"{r['load_entropy'] / r['max_entropy']:.3f}"
        lines.append(
            f"| {r['name']} | {r['n_experts']} | {r['n_latents']} | {r['expert_width']} "
            f"| {r['fvu']:.4f} ± {r['fvu_sd']:.4f} | {r['fvu_vs_dense']:.3f} | {r['l0']:.1f} "
            f"| {r['dead_fraction']:.3f} | {r['train_dead_fraction']:.3f} | {r['dense_fraction']:.3f} "
            f"| {r['duplication']:.3f} | {r['duplication_any']:.3f} | {r['flops_forward']:,} "
            f"| {r['flops_train']:,} | {entropy} | {r['fidelity']:.3f} | {r['train_wall_s']:.1f} "
            f"| {r['wall_vs_dense']:.2f} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], out: Path) -> list[Path]:
    """The four figures of `summarise`d rows (error bars: the sd over seeds; the last two only
    with Switch SAEs among them); their paths."""
    plt = pyplot()

    styles = {"dense": ("k", "s"), "flop-matched": ("tab:blue", "o"), "width-matched": ("tab:orange", "^")}
    paths = []
    for x_key, x_label, fname in [("flops_forward", "forward FLOPs per token", "fvu_vs_flops.png"),
                                  ("n_latents", "total latents M", "fvu_vs_width.png")]:
        fig, ax = plt.subplots(figsize=(5.5, 4))
        for fam in FAMILIES:
            sel = [r for r in rows if r["family"] == fam]
            color, marker = styles[fam]
            ax.errorbar([r[x_key] for r in sel], [r["fvu"] for r in sel], yerr=[r["fvu_sd"] for r in sel],
                        marker=marker, color=color, label=fam, linestyle="-" if len(sel) > 1 else "none",
                        capsize=3)
            for r in sel:
                ax.annotate(f"N={r['n_experts']}", (r[x_key], r["fvu"]), textcoords="offset points",
                            xytext=(4, 4), fontsize=7)
        ax.set_xscale("log")
        seeds = len(rows[0]["seeds"])
        ax.set(xlabel=x_label, ylabel="FVU (held-out)",
               title=f"FVU vs {x_label}" + (f" ({seeds} seeds, ± sd)" if seeds > 1 else ""))
        ax.legend()
        paths.append(save_png(fig, out / fname))

    switch = [r for r in rows if r["n_experts"] > 1]
    if not switch:  # dense alone so far (results are written after every run)
        return paths
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


def experiment_parser(name: str, doc: str) -> argparse.ArgumentParser:
    """`python -m experiments.<name>`'s parser: doc's first paragraph as its description, the rest
    as its epilog."""
    summary, rest = doc.split("\n\n", 1)
    return argparse.ArgumentParser(prog=f"python -m experiments.{name}", description=summary,
                                   formatter_class=argparse.RawDescriptionHelpFormatter, epilog=rest)


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
    p.add_argument("--corpus", choices=sorted(CORPORA), help="a larger corpus (`switchsae.data.corpora`; "
                   "default: Python's embedded docs)")
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


def prepare(args, budget: dict, seed: int | None = None) -> Setup:
    """Load the data (`load_data`, shuffled by `seed`, default `args.seed`) and the model; the
    shared `TrainConfig`: the budget and the seed, everything else the library's defaults."""
    from switchsae import get_backend
    from switchsae.cli import default_backend
    from switchsae.evaluation import load_model
    from switchsae.training import TrainConfig

    seed = args.seed if seed is None else seed
    backend = get_backend(args.backend or default_backend())
    progress = not args.no_progress
    train_src, eval_src, held = load_data(args.layer, budget["batch_size"], seed, budget["max_texts"],
                                          progress, getattr(args, "corpus", None))
    tc = TrainConfig(steps=budget["steps"], batch_size=budget["batch_size"], seed=seed,
                     log_every=max(1, budget["steps"] // 10))
    return Setup(backend, train_src, eval_src, held, tc, load_model() if budget["fidelity_texts"] else None,
                 progress)


def train_all(runs: list[Run], setup: Setup, budget: dict, args, checkpoints: Path | None = None,
              on_row=None):
    """Train and `measure` every run in order; with `checkpoints`, save each trained SAE to
    checkpoints/<row["checkpoint"]>; `on_row(rows so far, seconds so far)` after each run.
    -> (rows, meta)."""
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
        row["train_wall_s"] = round(result.wall_time, 2)  # the training loop alone
        row["seed"] = setup.tc.seed
        row["train_dead_fraction"] = result.history[-1]["dead_fraction"] if result.history else float("nan")
        if checkpoints is not None:
            row["checkpoint"] = f"{i:02d}_" + "".join(c if c.isalnum() else "_" for c in run.name)
            save(result.sae, checkpoints / row["checkpoint"])
        rows.append(row)
        if on_row is not None:
            on_row(rows, time.perf_counter() - started)
        print(f"{run.name:>20}: FVU {row['fvu']:.4f}  dup {row['duplication']:.3f}  "
              f"fidelity {row['fidelity']:.3f}  ({row['train_seconds']} s)", flush=True)
    meta = {"backend": setup.backend.name, "budget": budget, "layer": args.layer, "seed": setup.tc.seed,
            "train_config": setup.tc.to_dict(), "training_tokens": setup.train_src.n_rows,
            "held_out_tokens": setup.eval_src.n_rows, "seconds": round(time.perf_counter() - started, 1)}
    return rows, meta


def write_results(out: Path, rows: list[dict], meta: dict) -> str:
    """results.json (every run of every seed, and the summary), results.md and the plots of
    `rows` (from one process or merged, `--merge`); -> the markdown."""
    summary = summarise(rows)
    atomic_write_json(out / "results.json", {"meta": meta, "runs": rows, "summary": summary}, indent=1)
    b = meta["budget"]
    md = (f"# Switch SAE vs dense TopK on MiniLM-L6 layer {meta['layer']} ({meta['corpus']})\n\n"
          f"{b['steps']} steps x {b['batch_size']} tokens, k = {b['k']}, dense width {b['width']}, the "
          f"library's default settings, backend {meta['backend']}, seeds {meta['seeds']}; "
          f"{meta['training_tokens']:,} training tokens, metrics on {meta['held_out_tokens']:,} held-out tokens, "
          f"fidelity on {meta['fidelity_texts']} held-out texts; {meta['seconds'] / 60:.0f} minutes of "
          f"training and measuring in all.\n\n{table(summary)}\n{LEGEND}")
    atomic_write_bytes(out / "results.md", md.encode())
    plot(summary, out)
    return md


def merge(dirs: list[str], out: Path) -> str:
    """Combine the results.json of runs made in several processes (e.g. one per seed)."""
    import json

    parts = [json.loads((Path(d) / "results.json").read_text()) for d in dirs]
    metas = [part["meta"] for part in parts]
    for key in ("budget", "corpus", "layer", "training_tokens", "held_out_tokens"):
        if len({json.dumps(m[key]) for m in metas}) > 1:
            raise ValueError(f"{dirs} differ in {key}: {[m[key] for m in metas]}")
    meta = {**metas[0], "seeds": [s for m in metas for s in m["seeds"]],
            "seconds": sum(m["seconds"] for m in metas), "merged_from": list(dirs)}
    return write_results(out, [r for part in parts for r in part["runs"]], meta)


def main(argv=None) -> int:
    p = experiment_parser("paper", __doc__)
    add_common_args(p, FULL, QUICK, "runs/paper", "dense width m = expert width when FLOP-matched")
    p.add_argument("--experts", type=int, nargs="+", help=f"Switch expert counts (default {FULL['experts']})")
    p.add_argument("--seeds", type=int, nargs="+", help="train every run once per seed (initialisation and "
                                                        "data order; default: --seed alone)")
    p.add_argument("--merge", nargs="+", metavar="DIR", help="only combine the results of earlier runs of this "
                   "experiment (e.g. one process per seed) into --out")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.merge:
        try:
            print(merge(args.merge, out))
        except (OSError, ValueError, KeyError) as e:
            p.error(f"--merge: {e}")
        return 0
    budget = budget_from(args, FULL, QUICK)
    rows, seconds, seeds = [], 0.0, []
    for seed in args.seeds or [args.seed]:
        setup = prepare(args, budget, seed)
        try:
            runs = plan(setup.train_src.d_in, budget["width"], budget["k"], budget["experts"])
        except ValueError as e:
            p.error(str(e))
        seeds.append(seed)

        def written(seed_rows, done, setup=setup):  # after every run: a stopped experiment keeps what finished
            meta = {"backend": setup.backend.name, "budget": budget, "layer": args.layer, "seeds": list(seeds),
                    "corpus": args.corpus or "pydoc_data.topics", "train_config": setup.tc.to_dict(),
                    "training_tokens": setup.train_src.n_rows, "held_out_tokens": setup.eval_src.n_rows,
                    "fidelity_texts": min(len(setup.held), budget["fidelity_texts"]),
                    "seconds": round(seconds + done, 1)}
            write_results(out, rows + seed_rows, meta)

        seed_rows, seed_meta = train_all(runs, setup, budget, args, on_row=written)
        rows += seed_rows
        seconds += seed_meta["seconds"]
    print((out / "results.md").read_text())
    print(f"wrote {out}/results.md, results.json and 4 plots in {seconds:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
