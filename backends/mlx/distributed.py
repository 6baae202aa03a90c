"""Data-parallel training with `mx.distributed` (launch with `mlx.launch -n P --backend ring`):
`parallel_backend("data")`, or `switchsae train --backend mlx --parallel data` under mlx.launch.

Every process holds the same parameters and optimiser state and trains on its slice of the
global batch (all slices the same size).  `core.spec.trace` gives each process its share of the
full-batch loss (global f_i and AuxK total variance, `core.parallel.BatchStatistics` over this
backend's `all_sum`); gradients are averaged with `mlx.nn.utils.average_gradients`, then the
shared `core.train_step` clips, steps and renormalises identically everywhere, so the weights
equal one process stepping on the whole batch, up to float rounding.  Dead-latent counters
count the firings of every process (`core.dead_latents`)."""

from __future__ import annotations

import mlx.core as mx
from mlx.nn.utils import average_gradients
from switchsae.backends import BackendError
from switchsae.core import parallel

from .backend import MLXBackend

_LAUNCHED = ("MLX_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK")  # set by mlx.launch / mpirun


def parallel_backend(mode: str, group=None) -> DataParallelBackend:
    """The data-parallel MLX backend on `group` (None: the processes of this `mlx.launch`)."""
    if mode != "data":
        raise BackendError(f"MLX trains data parallel only, not {mode!r}")
    if group is None:
        try:
            group = mx.distributed.init(strict=True)
        except RuntimeError as e:
            raise BackendError(f"mx.distributed found no process group ({e}): launch with mlx.launch "
                               "(e.g. mlx.launch -n 2 --backend ring -- python -m switchsae train "
                               "--backend mlx --parallel data ...)") from e
    return DataParallelBackend(group)


class DataParallelBackend(MLXBackend):
    """The MLX backend whose `loss_and_grads` returns full-batch losses and gradients from this
    process's slice x: (batch / P, d).  group: an `mx.distributed.Group` (default: the global one)."""

    parallel = "data"

    def __init__(self, group=None):
        self.group = group if group is not None else mx.distributed.init()
        self.rank, self.world_size = self.group.rank(), self.group.size()

    def check_partition(self, cfg, batch_size: int) -> None:
        parallel.check_parallel(cfg, self.world_size, self.parallel)
        parallel.batch_rows(batch_size, self.world_size, self.rank)

    def all_sum(self, a):
        return mx.distributed.all_sum(mx.stop_gradient(a), group=self.group)

    def local_backend(self) -> MLXBackend:
        return MLXBackend()

    def loss_and_grads(self, params, x, cfg, dead_mask=None, select_bias=None):
        out, grads = super().loss_and_grads(params, x, cfg, dead_mask, select_bias)
        losses = {name: self.all_sum(value) / self.world_size for name, value in out.losses.items()}
        return out._replace(losses=losses), average_gradients(grads, group=self.group)

    def gather_outputs(self, out, x):
        """This process's outputs and batch -> the whole batch's (an all-gather each)."""
        def gather(a):
            return mx.distributed.all_gather(a, group=self.group)

        return out._replace(x_hat=gather(out.x_hat), expert=gather(out.expert),
                            router_probs=gather(out.router_probs), top_values=gather(out.top_values),
                            top_indices=gather(out.top_indices)), gather(x)

    def barrier(self) -> None:
        mx.eval(self.all_sum(mx.array(0.0)))
