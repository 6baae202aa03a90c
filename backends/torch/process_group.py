"""What the data- and expert-parallel torch backends share: the process group (torchrun's
environment: `init_from_env`, `shutdown`) and `DistributedMixin`, their part of the
`core.Backend` parallel contract.

Process groups: `init_from_env` reads torchrun's RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR /
MASTER_PORT and initialises NCCL for CUDA, gloo for CPU."""

from __future__ import annotations

import os
import time

import torch
import torch.distributed as dist
from switchsae.backends import BackendError
from switchsae.core import parallel
from switchsae.core.spec import ForwardOutput

from .backend import TorchBackend
from .collectives import Comm
from .device import ENV_VAR, select_device

_SHUTDOWN_PAUSE_S = 0.1  # see `shutdown`


class DistributedError(BackendError, RuntimeError):
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


class DistributedMixin:
    """The `core.Backend` parallel contract on a torch.distributed group: rank and world size,
    global sums, the full-batch views the trainer logs, the barrier.  Every process ("rank")
    holds a slice of the global batch (batch / R rows, `batch_rows`).  Mixed into TorchBackend."""

    def _init_group(self, group, device) -> None:
        TorchBackend.__init__(self, default_device(device))
        self.comm = Comm(group)
        self.rank, self.world_size = self.comm.rank, self.comm.world

    def check_partition(self, cfg, batch_size: int) -> None:
        parallel.check_parallel(cfg, self.world_size, self.parallel)
        parallel.batch_rows(batch_size, self.world_size, self.rank)

    def all_sum(self, a):
        return self.comm.all_sum(a)

    def local_backend(self) -> TorchBackend:
        return TorchBackend(self.device)

    def gather_outputs(self, out: ForwardOutput, x):
        """This rank's ForwardOutput and batch -> the full batch's (every rank gets them; the
        losses are already global).  For metrics: costs an all-gather of the outputs."""
        def gather(t):
            return self.comm.all_gather(t, "metrics")

        full = out._replace(x_hat=gather(out.x_hat), expert=gather(out.expert),
                            router_probs=gather(out.router_probs), top_values=gather(out.top_values),
                            top_indices=gather(out.top_indices))
        return full, gather(x)

    def barrier(self) -> None:
        self.comm.barrier()

    def shutdown(self, failed: bool = False) -> None:
        if not failed:
            shutdown()
        elif dist.is_initialized():  # no barrier: the other ranks may be gone
            dist.destroy_process_group()

    def _mean_losses(self, out: ForwardOutput) -> ForwardOutput:
        """Per-rank shares -> the full-batch losses (one all-reduce)."""
        names = list(out.losses)
        stacked = torch.stack([torch.as_tensor(out.losses[n]).detach() for n in names])
        mean = self.comm.all_sum(stacked, "losses") / self.world_size
        return out._replace(losses=dict(zip(names, mean.unbind())))

    def __repr__(self) -> str:
        return (f"<switchsae backend 'torch' {self.parallel} parallel, rank {self.rank} of "
                f"{self.world_size}, on {self.device}>")
