"""Switch SAE variants against dense TopK at matched width and matched FLOPs (issue 10).

On the MiniLM-L6 activations of `experiments.paper` (same data, schedule, metrics and
training code), trains with one k, token budget and seed:

    dense        a TopK SAE of `width` latents (N = 1)
    switch       the paper's Switch SAE: N experts of m latents, one expert per token
    shared       + an always-on shared expert of m latents (as wide as a routed one) that
                 keeps shared_k of the k latents (default k/4); the routed experts keep k - shared_k
    e=E          each token routed to its top-E experts (default 2), one TopK over their E*m
                 probability-weighted pre-activations
    shared+e=E   both

each Switch variant twice, with N experts (default 8):

    width-matched  the same total latent count as dense, the shared expert's included:
                   m = width / N, or width / (N + 1) with a shared expert
    flop-matched   m chosen so the FLOPs per token (`switchsae.core.flops`, the training step
                   by default, --match forward for inference) come as close to dense's as an
                   integer m allows; the table gives each run's difference

Measured on the held-out texts as in `experiments.paper.measure`: FVU, L0, dead and dense
fractions (the shared expert's latents included), duplication (latents with a decoder row at
cosine > 0.9 in another expert, the shared expert counting as one more), FLOPs per token,
expert-load entropy and splice fidelity.  "gap closed" (width-matched runs) is
(FVU of width-matched switch - FVU) / (FVU of width-matched switch - FVU of dense): 1 = as
good as dense TopK, 0 = no better than the plain Switch SAE.

Writes results.md, results.json and fvu_vs_flops.png into --out and every trained SAE to
--out/checkpoints (`switchsae.load`-able).

    python -m experiments.variants --out runs/variants            # the default budget
    python -m experiments.variants --quick --out /tmp/variants    # smoke test, tiny models
"""

from __future__ import annotations

import math
from pathlib import Path

from switchsae.core.config import ConfigError, SwitchSAEConfig
from switchsae.core.flops import forward_flops, train_flops
from switchsae.files import atomic_write_bytes, atomic_write_json
from switchsae.plots import pyplot, save_png

from .paper import (
    Run,
    add_common_args,
    budget_from,
    experiment_parser,
    prepare,
    train_all,
)

# width 720 splits into 8 experts of 90 and, with a shared one, 9 of 80; at N = 8 and k = 16
# every flop-matched variant then matches dense's training FLOPs exactly.
FULL = {"width": 720, "k": 16, "experts": 8, "top_e": 2, "shared_k": None, "steps": 250,
        "batch_size": 1024, "max_texts": None, "fidelity_texts": 64}
QUICK = {"width": 72, "k": 4, "experts": 8, "top_e": 2, "shared_k": None, "steps": 25, "batch_size": 256,
         "max_texts": 100, "fidelity_texts": 8}
FAMILIES = ("dense", "width-matched", "flop-matched")
MATCH = {"train": train_flops, "forward": forward_flops}


def variant_options(top_e: int, shared_k: int) -> list[tuple[str, dict]]:
    """(label, config fields) of the Switch variants, in table order."""
    return [("switch", {}),
            ("shared", {"shared_k": shared_k}),
            (f"e={top_e}", {"experts_per_token": top_e}),
            (f"shared+e={top_e}", {"shared_k": shared_k, "experts_per_token": top_e})]


def _variant_cfg(d_in: int, n: int, m: int, k: int, fields: dict, cfg_kw: dict) -> SwitchSAEConfig:
    shared = {"shared_latents": m} if fields.get("shared_k") else {}
    return SwitchSAEConfig(d_in=d_in, n_latents=n * m, n_experts=n, k=k, **fields, **shared, **cfg_kw)


def flop_matched_width(d_in: int, n: int, k: int, fields: dict, target: int, count, cfg_kw: dict) -> int:
    """The expert width m whose FLOPs per token (`count`: train_flops or forward_flops) are
    closest to `target` (the smaller m on a tie), among valid configs."""
    best = None
    for m in range(1, target // (2 * d_in) + 2):  # the encoder alone costs >= 2 d m
        try:
            cfg = _variant_cfg(d_in, n, m, k, fields, cfg_kw)
        except ConfigError:
            continue
        gap = abs(count(cfg)["total"] - target)
        if best is None or gap < best[0]:
            best = (gap, m)
    if best is None:
        raise ValueError(f"no valid expert width for {fields or 'switch'} at N={n}, k={k}")
    return best[1]


def plan(d_in: int, width: int, k: int, n: int, top_e: int, shared_k: int | None = None,
         match: str = "train", **cfg_kw) -> list[Run]:
    """Dense TopK of `width` latents, then every variant width-matched, then flop-matched."""
    shared_k = max(1, k // 4) if shared_k is None else shared_k
    if not 1 <= shared_k < k:
        raise ValueError(f"shared_k must be in 1..k-1 = {k - 1}, got {shared_k}")
    if not 2 <= top_e <= n:
        raise ValueError(f"experts per token must be in 2..N = {n}, got {top_e}")
    dense = SwitchSAEConfig(d_in=d_in, n_latents=width, n_experts=1, k=k, **cfg_kw)
    runs = [Run("dense", dense)]
    options = variant_options(top_e, shared_k)
    for label, fields in options:
        groups = n + 1 if "shared_k" in fields else n
        if width % groups:
            raise ValueError(f"width-matched {label}: width {width} must split into {groups} experts "
                             f"({n} routed{' + 1 shared' if groups > n else ''})")
        try:
            runs.append(Run("width-matched", _variant_cfg(d_in, n, width // groups, k, fields, cfg_kw), label))
        except ConfigError as e:
            raise ValueError(f"width-matched {label}: {e}") from None
    target = MATCH[match](dense)["total"]
    for label, fields in options:
        m = flop_matched_width(d_in, n, k, fields, target, MATCH[match], cfg_kw)
        runs.append(Run("flop-matched", _variant_cfg(d_in, n, m, k, fields, cfg_kw), label))
    return runs


def gap_closed(rows: list[dict]) -> dict[str, float]:
    """name -> fraction of the width-matched switch-to-dense FVU gap closed, for every
    width-matched row (NaN when there is no gap)."""
    dense = next(r["fvu"] for r in rows if r["family"] == "dense")
    switch = next(r["fvu"] for r in rows if r["family"] == "width-matched" and r["variant"] == "switch")
    gap = switch - dense
    return {r["name"]: (switch - r["fvu"]) / gap if gap else math.nan
            for r in rows if r["family"] == "width-matched"}


def _delta(value: int, ref: int) -> str:
    return f"{value:,} ({100 * (value - ref) / ref:+.1f}%)"


def table(rows: list[dict]) -> str:
    """Markdown table; FLOPs with their difference from dense's."""
    dense = next(r for r in rows if r["family"] == "dense")
    closed = gap_closed(rows)
    head = ("| run | N | e | m | shared m_s / k_s | total latents | FVU | gap closed | L0 | dead | dense "
            "| dup (other expert) | FLOPs/token fwd | FLOPs/token train | load entropy / log N | fidelity |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        shared = f"{r['shared_latents']} / {r['shared_k']}" if r["shared_latents"] else "-"
        entropy = "-" if r["n_experts"] == 1 else f"{r['load_entropy'] / r['max_entropy']:.3f}"
        gap = f"{closed[r['name']]:.2f}" if r["name"] in closed else "-"
        lines.append(
            f"| {r['name']} | {r['n_experts']} | {r['experts_per_token']} | {r['expert_width']} | {shared} "
            f"| {r['total_latents']} | {r['fvu']:.4f} | {gap} | {r['l0']:.1f} | {r['dead_fraction']:.3f} "
            f"| {r['dense_fraction']:.3f} | {r['duplication']:.3f} "
            f"| {_delta(r['flops_forward'], dense['flops_forward'])} "
            f"| {_delta(r['flops_train'], dense['flops_train'])} | {entropy} | {r['fidelity']:.3f} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> Path:
    """FVU against training FLOPs per token, every run labelled; duplication beside it."""
    import numpy as np

    plt = pyplot()

    colors = {"dense": "k", "width-matched": "tab:orange", "flop-matched": "tab:blue"}
    labels = list(dict.fromkeys(r["variant"] for r in rows if r["family"] != "dense"))
    markers = dict(zip(labels, "o^sD"))
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.4), gridspec_kw={"width_ratios": [3, 2]})
    for r in rows:
        dense = r["family"] == "dense"
        ax.scatter(r["flops_train"], r["fvu"], color=colors[r["family"]], s=70 if dense else 40,
                   marker="*" if dense else markers[r["variant"]], zorder=3)
    fvus = [r["fvu"] for r in rows]
    for r, y in zip(rows, _spread([r["flops_train"] for r in rows], fvus,
                                  0.045 * (max(fvus) - min(fvus) or 1.0))):
        ax.annotate("dense" if r["family"] == "dense" else r["variant"], (r["flops_train"], r["fvu"]),
                    xytext=(r["flops_train"] * 1.06, y), fontsize=7, color=colors[r["family"]],
                    va="center", arrowprops={"arrowstyle": "-", "color": "0.6", "linewidth": 0.5})
    dense_row = next(r for r in rows if r["family"] == "dense")
    ax.axhline(dense_row["fvu"], color="k", linestyle=":", linewidth=0.8)
    ax.axvline(dense_row["flops_train"], color="k", linestyle=":", linewidth=0.8)
    handles = [plt.Line2D([], [], color=c, marker="*" if f == "dense" else "o", linestyle="none", label=f)
               for f, c in colors.items()]
    handles += [plt.Line2D([], [], color="grey", marker=mk, linestyle="none", label=lab)
                for lab, mk in markers.items()]
    ax.legend(handles=handles, fontsize=7)
    ax.set_xscale("log")
    ax.set(xlabel="training FLOPs per token", ylabel="FVU (held-out)",
           title="FVU vs FLOPs per token (dotted: dense TopK)")

    switch = [r for r in rows if r["family"] != "dense"]
    width = 0.4
    for i, fam in enumerate(("width-matched", "flop-matched")):
        vals = {r["variant"]: r["duplication"] for r in switch if r["family"] == fam}
        bx.bar(np.arange(len(labels)) + (i - 0.5) * width, [vals.get(v, 0.0) for v in labels], width,
               color=colors[fam], label=fam)
    bx.set_xticks(np.arange(len(labels)), labels, fontsize=8)
    bx.set(ylabel="fraction of latents", title="duplicated in another expert (cos > 0.9)")
    bx.set_ylim(bottom=0)
    bx.legend(fontsize=7)
    return save_png(fig, path)


def _spread(xs, ys, gap: float) -> list[float]:
    """Label heights: each point's y, pushed up to at least `gap` above the label below it among
    the points whose x is within a factor 1.3 (one cluster per x on a log axis)."""
    out = list(ys)
    order = sorted(range(len(ys)), key=lambda i: (ys[i], i))
    for n, i in enumerate(order):
        below = [out[j] for j in order[:n] if max(xs[i], xs[j]) < 1.3 * min(xs[i], xs[j])]
        if below:
            out[i] = max(ys[i], max(below) + gap)
    return out


def main(argv=None) -> int:
    p = experiment_parser("variants", __doc__)
    add_common_args(p, FULL, QUICK, "runs/variants", "dense width = total latents when width-matched")
    p.add_argument("--experts", type=int, help=f"routed experts N (default {FULL['experts']})")
    p.add_argument("--top-e", type=int, help=f"experts per token of the e variants (default {FULL['top_e']})")
    p.add_argument("--shared-k", type=int, help="latents kept by the shared expert (default k/4)")
    p.add_argument("--match", choices=sorted(MATCH), default="train",
                   help="FLOPs the flop-matched runs match: of a training step (default) or the forward pass")
    args = p.parse_args(argv)
    budget = budget_from(args, FULL, QUICK)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    setup = prepare(args, budget)
    try:
        runs = plan(setup.train_src.d_in, budget["width"], budget["k"], budget["experts"], budget["top_e"],
                    budget["shared_k"], args.match)
    except ValueError as e:
        p.error(str(e))
    rows, meta = train_all(runs, setup, budget, args, checkpoints=out / "checkpoints")
    meta["match"] = args.match
    atomic_write_json(out / "results.json", {"meta": meta, "runs": rows}, indent=1)
    dense = rows[0]
    key = f"flops_{args.match}"
    worst = max(abs(r[key] - dense[key]) / dense[key] for r in rows if r["family"] == "flop-matched")
    md = (f"# Switch SAE variants vs dense TopK on MiniLM-L6 layer {args.layer}\n\n"
          f"{budget['steps']} steps x {budget['batch_size']} tokens, k = {budget['k']} for every run, "
          f"dense width {budget['width']}, N = {budget['experts']} routed experts, seed {args.seed}, "
          f"backend {meta['backend']}; metrics on {meta['held_out_tokens']} held-out tokens, fidelity on "
          f"{min(len(setup.held), budget['fidelity_texts'])} held-out texts.  Width-matched: total "
          f"latents = {budget['width']}.  Flop-matched: {args.match} FLOPs/token within "
          f"{100 * worst:.2f}% of dense's.\n\n{table(rows)}\n{LEGEND}")
    atomic_write_bytes(out / "results.md", md.encode())
    plot(rows, out / "fvu_vs_flops.png")
    print(md)
    print(f"wrote {out}/results.md, results.json, fvu_vs_flops.png and {len(rows)} checkpoints "
          f"in {meta['seconds']} s")
    return 0


LEGEND = """N routed experts, e experts per token, m latents per expert; shared m_s / k_s: the shared
expert's width and the latents it keeps (of k).  total latents: N*m + m_s.  FVU on held-out
tokens; gap closed: share of the width-matched switch-to-dense FVU gap recovered (1 = dense).
dead: latents that never fired on the held-out tokens; dense: latents firing on > 10% of them.
dup (other expert): latents with a decoder row at cosine > 0.9 in another expert (the shared
expert is one more expert).  FLOPs/token: `switchsae.core.flops` (forward; training step with
sparse backward), in brackets the difference from dense TopK.  load entropy / log N: 1 =
perfectly balanced experts.  fidelity: fraction of the MiniLM sentence-embedding cosine
recovered with x_hat spliced in, against zero-ablating the layer.
"""


if __name__ == "__main__":
    raise SystemExit(main())
