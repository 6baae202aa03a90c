"""The expert encoder on JAX: a grouped matmul (`jax.lax.ragged_dot`) over tokens sorted by
expert.  Every shape is static (batch fixed; group sizes are data), so it traces once under
`jax.jit`.

GPU note: on GPU, XLA may run `ragged_dot` as a zero-padded (N, batch, ...) expansion instead
of a grouped GEMM.  JAX's Pallas/Triton lowering avoids that; `use_pallas_ragged_dot()`
switches it on (it needs a JAX build that ships the kernel).  On CPU, JAX always lowers
`ragged_dot` to that masked expansion: correct, but it does the dense amount of work.
"""

from __future__ import annotations

import importlib.util

import jax
import jax.numpy as jnp

_PALLAS_FLAG = "jax_ragged_dot_use_gpu_pallas_triton_lowering"
_PALLAS_MODULE = "jax._src.lax.pallas_lowerings.gpu.ragged_dot"


def grouped_encode(x, W_enc, b_enc, group_ids):
    """Each token times its own group's encoder, as ONE `ragged_dot` over tokens sorted by group.

    x: (batch, d); W_enc: (G, d, m); b_enc: (G, m) or None; group_ids: (batch,) int.
    -> (batch, m).  Tokens whose id lies outside [0, G) get zero rows (the expert-parallel
    path uses this for tokens another device owns).
    """
    n_groups = W_enc.shape[0]
    mine = (group_ids >= 0) & (group_ids < n_groups)
    key = jnp.where(mine, group_ids, n_groups).astype(jnp.int32)  # foreign tokens sort last
    order = jnp.argsort(key, stable=True)
    group_sizes = jnp.zeros(n_groups, jnp.int32).at[key].add(1, mode="drop")
    pre_sorted = jax.lax.ragged_dot(x[order], W_enc, group_sizes)
    inverse = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))
    pre = pre_sorted[inverse]
    if b_enc is not None:
        pre = pre + b_enc[jnp.minimum(key, n_groups - 1)]
    # ragged_dot leaves rows past sum(group_sizes) unspecified: zero them explicitly
    return jnp.where(mine[:, None], pre, jnp.zeros_like(pre))


def use_pallas_ragged_dot(enabled: bool = True) -> None:
    """Switch JAX's Pallas/Triton GPU lowering of `ragged_dot` on or off (process-wide; it
    is part of the jit cache key, so functions recompile).  No effect on CPU/TPU.

    Raises RuntimeError if this JAX build lacks the kernel module (released wheels 0.10.0 to
    0.11.2 at least lack it: jax-ml/jax#40888)."""
    if enabled and not _pallas_kernel_available():
        raise RuntimeError(
            f"this JAX build ({jax.__version__}) does not ship {_PALLAS_MODULE}, so "
            f"{_PALLAS_FLAG} would fail at compile time (jax-ml/jax#40888); "
            "build JAX from source or keep the default XLA lowering"
        )
    jax.config.update(_PALLAS_FLAG, bool(enabled))


def _pallas_kernel_available() -> bool:
    try:
        return importlib.util.find_spec(_PALLAS_MODULE) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False
