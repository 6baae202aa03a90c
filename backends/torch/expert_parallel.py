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
from switchsae.core import losses as L
from switchsae.core import parallel, spec
from switchsae.core.optim import CLIP_EPS
from switchsae.core.router import choose_experts, router_probs
from switchsae.core.spec import ForwardOutput

from .backend import TorchBackend
from .distributed import DistributedError, DistributedMixin, detached
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
    def loss_and_grads(self, params, x, cfg, dead_mask=None):
        """params: this rank's (sharded); x: (batch / R, d).  -> (ForwardOutput of this rank's
        tokens with the full-batch losses, this rank's gradients)."""
        names = list(params)
        leaves = {n: params[n].detach().requires_grad_(True) for n in names}
        with torch.enable_grad():
            out = self._forward(leaves, x, cfg, dead_mask)
            grads = torch.autograd.grad(out.losses["total"] / self.world_size,
                                        [leaves[n] for n in names], allow_unused=True)
        grads = {n: torch.zeros_like(leaves[n]) if g is None else g for n, g in zip(names, grads)}
        self.comm.all_sum_([g for n, g in grads.items() if n not in parallel.EXPERT_SHARDED])
        return detached(out, self._mean_losses(out.losses)), grads

    def forward(self, params, x, cfg, dead_mask=None) -> ForwardOutput:
        """The spec's forward pass of this rank's tokens through the sharded model (a collective:
        every rank calls it with its own tokens); losses are the full-batch ones."""
        with torch.no_grad():
            out = self._forward(params, x, cfg, dead_mask)
        return detached(out, self._mean_losses(out.losses))

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

    # -- the forward pass -------------------------------------------------------------------
    def _forward(self, p, x, cfg, dead_mask) -> ForwardOutput:
        """Route, dispatch, run own experts, combine, finish as `core.spec.trace`; losses are
        this rank's share (`core.parallel.with_global_statistics`), with gradient."""
        parallel.check_parallel(cfg, self.world_size, "expert")
        xp, world = self.xp, self.world_size
        d, m, k_r, n = cfg.d_in, cfg.expert_width, cfg.routed_k, cfg.n_experts
        lo, hi = parallel.expert_range(n, world, self.rank)
        use_aux = dead_mask is not None and cfg.auxk_coef != 0
        factor = parallel.auxk_factor(x, cfg, dead_mask, self._all_sum, world, xp)

        probs = router_probs(x, p["b_router"], p["W_router"], xp)
        expert = choose_experts(probs, xp)
        gates = spec.gates_of(probs, expert[:, None], cfg.router_scale, xp)
        x_centered = x - p["b_pre"]
        route = (_AllToAll if self.exchange == "all_to_all" else _AllGather)(self.comm, expert, n, lo, hi)

        # on the owner: this rank's experts on the tokens routed to them
        rows = route.dispatch(torch.cat([x_centered, gates], dim=1))
        local = route.local_expert[:, None]
        # the rows arrive centred (b_pre's gradient flows back through the exchange)
        acts, kept, cand = self.encode_topk(rows[:, :d].contiguous(), x.new_zeros(d), p["W_enc"],
                                            p.get("b_enc"), route.local_expert, k_r, keep_acts=use_aux)
        values = kept * rows[:, d:]  # gated as core.spec.encode
        table = p["W_dec"].reshape(-1, d)
        recon = [self.decode(values, spec.global_ids(cand, local, m, xp), table)]
        if use_aux:
            dead = dead_mask[:cfg.n_latents].reshape(n, m)[lo:hi][route.local_expert]
            aux_values, aux_cand = spec.gated_topk(xp.where(dead, acts, xp.zeros_like(acts)),
                                                   rows[:, d:], cfg.aux_k, m, self)
            recon.append(self.decode(aux_values, spec.global_ids(aux_cand, local, m, xp), table))
        back = route.combine(torch.cat(recon, dim=1))
        bits = torch.float64 if values.dtype == torch.float64 else torch.float32  # exact carrier
        ints = _SAME_SIZE_INT[bits]
        meta = route.combine_meta(torch.cat([values.detach().to(bits).view(ints), cand.to(ints)], dim=1))

        # back on the tokens' rank: as core.spec.trace
        top_values = meta[:, :k_r].contiguous().view(bits).to(x.dtype)
        top_indices = spec.global_ids(meta[:, k_r:].to(torch.int64), expert[:, None], m, xp)
        x_hat = back[:, :d] + p["b_pre"]
        if cfg.shared_latents:
            _, shared_values, shared_ids = spec.shared_encode(p, x_centered, cfg, self)
            top_values = xp.concat([top_values, shared_values.detach()], axis=-1)
            top_indices = xp.concat([top_indices, shared_ids + cfg.n_latents], axis=-1)
            x_hat = x_hat + self.decode(shared_values, shared_ids, p["W_dec_shared"])
        mse = L.mse_loss(x, x_hat, xp)
        lb = L.load_balance_loss(probs, expert[:, None], xp)
        total = mse + cfg.lb_weight * lb
        if use_aux:
            n_dead = xp.sum(xp.astype(dead_mask[:cfg.n_latents], x.dtype))
            auxk = L.auxk_loss(back[:, d:], (x - x_hat).detach(), n_dead, float(cfg.aux_k), x, xp)
            total = total + cfg.auxk_coef * auxk
        else:
            auxk = xp.zeros_like(mse)
        losses = parallel.with_global_statistics({"mse": mse, "lb": lb, "auxk": auxk, "total": total},
                                                 probs, expert, cfg, self._all_sum, world, factor, xp)
        return ForwardOutput(x_hat, expert, probs, top_values, top_indices, losses)


class _AllGather:
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


class _AllToAll:
    """Tokens sorted by expert; counts exchanged; each row goes to its owner and back.
    Received rows come grouped by source rank, then by local expert (from the counts)."""

    def __init__(self, comm, expert, n_experts, lo, hi):
        self.comm, world, per = comm, comm.world, hi - lo
        self.order = torch.argsort(expert, stable=True)
        self.inverse = torch.argsort(self.order)
        sent = counts(expert, n_experts)  # (N,): experts of rank s at [s * per, (s + 1) * per)
        received = comm.all_to_all(sent, [per] * world, [per] * world, "counts")
        self.send = sent.view(world, per).sum(1).tolist()  # rows to each rank (host sync)
        self.recv = received.view(world, per).sum(1).tolist()
        ids = torch.arange(per, device=expert.device).repeat(world)
        self.local_expert = torch.repeat_interleave(ids, received)

    def dispatch(self, a):
        return self.comm.all_to_all_grad(a[self.order], self.recv, self.send, "dispatch")

    def combine(self, a):
        return self.comm.all_to_all_grad(a, self.send, self.recv, "combine")[self.inverse]

    def combine_meta(self, a):
        return self.comm.all_to_all(a, self.send, self.recv, "meta")[self.inverse]


def _copy(a):
    """A copy of a slice (so the whole array can be freed)."""
    return a.clone() if isinstance(a, torch.Tensor) else a.copy()


def _n_experts(arrays: dict) -> int:
    return next(a.shape[0] for name, a in arrays.items() if name in parallel.EXPERT_SHARDED)


def _squared_norm(tensors: list):
    """sum of squares of every entry (a non-empty list), in float64."""
    return torch.stack([t.double() for t in torch._foreach_norm(tensors)]).square().sum()
