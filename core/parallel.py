"""Data- and expert-parallel training, the framework-independent part (backends supply the
collectives as plain functions, e.g. `all_sum`).

Every process ("rank", r of R) holds a slice of the batch, batch / R tokens.  Averaging the
per-rank gradients of per-rank losses gives the full-batch gradient for every term that is a
mean over tokens (MSE; P_i, the mean router probability), but two batch statistics are not, so
each rank's loss uses their global value (all-reduced, detached; neither carries gradient):
  * f_i, the fraction of tokens routed to expert i, in lb = N sum_i f_i P_i;
  * the total variance of x, AuxK's denominator (combined from per-rank sums, Chan et al.).
With them the mean over ranks of the per-rank losses is the full-batch loss, so the averaged
gradient is the full-batch gradient.  Dead-latent counters count the firings of every rank.

Expert parallel splits the N experts across the ranks: rank r owns experts
[r N / R, (r + 1) N / R), i.e. the rows of the expert-indexed parameters `EXPERT_SHARDED`; all
other parameters are replicated.  Checkpoints always hold whole parameters (`shard` slices
them; backends gather them back), so any world size loads any checkpoint.

`exchange_bytes` is the token-exchange traffic of the two expert-parallel schemes, derived from
the algorithms (see the function), for sizing runs and checking the measured figures."""

from __future__ import annotations

from . import losses as L
from .config import ConfigError

# parameters whose leading axis is the expert axis: split across ranks by expert parallelism
EXPERT_SHARDED = ("W_enc", "W_dec", "b_enc")
PARALLEL_MODES = ("data", "expert")


# -- partitions ---------------------------------------------------------------------------
def check_parallel(cfg, world: int, mode: str) -> None:
    """Raise ConfigError unless `cfg` can be trained with `mode` ("data" | "expert") on `world` ranks."""
    if mode not in PARALLEL_MODES:
        raise ConfigError(f"parallel mode must be one of {PARALLEL_MODES}, got {mode!r}")
    if mode == "expert":
        if cfg.n_experts % world:
            raise ConfigError(f"expert parallel needs n_experts ({cfg.n_experts}) divisible by the "
                              f"number of processes ({world})")
        if cfg.experts_per_token != 1:
            raise ConfigError("expert parallel supports top-1 routing (experts_per_token = 1) only, "
                              f"got experts_per_token = {cfg.experts_per_token}")


def expert_range(n_experts: int, world: int, rank: int) -> tuple[int, int]:
    """The experts [lo, hi) that `rank` owns under expert parallelism."""
    if n_experts % world:
        raise ConfigError(f"n_experts ({n_experts}) is not divisible by the world size ({world})")
    per = n_experts // world
    return rank * per, (rank + 1) * per


def batch_rows(batch: int, world: int, rank: int) -> slice:
    """The rows of a global batch that `rank` trains on (equal contiguous slices)."""
    if batch % world:
        raise ConfigError(f"the batch size ({batch}) must be divisible by the number of processes ({world})")
    per = batch // world
    return slice(rank * per, (rank + 1) * per)


def shard(arrays: dict, n_experts: int, world: int, rank: int) -> dict:
    """Whole parameters (or Adam moments) -> this rank's: expert-indexed arrays sliced to its
    experts (basic slicing: views for NumPy and torch), the rest as they are."""
    lo, hi = expert_range(n_experts, world, rank)
    return {name: a[lo:hi] if name in EXPERT_SHARDED else a for name, a in arrays.items()}


# -- global statistics ----------------------------------------------------------------------
def global_total_variance(x, all_sum, world: int, xp):
    """sum over every rank's tokens of ||x - global mean||^2, from per-rank sums (Chan et al.'s
    pairwise combination, which avoids the cancellation of sum ||x||^2 - B ||mean||^2).
    x: (batch / R, d); all_sum(a) sums `a` over the ranks (detached)."""
    batch = x.shape[0]
    mean = all_sum(xp.sum(x, axis=0)) / (batch * world)
    spread = batch * xp.sum((xp.mean(x, axis=0) - mean) ** 2)
    return all_sum(L.total_variance(x, xp) + spread)


def auxk_factor(x, cfg, dead_mask, all_sum, world: int, xp):
    """R * local / global total variance: scales this rank's AuxK (whose denominator is the local
    total variance) so the mean over ranks is sum ||aux residual||^2 / global total variance.
    1.0 when AuxK is off."""
    if dead_mask is None or cfg.auxk_coef == 0:
        return 1.0
    return world * L.total_variance(x, xp) / global_total_variance(x, all_sum, world, xp)


def with_global_statistics(losses: dict, probs, experts, cfg, all_sum, world: int, factor, xp) -> dict:
    """This rank's share of the full-batch loss, from the spec's losses on its own tokens:
    lb with the global f_i, AuxK times `auxk_factor`.  probs: (batch / R, N) (with gradient);
    experts: (batch / R,) or (batch / R, e).  The mean over ranks of every returned term is the
    full-batch term."""
    n = cfg.n_experts
    f_local = L.expert_fractions(experts, n, probs.dtype, xp)
    f_global = all_sum(f_local) / world
    lb = losses["lb"] + n * xp.sum((f_global - f_local) * xp.mean(probs, axis=0))
    auxk = losses["auxk"] * factor
    total = (losses["total"] + cfg.lb_weight * (lb - losses["lb"])
             + cfg.auxk_coef * (auxk - losses["auxk"]))
    return dict(losses, lb=lb, auxk=auxk, total=total)


def update_tokens_since_fired(counter, top_indices, top_values, n_tokens: int, all_sum, backend):
    """`core.dead_latents.update_tokens_since_fired` over the firings of every rank: reset where
    any rank fired a latent, else add the global batch size n_tokens.  counter: (M,); top_*:
    (batch / R, k) -> (M,), equal on every rank.  all_sum sums the (M,) hit counts."""
    xp = backend.xp
    fired = xp.astype(xp.reshape(top_values, (-1,)) != 0, counter.dtype)
    hits = all_sum(backend.scatter_add(xp.zeros_like(counter), xp.reshape(top_indices, (-1,)), fired))
    return xp.where(hits > 0, xp.zeros_like(counter), counter + n_tokens)


# -- communication model --------------------------------------------------------------------
def exchange_bytes(scheme: str, batch: int, d: int, k: int, world: int, itemsize: int = 4,
                   auxk: bool = False, n_experts: int = 1, remote_fraction: float | None = None) -> dict:
    """Bytes each rank receives from the other ranks per training step for the token exchange of
    expert parallelism (forward and backward), by collective.  batch: tokens per rank; itemsize:
    bytes per float; remote_fraction: share of a rank's tokens routed to another rank's experts
    ((R - 1) / R with balanced routing).  Replicated-gradient all-reduces are the same for both
    schemes and not counted.

    "all_gather": every rank gathers every token x - b_pre (d floats and the gate) and the expert
    ids (int32), runs its experts on the ones routed to them, and a reduce-scatter sums the
    zero-padded outputs back (x_hat part: d floats, + d for AuxK's reconstruction; no-grad
    meta: k gated values and k latent ids, int32).  The backward pass mirrors the float
    collectives (all-gather <-> reduce-scatter).  Each moves (R - 1) * batch rows per rank.
    "all_to_all": the same rows, but each goes only to (and back from) its expert's owner:
    remote_fraction * batch rows per rank, plus the per-expert counts (N int64) that size the
    splits; no capacity limit, so no token is dropped.  Ratio all_gather / all_to_all
    = (R - 1) / remote_fraction = R when balanced."""
    if scheme not in ("all_gather", "all_to_all"):
        raise ValueError(f"scheme must be 'all_gather' or 'all_to_all', got {scheme!r}")
    out_cols = 2 * d if auxk else d
    if scheme == "all_gather":
        rows = (world - 1) * batch
        parts = {"routing": rows * 4, "counts": 0}
    else:
        share = (world - 1) / world if remote_fraction is None else remote_fraction
        rows = share * batch
        parts = {"routing": 0, "counts": (world - 1) * (n_experts // world) * 8}
    parts.update({
        "dispatch": rows * (d + 1) * itemsize,         # x - b_pre and the gate
        "combine": rows * out_cols * itemsize,          # reconstructions back
        "meta": rows * 2 * k * 4,                       # kept values (as float32 bits) and ids
        "combine_backward": rows * out_cols * itemsize,
        "dispatch_backward": rows * (d + 1) * itemsize,
    })
    parts = {name: round(v) for name, v in parts.items()}
    parts["total"] = sum(parts.values())
    return parts
