"""Expert-parallel training with torch.distributed: the N experts split across the R ranks.

Rank r owns experts [r N / R, (r + 1) N / R): its W_enc, W_dec (and b_enc) are those rows
(`core.parallel.shard`).  The router, b_pre and any shared expert are replicated, their
gradients all-reduced.  Each rank holds its own batch / R tokens and, per step:

  1. routes them (replicated router): expert e_t, gate p_t[e_t], x_t - b_pre;
  2. dispatch: sends each token's (x_t - b_pre, gate) to the owner of e_t;
  3. the owner runs its experts on what it received: encode, ReLU, TopK of the gated
     pre-activations, sparse decode (and AuxK's dead-latent TopK and decode);
  4. combine: sends the reconstructions (and AuxK's, and the kept values and latent ids) back
     to the tokens' ranks, which finish x_hat and the losses exactly as the spec does.

Steps 2 and 4 are this backend's `dispatch` hook; `core.spec.trace` does the rest (the owner's
step 3 is the spec's `run_experts`, the losses its own, with `core.parallel.BatchStatistics`).

Two exchanges, the same numbers (exact, no token is dropped):
  * "all_gather": every rank gathers every token and expert id, computes the rows of its own
    experts, and a reduce-scatter sums the zero-padded outputs back (each token has exactly one
    owner, so the sum adds zeros).  Simple; moves (R - 1) * batch rows per rank each way.
  * "all_to_all" (default): tokens sorted by expert; the per-expert counts are exchanged
    (N ints), then `all_to_all_single` with those split sizes moves each row only to its owner
    and back: about (R - 1) / R * batch rows per rank, R times less (`core.parallel.exchange_bytes`).
    Dropless: the splits follow the routing, so there is no capacity factor and nothing is
    padded or dropped (an unbalanced router makes the busiest owner receive more); the split
    sizes are read on the host once per step.

Gradients flow through both exchanges (all-gather <-> reduce-scatter and all-to-all are each
other's backward).  Each rank differentiates its share L_r / R of the full-batch loss (global
f_i, P_i and AuxK total variance as in data parallel), so an owner's expert gradients are the
full-batch ones and the replicated gradients are all-reduced.  Gradient clipping uses the global
norm (expert shards' squared norms all-reduced).  Top-1 routing only."""

from __future__ import annotations

import torch
from switchsae.core import parallel
from switchsae.core.config import ConfigError
from switchsae.core.optim import CLIP_EPS
from switchsae.core.spec import Experts, forward

from .backend import TorchBackend
from .dispatch import route, sort_rows, unsort_rows
from .process_group import DistributedError, DistributedMixin
from .sparse import counts

EXCHANGES = ("all_to_all", "all_gather")
# the kept values travel bit for bit inside an integer tensor with the latent ids
_SAME_SIZE_INT = {torch.float32: torch.int32, torch.float64: torch.int64}


class ExpertParallelBackend(DistributedMixin, TorchBackend):
    """The torch backend for expert-sharded parameters (`shard_params`) and this rank's slice x:
    (batch / R, d).  exchange: "all_to_all" (default) or "all_gather"."""

    parallel = "expert"

    def __init__(self, group=None, device=None, exchange: str = "all_to_all"):
        if exchange not in EXCHANGES:
            raise DistributedError(f"exchange must be one of {EXCHANGES}, got {exchange!r}")
        self._init_group(group, device)
        self.exchange = exchange

    # -- parameters -------------------------------------------------------------------------
    def shard_params(self, arrays: dict) -> dict:
        """Whole parameters (or Adam moments; tensors or NumPy arrays) -> this rank's experts'
        rows (copies) and the replicated rest."""
        local = parallel.shard(arrays, _n_experts(arrays), self.world_size, self.rank)
        return {k: _copy(a) if k in parallel.EXPERT_SHARDED else a for k, a in local.items()}

    def gather_params(self, arrays: dict) -> dict | None:
        """This rank's parameters (or moments) -> the whole ones on rank 0, None on the others
        (one parameter at a time, so rank 0 holds at most one gathered tensor in flight)."""
        full = {}
        for name, a in arrays.items():
            if name in parallel.EXPERT_SHARDED:
                full[name] = self.comm.gather_to(a, 0)
            else:
                full[name] = a
        return full if self.rank == 0 else None

    # -- training ---------------------------------------------------------------------------
    def loss_and_grads(self, params, x, cfg, dead_mask=None, select_bias=None):
        """params: this rank's (sharded); x: (batch / R, d).  -> (ForwardOutput of this rank's
        tokens with the full-batch losses, this rank's gradients)."""
        out, grads = self.differentiate(params, lambda p: forward(p, x, cfg, self, dead_mask, select_bias),
                                        1 / self.world_size)
        self.comm.all_sum_([g for n, g in grads.items() if n not in parallel.EXPERT_SHARDED])
        return self._mean_losses(out), grads

    def update(self, params, grads, opt_state, lr, max_grad_norm=1.0, betas=(0.9, 0.999)):
        """`TorchBackend.update` (in place) after clipping by the global gradient norm."""
        if max_grad_norm is not None:
            sharded = [g for n, g in grads.items() if n in parallel.EXPERT_SHARDED]
            replicated = [g for n, g in grads.items() if n not in parallel.EXPERT_SHARDED]
            total = self.comm.all_sum(_squared_norm(sharded), "norm") + _squared_norm(replicated)
            scale = torch.clamp(max_grad_norm / (torch.sqrt(total) + CLIP_EPS), max=1.0)
            for g in grads.values():
                g.mul_(scale.to(g.dtype))
        return TorchBackend.update(self, params, grads, opt_state, lr, None, betas)

    # -- the exchange -----------------------------------------------------------------------
    def dispatch(self, run, x, gates, experts, dead, n_experts, select_bias=None):
        """Send each token (x, gate) to its expert's owner, run this rank's experts there on what
        arrived (`run`, with the rows of `dead` and `select_bias` of this rank's experts), send the reconstructions
        (with gradient) and the kept values and positions (without) back.  A collective."""
        if experts.shape[1] != 1:
            raise ConfigError("expert parallel supports top-1 routing (experts_per_token = 1) only, "
                              f"got experts_per_token = {experts.shape[1]}")
        lo, hi = parallel.expert_range(n_experts, self.world_size, self.rank)
        d = x.shape[1]
        exchange = (_DirectExchange if self.exchange == "all_to_all" else _GatheredExchange)(
            self.comm, experts[:, 0], n_experts, lo, hi)
        rows = exchange.dispatch(torch.cat([x, gates], dim=1))
        mine = run(rows[:, :d].contiguous(), rows[:, d:], exchange.local_expert[:, None],
                   None if dead is None else dead[lo:hi], None if select_bias is None else select_bias[lo:hi])
        back = exchange.combine(mine.recon if dead is None else torch.cat([mine.recon, mine.aux_recon], dim=1))
        bits = torch.float64 if mine.values.dtype == torch.float64 else torch.float32  # exact carrier
        ints = _SAME_SIZE_INT[bits]
        meta = exchange.combine_meta(torch.cat([mine.values.detach().to(bits).view(ints),
                                                mine.cand_indices.to(ints)], dim=1))
        k = mine.values.shape[1]
        values = meta[:, :k].contiguous().view(bits).to(x.dtype)
        return Experts(values, meta[:, k:].to(torch.int64), back[:, :d],
                       aux_recon=None if dead is None else back[:, d:])


class _GatheredExchange:
    """Every rank gathers every token; the owner takes its experts' rows; a reduce-scatter sums
    the zero-padded outputs back.  local_expert: (n_own,) expert - lo of the owned rows."""

    def __init__(self, comm, expert, n_experts, lo, hi):
        self.comm = comm
        everyone = comm.all_gather(expert.to(torch.int32), "routing")
        self.rows = torch.nonzero((everyone >= lo) & (everyone < hi)).squeeze(1)
        self.local_expert = (everyone[self.rows] - lo).to(torch.int64)
        self.total = everyone.shape[0]

    def dispatch(self, a):
        return self.comm.all_gather_grad(a, "dispatch")[self.rows]

    def combine(self, a):
        padded = a.new_zeros((self.total, a.shape[1])).index_add(0, self.rows, a)
        return self.comm.reduce_scatter_grad(padded, "combine")

    def combine_meta(self, a):
        padded = a.new_zeros((self.total, a.shape[1])).index_copy_(0, self.rows, a)
        return self.comm.reduce_scatter(padded, "meta")


class _DirectExchange:
    """Tokens sorted by expert (`dispatch.route`); counts exchanged; each row goes to its owner
    and back.  Received rows come grouped by source rank, then by local expert (from the counts)."""

    def __init__(self, comm, expert, n_experts, lo, hi):
        self.comm, world, per = comm, comm.world, hi - lo
        self.perm = route(expert, n_experts).perm
        sent = counts(expert, n_experts)  # (N,): experts of rank s at [s * per, (s + 1) * per)
        received = comm.all_to_all(sent, [per] * world, [per] * world, "counts")
        self.send = sent.view(world, per).sum(1).tolist()  # rows to each rank (host sync)
        self.recv = received.view(world, per).sum(1).tolist()
        ids = torch.arange(per, device=expert.device).repeat(world)
        self.local_expert = torch.repeat_interleave(ids, received)

    def dispatch(self, a):
        return self.comm.all_to_all_grad(sort_rows(a, self.perm), self.recv, self.send, "dispatch")

    def combine(self, a):
        return unsort_rows(self.comm.all_to_all_grad(a, self.send, self.recv, "combine"), self.perm)

    def combine_meta(self, a):
        return unsort_rows(self.comm.all_to_all(a, self.send, self.recv, "meta"), self.perm)


def _copy(a):
    """A copy of a slice (so the whole array can be freed)."""
    return a.clone() if isinstance(a, torch.Tensor) else a.copy()


def _n_experts(arrays: dict) -> int:
    return next(a.shape[0] for name, a in arrays.items() if name in parallel.EXPERT_SHARDED)


def _squared_norm(tensors: list):
    """sum of squares of every entry (a non-empty list), in float64."""
    return torch.stack([t.double() for t in torch._foreach_norm(tensors)]).square().sum()
