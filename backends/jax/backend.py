"""JAX backend: the shared spec under `jax.jit`, gradients by `jax.value_and_grad`, the
expert encoder as one `ragged_dot` and the decode as a row gather."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from switchsae.core.backend import Backend
from switchsae.core.spec import trace

from . import compile as _compile
from .decode import gather_decode
from .encode import grouped_encode


class JaxBackend(Backend):
    """`xp` is `jax.numpy` (Array API compatible).  Arrays live on JAX's default device.

    Matmul precision follows JAX's defaults (TF32 for float32 on recent NVIDIA GPUs); wrap
    calls in `jax.default_matmul_precision("highest")` for full float32.  On GPU, XLA may run
    the encoder's `ragged_dot` as a zero-padded dense product: see `use_pallas_ragged_dot`.
    Multi-device placement: `switchsae.backends.jax.distributed.ExpertParallelBackend`."""

    name = "jax"
    xp = jnp
    extra = "jax"
    dtypes = ("float32", "bfloat16")

    def __init__(self):
        self._loss_and_grads = jax.jit(self._value_and_grad, static_argnums=(2,))

    # -- arrays ---------------------------------------------------------------------------
    def asarray(self, a, dtype=None):
        """NumPy/JAX arrays, scalars, nested lists, or any DLPack producer (a torch tensor)."""
        if not isinstance(a, (jax.Array, np.ndarray, np.generic, int, float, list, tuple)) \
                and hasattr(a, "__dlpack__"):
            a = jnp.from_dlpack(a)
        return jnp.asarray(a, dtype=self.dtype(dtype) if dtype is not None else None)

    def to_numpy(self, a):
        a = jnp.asarray(a)
        return np.asarray(a.astype(jnp.float32) if a.dtype == jnp.bfloat16 else a)

    def scatter_add(self, target, indices, values):
        return target.at[indices].add(values)

    # -- spec hooks -----------------------------------------------------------------------
    def topk(self, acts, k):
        """`jax.lax.top_k`: largest first, the lower index first on ties (as the spec)."""
        return jax.lax.top_k(acts, k)

    def encode(self, x_centered, W_enc, b_enc, expert):
        """One `ragged_dot` over the tokens sorted by expert (see `encode.grouped_encode`)."""
        return grouped_encode(x_centered, W_enc, b_enc, expert)

    def decode(self, values, indices, W_dec_flat):
        return gather_decode(values, indices, W_dec_flat)

    def stop_gradient(self, a):
        return jax.lax.stop_gradient(a)

    # -- training -------------------------------------------------------------------------
    def loss_and_grads(self, params, x, cfg, dead_mask=None):
        """Jit-compiled (per cfg) `jax.value_and_grad` of the spec's total loss."""
        return self._loss_and_grads(params, x, cfg, dead_mask)

    def _value_and_grad(self, params, x, cfg, dead_mask):
        def total(p):
            out = trace(p, x, cfg, self, dead_mask).out
            return out.losses["total"], out

        (_, out), grads = jax.value_and_grad(total, has_aux=True)(params)
        return out, grads

    def compile_step(self, step_fn):
        """step_fn(params, opt_state, x, lr, dead_mask=None): the shared train step with backend
        and cfg bound.  `jax.jit` with donated params/optimiser buffers (`compile.compile_step`)."""
        return _compile.compile_step(step_fn)

    def block_until_ready(self, tree):
        return jax.block_until_ready(tree)

    def device_name(self) -> str:
        device = jax.devices()[0]
        return f"jax {device.platform} ({device.device_kind})"

    def compile_forward(self, forward_fn):
        """forward_fn(params, x, dead_mask=None): `core.spec.forward` with cfg and backend
        bound -> its `jax.jit` (`compile.compile_forward`)."""
        return _compile.compile_forward(forward_fn)
