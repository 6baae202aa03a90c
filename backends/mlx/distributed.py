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
the firings of all processes (`update_tokens_since_fired`).
"""

from __future__ import annotations

import functools

import mlx.core as mx
from mlx.nn.utils import average_gradients
from switchsae.core import parallel
from switchsae.core.spec import forward
from switchsae.core.train_step import train_step

from .backend import MLXBackend, outputs_and_grads


class DataParallelBackend(MLXBackend):
    """The MLX backend whose `loss_and_grads` returns full-batch losses and gradients from this
    process's slice x: (batch / P, d).  group: an `mx.distributed.Group` (default: the global one).
    The global statistics are `core.parallel`'s, as for the torch data-parallel backend."""

    def __init__(self, group=None):
        self.group = group if group is not None else mx.distributed.init()

    def loss_and_grads(self, params, x, cfg, dead_mask=None):
        xp, world = self.xp, self.group.size()
        factor = parallel.auxk_factor(x, cfg, dead_mask, self._all_sum, world, xp)

        def run(p):
            out = forward(p, x, cfg, self, dead_mask)
            return out._replace(losses=parallel.with_global_statistics(
                out.losses, out.router_probs, out.expert, cfg, self._all_sum, world, factor, xp))

        out, grads = outputs_and_grads(run, params)
        losses = {name: self._all_sum(value) / world for name, value in out.losses.items()}
        return out._replace(losses=losses), average_gradients(grads, group=self.group)

    def _all_sum(self, a):
        return mx.distributed.all_sum(mx.stop_gradient(a), group=self.group)

    def update_tokens_since_fired(self, counter, top_indices, top_values):
        """`core.dead_latents.update_tokens_since_fired` over the firings of every process (an
        all-sum of the (M,) hit counts).  counter: (M,); top_indices, top_values: (batch / P, k)
        -> (M,), equal on all processes."""
        return parallel.update_tokens_since_fired(counter, top_indices, top_values,
                                                  top_indices.shape[0] * self.group.size(),
                                                  self._all_sum, self)


def data_parallel_step(cfg, group=None, compile: bool = True, **train_kwargs):
    """-> (backend, step): step(params, opt_state, x_local, lr, dead_mask=None) is
    `core.train_step.train_step` on a `DataParallelBackend` (compiled with `mx.compile` unless
    compile=False); train_kwargs (max_grad_norm, betas) are passed to it."""
    backend = DataParallelBackend(group)
    step = functools.partial(train_step, backend, cfg, **train_kwargs)
    return backend, (backend.compile_step(step) if compile else step)
