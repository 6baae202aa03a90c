"""torch.distributed collectives for the parallel backends: differentiable all-gather,
reduce-scatter and all-to-all (each one's backward is the other's, as the gradient of the
sum over ranks of per-rank losses needs), detached sums and gathers, and a tally of the bytes
each rank receives from the others (`Comm.received`), by label.

Byte counts (received from other ranks, per rank): all-gather of c bytes per rank (R - 1) c;
reduce-scatter to c bytes per rank (R - 1) c (ring); all-to-all the rows arriving from other
ranks; all-reduce of c bytes 2 (R - 1) / R c (ring)."""

from __future__ import annotations

from collections import Counter

import torch
import torch.distributed as dist

from .optim import _memory_order

# torch >= 2.12 renamed the tensor-in tensor-out collectives (the old names warn)
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class Comm:
    """A process group with byte accounting.  group: a torch.distributed group (None: the
    default group, which must be initialised)."""

    def __init__(self, group=None):
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.received = Counter()

    def _count(self, label: str, nbytes: float) -> None:
        self.received[label] += int(nbytes)

    # -- no gradient --------------------------------------------------------------------------
    def all_sum(self, a: torch.Tensor, label: str = "stats") -> torch.Tensor:
        """Sum of `a` over the ranks (a detached copy; `a` is left alone)."""
        out = a.detach().clone().contiguous()
        dist.all_reduce(out, group=self.group)
        self._count(label, 2 * (self.world - 1) / self.world * _nbytes(out))
        return out

    def all_sum_(self, tensors: list, label: str = "grads") -> None:
        """Sum every tensor over the ranks, in place (dense tensors of any strides).  One blocking
        all-reduce each: gloo's threads released async works late enough to abort at exit."""
        for t in tensors:
            view = _memory_order(t)  # a contiguous view of a dense tensor (e.g. latent-major W_enc)
            if not view.is_contiguous():
                raise ValueError(f"cannot all-reduce a non-dense tensor of strides {t.stride()}")
            dist.all_reduce(view, group=self.group)
            self._count(label, 2 * (self.world - 1) / self.world * _nbytes(t))

    def all_gather(self, a: torch.Tensor, label: str = "gather") -> torch.Tensor:
        """(n, ...) on every rank -> (R * n, ...), rank order (detached)."""
        a = a.detach().contiguous()
        out = a.new_empty((self.world * a.shape[0], *a.shape[1:]))
        _all_gather_single(out, a, group=self.group)
        self._count(label, (self.world - 1) * _nbytes(a))
        return out

    def reduce_scatter(self, a: torch.Tensor, label: str = "scatter") -> torch.Tensor:
        """(R * n, ...) on every rank -> (n, ...): rank r gets the sum of every rank's r-th block."""
        a = a.detach().contiguous()
        out = a.new_empty((a.shape[0] // self.world, *a.shape[1:]))
        _reduce_scatter_single(out, a, group=self.group)
        self._count(label, (self.world - 1) * _nbytes(out))
        return out

    def all_to_all(self, a: torch.Tensor, out_splits: list, in_splits: list, label: str = "exchange"):
        """Rows a[sum(in_splits[:s]) : ...+in_splits[s]] go to rank s; the result holds the rows
        from rank 0, 1, ... (out_splits[q] from rank q) in that order (detached)."""
        a = a.detach().contiguous()
        out = a.new_empty((sum(out_splits), *a.shape[1:]))
        dist.all_to_all_single(out, a, out_splits, in_splits, group=self.group)
        self._count(label, (sum(out_splits) - out_splits[self.rank]) * a.element_size() * _row_numel(a))
        return out

    def gather_to(self, a: torch.Tensor, dst: int = 0):
        """(n, ...) on every rank -> (R * n, ...) on rank `dst`, None on the others."""
        a = a.detach().contiguous()
        pieces = [torch.empty_like(a) for _ in range(self.world)] if self.rank == dst else None
        dist.gather(a, pieces, dst=dst, group=self.group)
        if self.rank == dst:
            self._count("checkpoint", (self.world - 1) * _nbytes(a))
            return torch.cat(pieces)
        return None

    def barrier(self) -> None:
        dist.barrier(group=self.group)

    # -- with gradient ------------------------------------------------------------------------
    def all_gather_grad(self, a, label: str):
        """all_gather whose backward reduce-scatters the gradient (sum over ranks)."""
        return _Mirrored.apply(a, self, label, "all_gather", "reduce_scatter")

    def reduce_scatter_grad(self, a, label: str):
        """reduce_scatter whose backward all-gathers the gradient."""
        return _Mirrored.apply(a, self, label, "reduce_scatter", "all_gather")

    def all_to_all_grad(self, a, out_splits: list, in_splits: list, label: str):
        """all_to_all whose backward sends the gradient rows back the way they came."""
        return _AllToAll.apply(a, out_splits, in_splits, self, label)


class _Mirrored(torch.autograd.Function):
    """A collective whose backward is its mirror (all-gather <-> reduce-scatter), by name."""

    @staticmethod
    def forward(ctx, a, comm, label, op, mirror):
        ctx.comm, ctx.label, ctx.mirror = comm, label, mirror
        return getattr(comm, op)(a, label)

    @staticmethod
    def backward(ctx, grad):
        return getattr(ctx.comm, ctx.mirror)(grad, ctx.label + "_backward"), None, None, None, None


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, out_splits, in_splits, comm, label):
        ctx.comm, ctx.label, ctx.splits = comm, label, (out_splits, in_splits)
        return comm.all_to_all(a, out_splits, in_splits, label)

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        return ctx.comm.all_to_all(grad, in_splits, out_splits, ctx.label + "_backward"), None, None, None, None


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _row_numel(t: torch.Tensor) -> int:
    n = 1
    for s in t.shape[1:]:
        n *= s
    return n

