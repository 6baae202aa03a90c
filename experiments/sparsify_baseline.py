"""EleutherAI sparsify's dense TopK SAE on the activations and budget of `experiments.paper`.

The reference point for the library's dense TopK SAE: sparsify's `SparseCoder` (PyPI
`eai-sparsify`) of `width` latents and the same k, trained on the same MiniLM-L6 activations
(raw, as sparsify receives them), the same steps x batch, once per learning rate, by the loop
of sparsify's `Trainer` with `optimizer="adam"` and `loss_fn="fvu"`: `b_dec` at the mean of
the first batch, decoder rows renormalised before every step and the gradient parallel to them
removed, `torch.optim.Adam`, linear warm-up then linear decay to 0 over the run
(`transformers.get_linear_schedule_with_warmup`; warm-up 1% of the steps, as the library's,
since sparsify's 1000 would be the whole run), loss FVU + auxk_alpha * AuxK with sparsify's
defaults (auxk_alpha 0, dead after 10M tokens) unless given.  Each trained SAE is saved in
sparsify's format and loaded by `switchsae.load` (as a one-expert Switch SAE with an encoder
bias), then measured by the same `switchsae.training.evaluate` on the held-out tokens.

Writes results.md and results.json into --out.

    python -m experiments.sparsify_baseline --corpus python-docs --lrs 2e-3 4e-3 8e-3 --out runs/sparsify
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from switchsae.files import atomic_write_bytes, atomic_write_json

from .paper import FULL, QUICK, add_common_args, budget_from, experiment_parser, load_data


def train_sparsify(train_src, d_in: int, width: int, k: int, steps: int, lr: float, seed: int,
                   auxk_alpha: float = 0.0, dead_tokens: int = 10_000_000):
    """A sparsify `SparseCoder` trained on `steps` batches of `train_src` (see the module doc).
    Without a GPU, sparsify's own eager decoder (its Triton kernel needs a GPU driver)."""
    import os

    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")
    from sparsify import SparseCoder, SparseCoderConfig
    from transformers import get_linear_schedule_with_warmup

    torch.manual_seed(seed)
    sae = SparseCoder(d_in, SparseCoderConfig(num_latents=width, k=k), "cpu", dtype=torch.float32)
    opt = torch.optim.Adam(sae.parameters(), lr=lr)
    schedule = get_linear_schedule_with_warmup(opt, round(0.01 * steps), steps)
    since_fired = torch.zeros(width, dtype=torch.long)
    for step in range(steps):
        x = torch.from_numpy(train_src.next_batch()).float()
        if step == 0:
            sae.b_dec.data = x.mean(0)
        sae.set_decoder_norm_to_unit_norm()
        dead = since_fired > dead_tokens if auxk_alpha > 0 else None
        out = sae(x, dead_mask=dead)
        (out.fvu + auxk_alpha * out.auxk_loss).backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
        schedule.step()
        fired = torch.zeros(width, dtype=torch.bool)
        fired[out.latent_indices.flatten()] = True
        since_fired += x.shape[0]
        since_fired[fired] = 0
    sae.set_decoder_norm_to_unit_norm()
    return sae


def main(argv=None) -> int:
    p = experiment_parser("sparsify_baseline", __doc__)
    add_common_args(p, FULL, QUICK, "runs/sparsify", "latents of the dense TopK SAE")
    p.add_argument("--lrs", type=float, nargs="+", default=[2e-3, 4e-3, 8e-3], help="learning rates to train")
    p.add_argument("--auxk-alpha", type=float, default=0.0, help="sparsify's auxk_alpha (its default 0)")
    args = p.parse_args(argv)
    import switchsae
    from switchsae.training import evaluate

    budget = budget_from(args, FULL, QUICK)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for lr in args.lrs:
        train_src, eval_src, _ = load_data(args.layer, budget["batch_size"], args.seed, budget["max_texts"],
                                           not args.no_progress, args.corpus)
        t0 = time.perf_counter()
        sae = train_sparsify(train_src, train_src.d_in, budget["width"], budget["k"], budget["steps"], lr,
                             args.seed, args.auxk_alpha)
        seconds = time.perf_counter() - t0
        with tempfile.TemporaryDirectory() as tmp:
            sae.save_to_disk(tmp)
            ev = evaluate(switchsae.load(tmp, backend="torch"), eval_src)
        rows.append({"lr": lr, "fvu": ev.fvu, "l0": ev.l0, "dead_fraction": ev.dead_fraction,
                     "train_seconds": round(seconds, 1), "eval_tokens": ev.tokens})
        print(f"sparsify lr {lr:g}: FVU {ev.fvu:.4f}  dead {ev.dead_fraction:.3f}  ({seconds:.0f} s)", flush=True)
    meta = {"budget": budget, "corpus": args.corpus or "pydoc_data.topics", "layer": args.layer,
            "seed": args.seed, "auxk_alpha": args.auxk_alpha, "training_tokens": train_src.n_rows}
    atomic_write_json(out / "results.json", {"meta": meta, "runs": rows}, indent=1)
    best = min(rows, key=lambda r: r["fvu"])
    lines = ["| lr | FVU | L0 | dead (held-out) | train s |", "|---|---|---|---|---|"]
    lines += [f"| {r['lr']:g} | {r['fvu']:.4f} | {r['l0']:.1f} | {r['dead_fraction']:.3f} | {r['train_seconds']} |"
              for r in rows]
    md = (f"# sparsify dense TopK on MiniLM-L6 layer {args.layer} ({meta['corpus']})\n\n"
          f"{budget['steps']} steps x {budget['batch_size']} tokens, {budget['width']} latents, k = {budget['k']}, "
          f"seed {args.seed}, auxk_alpha {args.auxk_alpha:g}; FVU on {rows[0]['eval_tokens']:,} held-out tokens. "
          f"Best: lr {best['lr']:g}, FVU {best['fvu']:.4f}.\n\n" + "\n".join(lines) + "\n")
    atomic_write_bytes(out / "results.md", md.encode())
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
