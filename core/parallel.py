"""Data- and expert-parallel training, the framework-independent part (backends supply the
collectives as plain functions, e.g. `all_sum`).

Every process ("rank", r of R) holds a slice of the batch, batch / R tokens.  Averaging the
per-rank gradients of per-rank losses gives the full-batch gradient for every term that is a
mean over tokens (MSE; P_i, the mean router probability), but two batch statistics are not, so
`core.spec.trace` takes their global values from `BatchStatistics` (all-reduced, detached;
neither carries gradient):
  * f_i, the fraction of tokens routed to expert i, in lb = N sum_i f_i P_i;
  * the total variance of x, AuxK's denominator (combined from per-rank sums, Chan et al.).
With them the mean over ranks of the per-rank losses is the full-batch loss, so the averaged
gradient is the full-batch gradient.  The dead-latent counters (`core.dead_latents`) count the
firings of every rank, so the dead mask and its count are the same everywhere.

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
class BatchStatistics:
    """The batch statistics of the loss that are not means over tokens, for this process's slice
    of a batch split over `world` processes.  all_sum(a) sums `a` over the processes (detached);
    the defaults (the identity, one process) describe a process holding the whole batch, and
    then every statistic is the spec's own, to the bit."""

    def __init__(self, all_sum=None, world: int = 1):
        self.all_sum = all_sum if all_sum is not None else (lambda a: a)
        self.world = world

    def expert_fractions(self, experts, n_experts: int, dtype, xp):
        """f_i over every process's tokens.  experts: (batch / R, e) -> (N,)."""
        local = L.expert_fractions(experts, n_experts, dtype, xp)
        return local if self.world == 1 else self.all_sum(local) / self.world

    def total_variance(self, x, xp):
        """This process's share (1 / R) of the total variance of the whole batch, from per-process
        sums (Chan et al.'s pairwise combination, which avoids the cancellation of sum ||x||^2 -
        B ||mean||^2).  x: (batch / R, d) -> scalar.  AuxK divides this process's residual sum by
        it, so the mean over processes of their AuxK terms is the whole batch's."""
        if self.world == 1:
            return L.total_variance(x, xp)
        batch = x.shape[0]
        mean = self.all_sum(xp.sum(x, axis=0)) / (batch * self.world)
        spread = batch * xp.sum((xp.mean(x, axis=0) - mean) ** 2)
        return self.all_sum(L.total_variance(x, xp) + spread) / self.world


# -- memory and communication model -----------------------------------------------------------
def process_bytes(cfg, world: int, itemsize: int = 4) -> dict:
    """Bytes each of `world` expert-parallel processes holds for the model: its experts' rows of
    `EXPERT_SHARDED` and the replicated parameters (router, b_pre, shared expert), and in all
    ("total") each of them four times: parameter, gradient and Adam's two moments.  itemsize:
    bytes per float (activations and temporaries are not counted)."""
    expert = replicated = 0
    for name, shape in cfg.param_shapes().items():
        n = 1
        for s in shape:
            n *= s
        if name in EXPERT_SHARDED:
            expert += n // world
        else:
            replicated += n
    return {"expert_params": expert * itemsize, "replicated_params": replicated * itemsize,
            "total": 4 * (expert + replicated) * itemsize}


def gradient_sum_bytes(cfg, world: int, itemsize: int = 4) -> int:
    """Bytes each process receives per step summing the replicated parameters' gradients over
    the processes (a ring all-reduce of c bytes receives 2 (R - 1) / R c)."""
    return round(2 * (world - 1) / world * process_bytes(cfg, world, itemsize)["replicated_params"])


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
