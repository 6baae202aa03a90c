"""JAX backend: the shared spec under `jax.jit`, gradients by `jax.value_and_grad`, the expert
encoder dispatched per platform (`dispatch`: tiles on CPU, one `ragged_dot` on TPU/GPU) and
fused with ReLU and TopK under a sparse custom VJP, and a sparse decode."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from switchsae.core.backend import Backend
from switchsae.backends.host_memory import keep_freed_cpu_memory
from switchsae.core.spec import forward

from . import compile as _compile
from .decode import decode as sparse_decode
from .dispatch import choose_mode
from .encode import encode_topk as fused_encode_topk
from .encode import grouped_encode


class JaxBackend(Backend):
    """`xp` is `jax.numpy` (Array API compatible).  Arrays live on JAX's default device.

    Matmul precision follows JAX's defaults (TF32 for float32 on recent NVIDIA GPUs); wrap
    calls in `jax.default_matmul_precision("highest")` for full float32.  On GPU, XLA may run
    the encoder's `ragged_dot` as a zero-padded dense product: see `use_pallas_ragged_dot`.
    Multi-device placement: `switchsae.backends.jax.distributed.ExpertParallelBackend`.
    On CPU, freed memory is kept for reuse (`switchsae.backends.host_memory`, process-wide;
    $SWITCHSAE_KEEP_FREED_MEMORY=0 turns it off).

    dispatch_mode: "tiles", "ragged" or "auto" (None: $SWITCHSAE_JAX_DISPATCH, else "auto": ragged
    on TPU/GPU, tiles elsewhere); see `dispatch`."""

    name = "jax"
    xp = jnp
    extra = "jax"
    dtypes = ("float32", "bfloat16")

    def __init__(self, dispatch_mode: str | None = None):
        self.dispatch_mode = choose_mode(dispatch_mode)
        if jax.default_backend() == "cpu":
            keep_freed_cpu_memory()  # XLA's CPU temporaries come from malloc: no page faults
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
        """Each token through its own expert only (`encode.grouped_encode`)."""
        return grouped_encode(x_centered, W_enc, b_enc, expert, self.dispatch_mode)

    def encode_topk(self, x, b_pre, W_enc, b_enc, expert, k, keep_acts=True):
        """Encode, ReLU and TopK fused, with a backward over the (batch, k) kept entries
        (`encode.encode_topk`)."""
        return fused_encode_topk(x, b_pre, W_enc, b_enc, expert, k, keep_acts, self.dispatch_mode)

    def encode_topk_aux(self, x, b_pre, W_enc, b_enc, expert, k, dead, aux_k, keep_acts=True):
        """`encode_topk` and AuxK's dead-latent TopK chosen in the same pass (per tile on CPU),
        with one sparse backward over the k + aux_k kept entries (`encode.encode_topk`)."""
        return fused_encode_topk(x, b_pre, W_enc, b_enc, expert, k, keep_acts, self.dispatch_mode, dead, aux_k)

    def decode(self, values, indices, W_dec_flat):
        """Sparse decode with a sparse backward (`decode.decode`)."""
        return sparse_decode(values, indices, W_dec_flat, self.dispatch_mode)

    def stop_gradient(self, a):
        return jax.lax.stop_gradient(a)

    # -- training -------------------------------------------------------------------------
    def loss_and_grads(self, params, x, cfg, dead_mask=None):
        """Jit-compiled (per cfg) `jax.value_and_grad` of the spec's total loss."""
        return self._loss_and_grads(params, x, cfg, dead_mask)

    def _value_and_grad(self, params, x, cfg, dead_mask):
        def total(p):
            out = forward(p, x, cfg, self, dead_mask)
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
