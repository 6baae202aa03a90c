"""Data-parallel training with torch.distributed (launch with torchrun), and what data and expert
parallelism share (`DistributedMixin`, `init_from_env`, `parallel_backend`).

Every process ("rank") holds a slice of the global batch (batch / R rows, `local_batch`).  Data
parallel: every rank holds the same parameters and optimiser state; `loss_and_grads` returns
this rank's share of the full-batch loss (global f_i and AuxK total variance, `core.parallel`)
and the gradients all-reduced to their mean, so the shared `core.train_step` (clip, project,
Adam, renormalise; the fused in-place update of `TorchBackend`) steps identically everywhere and
the weights equal one process stepping on the whole batch, up to float rounding.  The reported
losses are the full-batch losses; dead-latent counters count every rank's firings.

Expert parallel (`expert_parallel.ExpertParallelBackend`) splits the experts across ranks.

Process groups: `init_from_env` reads torchrun's RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR /
MASTER_PORT and initialises NCCL for CUDA, gloo for CPU."""

from __future__ import annotations

import os
import time

import numpy as np
import torch
import torch.distributed as dist
from switchsae.core import parallel
from switchsae.core.spec import ForwardOutput, forward

from .backend import TorchBackend
from .collectives import Comm
from .device import ENV_VAR, select_device

_SHUTDOWN_PAUSE_S = 0.1  # see `shutdown`


class DistributedError(RuntimeError):
    """torch.distributed cannot be set up here (not launched by torchrun, unknown mode, ...)."""


def default_device(device=None) -> torch.device:
    """`device`, else $SWITCHSAE_DEVICE, else cuda:$LOCAL_RANK when CUDA is present, else CPU."""
    if device is not None or os.environ.get(ENV_VAR, "").strip() or not torch.cuda.is_available():
        return select_device(None if device is None else str(device))
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def init_from_env(device=None) -> torch.device:
    """Initialise the default process group from torchrun's environment (NCCL for a CUDA device,
    gloo otherwise) unless it already is; -> this rank's device."""
    device = default_device(device)
    if dist.is_initialized():
        return device
    missing = [v for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        raise DistributedError(f"torch.distributed needs {', '.join(missing)} in the environment: "
                               "launch with torchrun (e.g. torchrun --nproc-per-node 2 -m switchsae train ...)")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return device


def shutdown() -> None:
    """Leave torch.distributed cleanly: a barrier, `destroy_process_group`, then a short pause.

    The pause matters with gloo: a collective's worker thread frees its work (and, for a barrier,
    the works before it) after the caller's wait() has returned, and needs the GIL when those
    hold tensors whose Python objects are gone; if the interpreter is shutting down by then, the
    thread aborts the process ("terminate called without an active exception"; see pytorch/pytorch
    PR 179291).  A process that exits right after its last collective hit this in about 1 run in
    10 here; sleeping releases the GIL to those threads first."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
        time.sleep(_SHUTDOWN_PAUSE_S)


def parallel_backend(mode: str, group=None, device=None, **kwargs):
    """The torch backend for `mode` ("data" | "expert") on `group` (None: the default group, which
    must be initialised, e.g. by `init_from_env`).  kwargs: ExpertParallelBackend's (exchange)."""
    if mode == "data":
        return DataParallelBackend(group, device)
    if mode == "expert":
        from .expert_parallel import ExpertParallelBackend

        return ExpertParallelBackend(group, device, **kwargs)
    raise DistributedError(f"parallel mode must be one of {parallel.PARALLEL_MODES}, got {mode!r}")


class DistributedMixin:
    """What the data- and expert-parallel torch backends share: the group, batch slicing, the
    full-batch views the trainer logs, global dead-latent counters.  Mixed into TorchBackend.

    The trainer protocol (single-process backends have none of these): rank, world_size,
    parallel, local_batch, gather_outputs, update_tokens_since_fired, shard_params,
    gather_params, barrier."""

    parallel: str = ""

    def _init_group(self, group, device) -> None:
        TorchBackend.__init__(self, default_device(device))
        self.comm = Comm(group)
        self.rank, self.world_size = self.comm.rank, self.comm.world

    def local_batch(self, x: np.ndarray) -> np.ndarray:
        """A global batch (batch, d) -> this rank's rows (batch / R, d)."""
        return x[parallel.batch_rows(x.shape[0], self.world_size, self.rank)]

    def gather_outputs(self, out: ForwardOutput, x):
        """This rank's ForwardOutput and batch -> the full batch's (every rank gets them; the
        losses are already global).  For metrics: costs an all-gather of the outputs."""
        def gather(t):
            return self.comm.all_gather(t, "metrics")

        full = out._replace(x_hat=gather(out.x_hat), expert=gather(out.expert),
                            router_probs=gather(out.router_probs), top_values=gather(out.top_values),
                            top_indices=gather(out.top_indices))
        return full, gather(x)

    def update_tokens_since_fired(self, counter, top_indices, top_values):
        """`core.dead_latents.update_tokens_since_fired` over every rank's firings (an all-reduce
        of the (M,) hit counts).  -> (M,), equal on every rank."""
        return parallel.update_tokens_since_fired(counter, top_indices, top_values,
                                                  top_indices.shape[0] * self.world_size,
                                                  self._all_sum, self)

    def shard_params(self, arrays: dict) -> dict:
        """Whole parameters (or Adam moments) -> this rank's (data parallel: all of them)."""
        return arrays

    def gather_params(self, arrays: dict) -> dict | None:
        """This rank's parameters (or moments) -> the whole ones on rank 0 (data parallel: every
        rank has them).  A collective: every rank must call it."""
        return arrays

    def barrier(self) -> None:
        self.comm.barrier()

    def _all_sum(self, a):
        return self.comm.all_sum(a)

    def _mean_losses(self, losses: dict) -> dict:
        """Per-rank shares -> the full-batch losses (one all-reduce)."""
        names = list(losses)
        stacked = torch.stack([torch.as_tensor(losses[n]).detach() for n in names])
        mean = self.comm.all_sum(stacked, "losses") / self.world_size
        return dict(zip(names, mean.unbind()))

    def __repr__(self) -> str:
        return (f"<switchsae backend 'torch' {self.parallel} parallel, rank {self.rank} of "
                f"{self.world_size}, on {self.device}>")


def detached(out: ForwardOutput, losses: dict) -> ForwardOutput:
    """out with its tensors detached and `losses` in place of its own."""
    return ForwardOutput(out.x_hat.detach(), out.expert, out.router_probs.detach(),
                         out.top_values.detach(), out.top_indices, losses)


class DataParallelBackend(DistributedMixin, TorchBackend):
    """The torch backend whose `loss_and_grads` returns full-batch losses and gradients from this
    rank's slice x: (batch / R, d); every rank holds all parameters.  group: a torch.distributed
    group (None: the default one); device: as `default_device`."""

    parallel = "data"

    def __init__(self, group=None, device=None):
        self._init_group(group, device)

    def loss_and_grads(self, params, x, cfg, dead_mask=None):
        xp, world = self.xp, self.world_size
        factor = parallel.auxk_factor(x, cfg, dead_mask, self._all_sum, world, xp)
        names = list(params)
        leaves = {n: params[n].detach().requires_grad_(True) for n in names}
        with torch.enable_grad():
            out = forward(leaves, x, cfg, self, dead_mask)
            losses = parallel.with_global_statistics(out.losses, out.router_probs, out.expert, cfg,
                                                     self._all_sum, world, factor, xp)
            grads = list(torch.autograd.grad(losses["total"], [leaves[n] for n in names]))
        self.comm.all_sum_(grads)
        torch._foreach_div_(grads, float(world))
        return detached(out, self._mean_losses(losses)), dict(zip(names, grads))
