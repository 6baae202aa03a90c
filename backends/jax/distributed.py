"""Data- and expert-parallel placement on a device mesh with axes ("data", "expert").

Layout: W_enc, W_dec and b_enc are split along experts over the "expert" axis and replicated
over "data"; the router, b_pre and b_router are replicated; the batch is split over ALL
devices (axes ("data", "expert")), so an expert-parallel group also shares the dense work
(router, top-k, losses) data-parallel.  A shared expert's encoder is replicated; its decoder
W_dec_shared is split by rows like W_dec when its width divides evenly (else replicated).

`ExpertParallelBackend` overrides the JAX backend's encode and decode hooks with
`jax.shard_map` versions, and runs top-k per device (GSPMD would run it on an all-gathered
batch); the rest of the spec runs under GSPMD.  In encode and decode a device all-gathers
its group's tokens (with their expert choices / latent ids) along "expert", computes the rows
its own experts own (zeros elsewhere) and `psum_scatter`s the result back to the tokens'
owners.  With top-1 routing and no shared expert exactly one device contributes a non-zero
row per token, so the sum only adds zeros: the result is exact.

    mesh = make_mesh(n_data=2, n_expert=2)
    backend = ExpertParallelBackend(mesh)
    params = shard_params(params, mesh, cfg)
    opt_state = shard_opt_state(adam_init(params, jnp), mesh, cfg)
    x = shard_batch(x, mesh)

The backend also keeps the `core.Backend` parallel contract (one process, so rank 0 of 1: the
arrays are global and every statistic is the whole batch's): `parallel_backend("data" |
"expert")` over all of JAX's devices is what `Trainer` and `switchsae train --backend jax
--parallel data|expert` use (on CPU, XLA_FLAGS=--xla_force_host_platform_device_count=N).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from switchsae.core.config import ConfigError
from switchsae.core.optim import AdamState

from switchsae.core.backend import Backend

from .backend import JaxBackend
from .decode import decode as sparse_decode
from .encode import grouped_encode

DATA, EXPERT = "data", "expert"
_TOKENS = P((DATA, EXPERT))  # batch dimension split over every device
_BY_EXPERT = P(EXPERT)  # leading (expert / latent-row) dimension split over "expert"
_EXPERT_PARAMS = ("W_enc", "W_dec", "b_enc")


def make_mesh(n_data: int = 1, n_expert: int = 1, devices=None) -> Mesh:
    """A (n_data, n_expert) mesh with axes ("data", "expert") over the first devices."""
    devices = jax.devices() if devices is None else list(devices)
    if n_data < 1 or n_expert < 1 or n_data * n_expert > len(devices):
        raise ValueError(
            f"a ({n_data} data x {n_expert} expert) mesh needs {n_data * n_expert} devices; "
            f"{len(devices)} available (on CPU, set XLA_FLAGS="
            "--xla_force_host_platform_device_count=N before importing jax)"
        )
    return Mesh(np.asarray(devices[: n_data * n_expert]).reshape(n_data, n_expert), (DATA, EXPERT))


def parallel_backend(mode: str, devices=None) -> ExpertParallelBackend:
    """The backend for `mode` over `devices` (default: all of JAX's): "data" splits the batch
    over them (mesh n x 1), "expert" the experts too (mesh 1 x n)."""
    n = len(jax.devices() if devices is None else devices)
    if mode not in ("data", "expert"):
        raise ConfigError(f"parallel mode must be 'data' or 'expert', got {mode!r}")
    return ExpertParallelBackend(make_mesh(n, 1, devices) if mode == "data" else make_mesh(1, n, devices))


def param_shardings(mesh: Mesh, cfg) -> dict[str, NamedSharding]:
    """Parameter name -> NamedSharding (see the module docstring for the layout)."""
    if cfg.n_experts % mesh.shape[EXPERT]:
        raise ConfigError(
            f"n_experts ({cfg.n_experts}) must be divisible by the mesh's expert axis "
            f"({mesh.shape[EXPERT]} devices)"
        )
    return {name: _sharding(mesh, name, shape[0]) for name, shape in cfg.param_shapes().items()}


def _sharding(mesh: Mesh, name: str, rows: int) -> NamedSharding:
    """A parameter's (or Adam moment's) placement: split over "expert" by its leading axis
    (experts, or W_dec_shared's rows when they divide evenly), else replicated."""
    split = name in _EXPERT_PARAMS or (name == "W_dec_shared" and rows % mesh.shape[EXPERT] == 0)
    return NamedSharding(mesh, _BY_EXPERT if split else P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of x (batch, d): the batch split over every device of the mesh."""
    return NamedSharding(mesh, _TOKENS)


def shard_params(params: dict, mesh: Mesh, cfg) -> dict:
    """Place parameters (NumPy or JAX arrays) according to `param_shardings`."""
    shardings = param_shardings(mesh, cfg)
    return {name: jax.device_put(value, shardings[name]) for name, value in params.items()}


def shard_opt_state(state: AdamState, mesh: Mesh, cfg) -> AdamState:
    """Adam moments placed like their parameters; the step count replicated."""
    step = jax.device_put(jnp.asarray(state.step), NamedSharding(mesh, P()))
    return AdamState(step, shard_params(state.m, mesh, cfg), shard_params(state.v, mesh, cfg))


def shard_batch(x, mesh: Mesh):
    """Place x (batch, d) split over every device; the batch must divide evenly."""
    if x.shape[0] % mesh.size:
        raise ValueError(f"batch size {x.shape[0]} is not divisible by the mesh's {mesh.size} devices")
    return jax.device_put(x, batch_sharding(mesh))


class ExpertParallelBackend(JaxBackend):
    """The JAX backend with experts spread over `mesh`'s "expert" axis and tokens over all of
    its devices.  Feed it parameters from `shard_params` and batches from `shard_batch`
    (the batch must divide by `mesh.size`)."""

    def __init__(self, mesh: Mesh, dispatch_mode: str | None = None):
        super().__init__(dispatch_mode)
        if tuple(mesh.axis_names) != (DATA, EXPERT):
            raise ValueError(f"mesh axes must be {(DATA, EXPERT)}, got {tuple(mesh.axis_names)}")
        self.mesh = mesh
        self.blocked_update = False  # its dynamic slices would gather the sharded parameters
        self.n_ep = mesh.shape[EXPERT]
        self.parallel = "expert" if self.n_ep > 1 else "data"

    # -- the parallel contract (one process: the arrays are global) ---------------------------
    def describe_parallel(self) -> str:
        return f"{self.parallel} parallel, {self.mesh.size} devices ({self.mesh.shape[DATA]} data x {self.n_ep} expert)"

    def check_partition(self, cfg, batch_size: int) -> None:
        param_shardings(self.mesh, cfg)
        if batch_size % self.mesh.size:
            raise ConfigError(f"the batch size ({batch_size}) must be divisible by the number of devices "
                              f"({self.mesh.size})")

    def local_backend(self) -> JaxBackend:
        return JaxBackend(self.dispatch_mode)

    def place_batch(self, x, dtype=None):
        return shard_batch(self.asarray(x, dtype), self.mesh)

    def shard_params(self, arrays: dict) -> dict:
        """Whole parameters (or Adam moments) -> placed on the mesh, experts split over "expert"."""
        return {name: jax.device_put(a, _sharding(self.mesh, name, a.shape[0])) for name, a in arrays.items()}

    def topk(self, acts, k):
        """Per-device `jax.lax.top_k` of each token's row.  acts: (batch, n) -> (batch, k) x2."""
        return jax.shard_map(lambda a: tuple(jax.lax.top_k(a, k)), mesh=self.mesh,
                             in_specs=_TOKENS, out_specs=(_TOKENS, _TOKENS))(acts)

    # the standard composition of the sharded encode and top-k below (not the single-device
    # fused kernel, which would see every device's tokens)
    encode_topk = Backend.encode_topk
    encode_topk_aux = Backend.encode_topk_aux  # AuxK's TopK from the sharded acts, likewise
    decode_with_aux = Backend.decode_with_aux  # the sharded decode below

    def encode(self, x_centered, W_enc, b_enc, expert):
        """x_centered: (batch, d); W_enc: (N, d, m) split over "expert"; expert: (batch,)
        -> (batch, m)."""
        if W_enc.shape[0] % self.n_ep:
            raise ValueError(f"{W_enc.shape[0]} experts cannot be split over {self.n_ep} expert devices")
        n_local = W_enc.shape[0] // self.n_ep

        def local(x, W, e, *b):
            first = jax.lax.axis_index(EXPERT) * n_local
            pre = grouped_encode(_gather_group(x), W, b[0] if b else None, _gather_group(e) - first,
                                 self.dispatch_mode)
            return _scatter_group(pre)

        args, specs = (x_centered, W_enc, expert), (_TOKENS, _BY_EXPERT, _TOKENS)
        if b_enc is not None:
            args, specs = args + (b_enc,), specs + (_BY_EXPERT,)
        return jax.shard_map(local, mesh=self.mesh, in_specs=specs, out_specs=_TOKENS)(*args)

    def decode(self, values, indices, W_dec_flat):
        """values, indices: (batch, k); W_dec_flat: (R, d), its rows split over "expert" when
        R divides evenly (else replicated and decoded per device) -> (batch, d)."""
        rows = W_dec_flat.shape[0]
        if rows % self.n_ep:
            return jax.shard_map(functools.partial(sparse_decode, mode=self.dispatch_mode), mesh=self.mesh,
                                 in_specs=(_TOKENS, _TOKENS, P()), out_specs=_TOKENS)(values, indices, W_dec_flat)
        n_local = rows // self.n_ep

        def local(v, idx, table):
            local_idx = _gather_group(idx) - jax.lax.axis_index(EXPERT) * n_local
            mine = (local_idx >= 0) & (local_idx < n_local)
            v_mine = jnp.where(mine, _gather_group(v), jnp.zeros((), v.dtype))
            return _scatter_group(sparse_decode(v_mine, jnp.where(mine, local_idx, 0), table, self.dispatch_mode))

        return jax.shard_map(local, mesh=self.mesh, in_specs=(_TOKENS, _TOKENS, _BY_EXPERT),
                             out_specs=_TOKENS)(values, indices, W_dec_flat)


def _gather_group(a):
    """This device's slice of the batch -> its expert group's whole slice (tokens in order)."""
    return jax.lax.all_gather(a, EXPERT, axis=0, tiled=True)


def _scatter_group(a):
    """Sum the group's partial rows and hand each device back its own tokens."""
    return jax.lax.psum_scatter(a, EXPERT, scatter_dimension=0, tiled=True)
