"""The selection bias: auxiliary-loss-free balancing of each expert's latents (DeepSeek-V3's
expert bias, applied per latent).

While training, the main TopK of a token's expert chooses by acts + bias wherever acts > 0
(`topk.biased_topk`); the kept values are the acts themselves, so the bias changes which latents
are kept, never a value or a gradient, and no loss term is added.  After each step a latent's
bias rises by `step_size` x its expert's mean smallest kept act (the scale of the TopK's
threshold) while its firing rate, an exponential average over steps (`RATE_BETA`) of the
fraction of its expert's tokens it fired on, is below `floor` x k / m (k / m: the rate of a
latent of a perfectly balanced expert), and falls as much otherwise, never below 0.  A latent
that under-fires is lifted over the threshold until it fires on its own, so wide Switch SAEs
keep their latents alive (README "Dead latents").  Over the last `fade` of the run the bias is
scaled linearly down to 0 at the last step (`scale`): the trained model, which is evaluated and
used without a bias, is the one the last steps trained.  Top-1 routing only."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .dead_latents import fire_counts
from .router import expert_counts

RATE_BETA = 0.9  # the firing rate's average: about the last 10 steps


class SelectionBias(NamedTuple):
    """bias: (N, m) >= 0; rate: (N, m) each latent's averaged firing rate over its expert's tokens."""

    bias: object
    rate: object


def init_state(cfg, backend) -> SelectionBias:
    """No bias; every rate at the balanced k / m."""
    shape = (cfg.n_experts, cfg.expert_width)
    return SelectionBias(backend.asarray(np.zeros(shape, np.float32)),
                         backend.asarray(np.full(shape, cfg.routed_k / cfg.expert_width, np.float32)))


def update(state: SelectionBias, out, cfg, backend, step_size: float, floor: float) -> SelectionBias:
    """The state after a step whose ForwardOutput is `out` (this process's tokens of a batch split
    over processes: the counts are summed, so every process gets the same state).  An expert that
    received no token keeps its latents' rates and biases."""
    xp = backend.xp
    n, m, k = cfg.n_experts, cfg.expert_width, cfg.routed_k
    f32 = state.bias.dtype
    values = xp.astype(out.top_values[:, :k], f32)  # the routed latents' kept values (gated)
    hits = fire_counts(xp.reshape(xp.zeros_like(state.rate), (-1,)), out.top_indices[:, :k], values, backend)
    tokens = backend.all_sum(expert_counts(out.expert[:, None], n, f32, xp))
    seen = (tokens > 0)[:, None]
    per_token = xp.maximum(tokens, xp.ones_like(tokens))
    rate = xp.where(seen, RATE_BETA * state.rate + (1 - RATE_BETA) * (xp.reshape(hits, (n, m)) / per_token[:, None]),
                    state.rate)
    gate = xp.ones_like(values[:, 0]) if cfg.router_scale == "hard" else \
        xp.astype(xp.take_along_axis(out.router_probs, out.expert[:, None], axis=-1)[:, 0], f32)
    smallest = xp.min(values, axis=-1) / gate  # (T,) each token's smallest kept act
    threshold = backend.all_sum(backend.scatter_add(xp.zeros_like(tokens), out.expert, smallest)) / per_token
    push = xp.where(rate < floor * k / m, xp.ones_like(rate), -xp.ones_like(rate)) * (step_size * threshold)[:, None]
    bias = xp.where(seen, xp.maximum(state.bias + push, xp.zeros_like(rate)), state.bias)
    return SelectionBias(bias, rate)


def scale(step: int, steps: int, fade: float) -> float:
    """The factor on the bias for step `step` (0-based) of `steps`: 1, then over the last `fade`
    of the run linearly down to 0 at the last step."""
    start = steps - fade * steps
    if step < start:
        return 1.0
    return max(0.0, (steps - step - 1) / max(steps - start, 1.0))
