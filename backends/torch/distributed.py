"""Data- and expert-parallel training with torch.distributed (launch with torchrun):
`parallel_backend(mode)` after `init_from_env()`.

Data parallel (`DataParallelBackend`): every rank holds the same parameters and optimiser state
and trains on its slice of the global batch; `core.spec.trace` gives each rank its share of the
full-batch loss (global f_i and AuxK total variance, `core.parallel.BatchStatistics` over this
backend's `all_sum`) and `loss_and_grads` all-reduces the gradients to their mean, so the shared
`core.train_step` (clip, project, Adam, renormalise; the fused in-place update of
`TorchBackend`) steps identically everywhere and the weights equal one process stepping on the
whole batch, up to float rounding.  The reported losses are the full-batch losses; dead-latent
counters count every rank's firings (`core.dead_latents`).

Expert parallel (`expert_parallel.ExpertParallelBackend`) splits the experts across ranks."""

from __future__ import annotations

import torch

from switchsae.core import parallel

from .backend import TorchBackend
from .expert_parallel import ExpertParallelBackend
from .process_group import DistributedError, DistributedMixin, init_from_env, shutdown

__all__ = ["DataParallelBackend", "DistributedError", "ExpertParallelBackend", "init_from_env",
           "parallel_backend", "shutdown"]


def parallel_backend(mode: str, group=None, device=None, **kwargs):
    """The torch backend for `mode` ("data" | "expert") on `group` (None: the default group,
    initialised from torchrun's environment by `init_from_env` unless it already is).  kwargs:
    ExpertParallelBackend's (exchange)."""
    if group is None:
        device = init_from_env(device)
    if mode == "data":
        return DataParallelBackend(group, device)
    if mode == "expert":
        return ExpertParallelBackend(group, device, **kwargs)
    raise DistributedError(f"parallel mode must be one of {parallel.PARALLEL_MODES}, got {mode!r}")


class DataParallelBackend(DistributedMixin, TorchBackend):
    """The torch backend whose `loss_and_grads` returns full-batch losses and gradients from this
    rank's slice x: (batch / R, d); every rank holds all parameters.  group: a torch.distributed
    group (None: the default one); device: as `process_group.default_device`."""

    parallel = "data"

    def __init__(self, group=None, device=None):
        self._init_group(group, device)

    def loss_and_grads(self, params, x, cfg, dead_mask=None, select_bias=None):
        out, grads = TorchBackend.loss_and_grads(self, params, x, cfg, dead_mask, select_bias)
        self.comm.all_sum_(list(grads.values()))
        torch._foreach_div_(list(grads.values()), float(self.world_size))
        return self._mean_losses(out), grads
