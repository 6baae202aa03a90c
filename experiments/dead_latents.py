"""Interventions against dead latents in wide Switch SAEs, each measured against the defaults.

Trains each given run like `experiments.recipe_search` (same data, defaults and JSON lines: held-out
FVU, the trainer's dead fraction at the end, latents that never fired on the held-out tokens, wall
time), with one intervention (torch backend only), chosen by the run's "intervention" key:

    none      the library's defaults (AuxK on the latents silent for the run's dead window, and
              the selection bias, `switchsae.core.selection_bias`; "tc_selection_bias": 0 turns
              it off, "tc_selection_bias_floor" / "tc_selection_bias_fade" set the rest)
    resample  every `every` steps up to the fraction `until` of the run, each dead latent is
              re-pointed at a badly reconstructed token of its own expert (Bricken et al.'s
              resampling, per expert): a token routed to the latent's expert is drawn with
              probability proportional to its squared error; the latent's decoder row becomes the
              unit direction of that token's residual x - x_hat, its encoder column the same
              direction at the mean encoder norm of the expert's live latents; its Adam moments
              and dead counter are reset
    orient    at initialisation each latent whose encoder column points away from the mean offset
              (from b_pre) of the first batch's tokens routed to its expert is negated (encoder
              column and decoder row), so that no latent starts on the far side of its expert's data
    balance   a Switch-style load-balancing loss over each expert's latents, pre-activations as
              routing logits ("SAEs are rank-1 MoE"): coef * d * sum_e (n_e / batch) * m * sum_i
              f_i P_i, f_i the fraction of the expert's kept entries at latent i, P_i its mean
              softmax probability; with "dead_only" its gradient reaches only the dead latents'
              encoder columns (the revival push without the live latents' distortion)

The selection bias began here as the "ghost" intervention (its rate, floor and fade are the
library's `TrainConfig.selection_bias`, `selection_bias_floor` and `selection_bias_fade`; its
"off" tail was dropped); its runs are in docs/results/ghost/.

    python -m experiments.dead_latents --corpus python-docs --max-texts 6000 --steps 1000 \\
        '{"n_latents": 12288, "n_experts": 16, "k": 16, "intervention": "balance", "coef": 1.0, "dead_only": true}'
        '{"n_latents": 12288, "n_experts": 16, "k": 16, "intervention": "none", "tc_selection_bias": 0}'

(runs and their figures: docs/results/ghost/)
"""

from __future__ import annotations

import json

import torch
from switchsae.core.dead_latents import dead_mask
from switchsae.training import Trainer

from .paper import experiment_parser
from .recipe_search import add_run_args, train_and_measure

INTERVENTIONS = ("none", "resample", "orient", "balance")
TRAINER_SETTINGS = ("every", "until")  # a run's keys read by its trainer


class ResamplingTrainer(Trainer):
    """`Trainer` that resamples dead latents every `every` steps while step <= until * steps."""

    every, until = 100, 0.6

    def _update(self, step_fn, x_np):
        x, lr, out = super()._update(step_fn, x_np)
        if self.step % self.every == 0 and self.step <= self.until * self.tc.steps:
            resample(self.params, self.opt_state, self.counter, dead_mask(self.counter, self.dead_tokens),
                     x, out, self.cfg, torch.Generator().manual_seed(self.tc.seed * 1_000_003 + self.step))
        return x, lr, out


@torch.no_grad()
def resample(params: dict, opt_state, counter, dead, x, out, cfg, generator) -> int:
    """Re-point the dead latents, in place (see the module notes).  params, opt_state: torch
    tensors (W_enc (N, d, m), W_dec (N, m, d)); counter, dead: (M,); x: (batch, d) the step's
    batch; out: its ForwardOutput.  -> the number of latents resampled."""
    n, m = cfg.n_experts, cfg.expert_width
    dead = dead.view(n, m)
    residual = x - out.x_hat
    weight = (residual * residual).sum(1)
    expert = out.expert if out.expert.ndim == 1 else out.expert[:, 0]
    done = 0
    for e in range(n):
        ids = torch.nonzero(dead[e]).flatten()
        tokens = torch.nonzero((expert == e) & (weight > 0)).flatten()
        if len(ids) == 0 or len(tokens) == 0:
            continue
        live = ~dead[e]
        norms = params["W_enc"][e].norm(dim=0)
        enc_norm = norms[live].mean() if live.any() else norms.mean()
        pick = tokens[torch.multinomial(weight[tokens], len(ids), replacement=True, generator=generator)]
        dirs = residual[pick] / residual[pick].norm(dim=1, keepdim=True)
        params["W_dec"][e, ids] = dirs
        params["W_enc"][e][:, ids] = (dirs * enc_norm).T
        if "b_enc" in params:
            params["b_enc"][e, ids] = 0
        for moments in (opt_state.m, opt_state.v):
            moments["W_dec"][e, ids] = 0
            moments["W_enc"][e][:, ids] = 0
            if "b_enc" in moments:
                moments["b_enc"][e, ids] = 0
        counter.view(n, m)[e, ids] = 0
        done += len(ids)
    return done


class OrientedTrainer(Trainer):
    """`Trainer` whose initial latents face their expert's data (`orient`)."""

    def _initialise(self, first_batch):
        scaled = super()._initialise(first_batch)
        orient(self.params, torch.as_tensor(scaled, dtype=self.params["b_pre"].dtype))
        return scaled


@torch.no_grad()
def orient(params: dict, x) -> int:
    """Negate, in place, each latent (W_enc column and W_dec row) whose encoder column has a
    negative dot product with its expert's routed tokens' mean offset from b_pre (the router's
    direction for an expert the batch does not reach).  x: (batch, d).  -> latents negated."""
    expert = ((x - params["b_router"]) @ params["W_router"].T).argmax(1)
    flipped = 0
    for e in range(params["W_enc"].shape[0]):
        rows = x[expert == e]
        offset = (rows.mean(0) if len(rows) else params["W_router"][e]) - params["b_pre"]
        sign = torch.where(offset @ params["W_enc"][e] < 0, -1.0, 1.0).to(x.dtype)
        params["W_enc"][e].mul_(sign[None, :])
        params["W_dec"][e].mul_(sign[:, None])
        flipped += int((sign < 0).sum())
    return flipped


def latent_balance_loss(params: dict, x, out, cfg):
    """coef-free latent balancing loss (see the module notes): sum_e (n_e / batch) * m * sum_i
    f_i P_i over the experts that received tokens (1 when every expert's use is uniform).
    params: torch tensors (W_enc may require grad); x: (batch, d); out: the step's
    ForwardOutput (its top_indices are global ids e * m + i) -> scalar."""
    m = cfg.expert_width
    centered = x - params["b_pre"]
    expert = out.expert
    loss = centered.new_zeros(())
    for e in range(cfg.n_experts):
        rows = torch.nonzero(expert == e).flatten()
        if len(rows) == 0:
            continue
        pre = centered[rows] @ params["W_enc"][e]
        if "b_enc" in params:
            pre = pre + params["b_enc"][e]
        share = torch.softmax(pre, dim=-1).mean(0)
        kept = out.top_values[rows] != 0
        counts = torch.bincount(out.top_indices[rows][kept] - e * m, minlength=m).to(share.dtype)
        loss = loss + (len(rows) / x.shape[0]) * m * (counts / max(int(kept.sum()), 1) * share).sum()
    return loss


def balancing_backend(backend, coef: float, dead_only: bool):
    """A copy of the torch `backend` whose `loss_and_grads` adds coef * d * latent_balance_loss's
    gradient (to W_enc and b_pre; with dead_only, to the dead latents' W_enc columns alone: none
    while no latent is dead)."""
    base = type(backend)

    class Balancing(base):
        def loss_and_grads(self, params, x, cfg, dead_mask=None, select_bias=None):
            out, grads = base.loss_and_grads(self, params, x, cfg, dead_mask, select_bias)
            if dead_only and dead_mask is None:
                return out, grads
            names = ["W_enc"] if dead_only else ["W_enc", "b_pre"]
            leaves = dict(params, **{n: params[n].detach().requires_grad_(True) for n in names})
            with torch.enable_grad():
                extra = torch.autograd.grad(coef * cfg.d_in * latent_balance_loss(leaves, x, out, cfg),
                                            [leaves[n] for n in names])
            extra = dict(zip(names, extra))
            if dead_only:
                n, m = cfg.n_experts, cfg.expert_width
                extra["W_enc"] = extra["W_enc"] * dead_mask.view(n, 1, m).to(extra["W_enc"].dtype)
            return out, dict(grads, **{name: grads[name] + g for name, g in extra.items()})

    return Balancing(backend.device)


def configured(bases: tuple, fields: dict) -> type:
    """A subclass of the trainers `bases` with the class settings (`TRAINER_SETTINGS`) they
    define taken from the run's `fields` (consumed) where given."""
    return type("Configured", bases, {name: fields.pop(name, getattr(cls, name)) for cls in bases
                                      for name in cls.__dict__ if name in TRAINER_SETTINGS})


def main(argv=None) -> int:
    p = experiment_parser("dead_latents", __doc__)
    add_run_args(p, backend=False)
    args = p.parse_args(argv)
    from switchsae import get_backend

    for spec in args.runs:
        fields = json.loads(spec)
        kind = fields.pop("intervention", "none")
        if kind not in INTERVENTIONS:
            p.error(f"intervention must be one of {INTERVENTIONS}, got {kind!r}")
        backend, trainer = get_backend("torch"), Trainer
        if kind == "resample":
            trainer = configured((ResamplingTrainer,), fields)
        elif kind == "orient":
            trainer = OrientedTrainer
        elif kind == "balance":
            backend = balancing_backend(backend, fields.pop("coef", 1.0), fields.pop("dead_only", False))
        print(json.dumps({"run": spec, **train_and_measure(fields, args, backend, trainer)}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
