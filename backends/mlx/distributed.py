"""Data-parallel training with `mx.distributed` (launch with `mlx.launch -n P --backend ring`).

Every process holds the same parameters and optimiser state and a slice of the batch; all
slices must have the same size.  Gradients are averaged with `mlx.nn.utils.average_gradients`,
then the shared `core.train_step` clips, steps and renormalises identically everywhere.

Averaging per-process gradients reproduces the full-batch gradient for every term that is a mean
over tokens (MSE; P_i, the mean router probability).  Two batch statistics are not, so each
process's loss uses their global value, all-reduced (and detached: neither carries gradient):
  * f_i, the fraction of tokens routed to expert i, in lb = N sum_i f_i P_i;
  * the total variance of x, AuxK's denominator (combined from per-process means and variances).
With these the averaged gradients, the reported losses and hence the weights equal one process
stepping on the whole batch, up to float rounding.  Dead-latent counters stay in step by counting
the gathered firings of all processes (`update_tokens_since_fired`).
"""

from __future__ import annotations

import functools

import mlx.core as mx
from mlx.nn.utils import average_gradients
from switchsae.core import dead_latents
from switchsae.core import losses as L
from switchsae.core.spec import forward
from switchsae.core.train_step import train_step

from .backend import MLXBackend, outputs_and_grads


class DataParallelBackend(MLXBackend):
    """The MLX backend whose `loss_and_grads` returns full-batch losses and gradients from this
    process's slice x: (batch / P, d).  group: an `mx.distributed.Group` (default: the global one)."""

    def __init__(self, group=None):
        self.group = group if group is not None else mx.distributed.init()

    def loss_and_grads(self, params, x, cfg, dead_mask=None):
        world = self.group.size()
        auxk_factor = 1.0
        if dead_mask is not None and cfg.auxk_coef != 0:
            auxk_factor = world * L.total_variance(x, self.xp) / self._global_total_variance(x)

        def run(p):
            out = forward(p, x, cfg, self, dead_mask)
            return out._replace(losses=self._with_global_statistics(out, cfg, auxk_factor))

        out, grads = outputs_and_grads(run, params)
        losses = {name: self._all_sum(value) / world for name, value in out.losses.items()}
        return out._replace(losses=losses), average_gradients(grads, group=self.group)

    def _with_global_statistics(self, out, cfg, auxk_factor) -> dict:
        """This process's share of the full-batch loss: the spec's losses with the global f_i in
        lb, and AuxK rescaled by auxk_factor = P * local / global total variance (so the mean
        over processes is sum ||aux residual||^2 / global total variance)."""
        n, world, losses = cfg.n_experts, self.group.size(), out.losses
        f_local = L.expert_fractions(out.expert, n, out.router_probs.dtype, self.xp)
        f_global = self._all_sum(f_local) / world
        lb = losses["lb"] + n * mx.sum((f_global - f_local) * mx.mean(out.router_probs, axis=0))
        auxk = losses["auxk"] * auxk_factor
        total = (losses["total"] + cfg.lb_weight * (lb - losses["lb"])
                 + cfg.auxk_coef * (auxk - losses["auxk"]))
        return dict(losses, lb=lb, auxk=auxk, total=total)

    def _global_total_variance(self, x):
        """sum over all processes' tokens of ||x - global mean||^2, from local sums (Chan et al.'s
        pairwise combination, which avoids cancellation in sum ||x||^2 - B ||mean||^2)."""
        batch = x.shape[0]
        mean = self._all_sum(mx.sum(x, axis=0)) / (batch * self.group.size())
        local_mean = mx.mean(x, axis=0)
        spread = batch * mx.sum((local_mean - mean) ** 2)
        return self._all_sum(L.total_variance(x, self.xp) + spread)

    def _all_sum(self, a):
        return mx.distributed.all_sum(mx.stop_gradient(a), group=self.group)

    def update_tokens_since_fired(self, counter, top_indices, top_values):
        """`core.dead_latents.update_tokens_since_fired` over the firings of every process.
        counter: (M,); top_indices, top_values: (batch / P, k) -> (M,), equal on all processes."""
        gather = functools.partial(mx.distributed.all_gather, group=self.group)
        return dead_latents.update_tokens_since_fired(counter, gather(top_indices), gather(top_values), self)


def data_parallel_step(cfg, group=None, compile: bool = True, **train_kwargs):
    """-> (backend, step): step(params, opt_state, x_local, lr, dead_mask=None) is
    `core.train_step.train_step` on a `DataParallelBackend` (compiled with `mx.compile` unless
    compile=False); train_kwargs (max_grad_norm, betas) are passed to it."""
    backend = DataParallelBackend(group)
    step = functools.partial(train_step, backend, cfg, **train_kwargs)
    return backend, (backend.compile_step(step) if compile else step)
