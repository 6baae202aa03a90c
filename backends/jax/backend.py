"""JAX backend: the shared spec under `jax.jit`, gradients by `jax.value_and_grad`, the expert
encoder dispatched per platform (`dispatch`: tiles on CPU, one `ragged_dot` on TPU/GPU) and
fused with ReLU and TopK under a sparse custom VJP, and a sparse decode."""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np

from switchsae.core.backend import Backend
from switchsae.backends.host_memory import keep_freed_cpu_memory
from switchsae.core.optim import LATENT_ROW_PARAMS
from switchsae.core.spec import forward, uses_auxk

from . import compile as _compile
from . import lazy
from .auxk import decode_dead
from .decode import decode as sparse_decode
from .decode import decode_rows
from .dispatch import choose_mode
from .encode import encode_topk as fused_encode_topk
from .encode import encode_topk_rows, grouped_encode
from .update import block_rows, blocked_update


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
        if _starts_on_cpu() or jax.default_backend() == "cpu":  # the first before XLA's threads start
            keep_freed_cpu_memory()  # XLA's CPU temporaries come from malloc: no page faults
        self.dispatch_mode = choose_mode(dispatch_mode)
        self._loss_and_grads = jax.jit(self._value_and_grad, static_argnums=(2,))
        self.blocked_update = jax.default_backend() == "cpu"  # dense Adam a block of latents at a time (`update`)
        self._trace = None  # the `lazy.StepTrace` while compile_step traces a step
        self._rows = None  # the `_RowSinks` while loss_and_row_grads traces the forward pass

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

    def encode_topk(self, x, b_pre, W_enc, b_enc, expert, k, keep_acts=True, select_bias=None):
        """Encode, ReLU and TopK fused, with a backward over the (batch, k) kept entries
        (`encode.encode_topk`); with a selection bias, the standard ops' (autodiff)."""
        if select_bias is not None:
            return super().encode_topk(x, b_pre, W_enc, b_enc, expert, k, keep_acts, select_bias)
        if self._rows is not None and self._rows.owns_encoder(W_enc, keep_acts):
            return (None, *self._rows.encode(x, b_pre, W_enc, b_enc, expert, k, self.dispatch_mode))
        return fused_encode_topk(x, b_pre, W_enc, b_enc, expert, k, keep_acts, self.dispatch_mode)

    def encode_topk_aux(self, x, b_pre, W_enc, b_enc, expert, k, dead, aux_k, keep_acts=True, select_bias=None):
        """`encode_topk` and AuxK's dead-latent TopK chosen in the same pass (per tile on CPU),
        with one sparse backward over the k + aux_k kept entries (`encode.encode_topk`); with a
        selection bias, the standard ops' (autodiff)."""
        if select_bias is not None:
            return super().encode_topk_aux(x, b_pre, W_enc, b_enc, expert, k, dead, aux_k, keep_acts, select_bias)
        if self._rows is not None and self._rows.owns_encoder(W_enc, keep_acts):
            return (None, *self._rows.encode(x, b_pre, W_enc, b_enc, expert, k, self.dispatch_mode, dead, aux_k))
        return fused_encode_topk(x, b_pre, W_enc, b_enc, expert, k, keep_acts, self.dispatch_mode, dead, aux_k,
                                 self._dead_cap(dead, keep_acts))

    def decode(self, values, indices, W_dec_flat):
        """Sparse decode with a sparse backward (`decode.decode`)."""
        if self._rows is not None and self._rows.owns_decoder(W_dec_flat):
            return self._rows.decode(values, indices, W_dec_flat, self.dispatch_mode)
        return sparse_decode(values, indices, W_dec_flat, self.dispatch_mode)

    def decode_with_aux(self, values, indices, aux_values, aux_indices, expert, dead, W_dec_flat):
        """In a step compiled by `compile_step` on the tiles, AuxK's decode as dense products over
        each expert's dead columns (`auxk.decode_dead`); elsewhere both as the sparse `decode`."""
        cap = self._dead_cap(dead, keep_acts=False)
        if cap is None:
            return super().decode_with_aux(values, indices, aux_values, aux_indices, expert, dead, W_dec_flat)
        local = aux_indices - expert[:, None].astype(aux_indices.dtype) * dead.shape[1]
        return self.decode(values, indices, W_dec_flat), decode_dead(aux_values, local, expert, dead, W_dec_flat, cap)

    def _dead_cap(self, dead, keep_acts: bool) -> int | None:
        """The static cap on the experts' dead counts of the step `compile_step` is tracing (which
        records dead's shape, so the next calls read the count back), or None: AuxK keeps the
        generic sparse path (no compiled step, no AuxK, the ragged dispatch, lazy Adam's rows,
        or the dense acts' backward)."""
        trace = self._trace
        if trace is None or dead is None or keep_acts or self._rows is not None or self.dispatch_mode != "tiles":
            return None
        trace.dead_shape = tuple(dead.shape)
        return trace.dead_cap

    def stop_gradient(self, a):
        return jax.lax.stop_gradient(a)

    # -- training -------------------------------------------------------------------------
    def loss_and_grads(self, params, x, cfg, dead_mask=None, select_bias=None):
        """Jit-compiled (per cfg) `jax.value_and_grad` of the spec's total loss (inlined into the
        step `compile_step` traces, whose trace state, e.g. AuxK's dead cap, a cached inner jit
        would not see)."""
        if self._trace is not None:
            return self._value_and_grad(params, x, cfg, dead_mask, select_bias)
        return self._loss_and_grads(params, x, cfg, dead_mask, select_bias)

    def _value_and_grad(self, params, x, cfg, dead_mask, select_bias=None):
        def total(p):
            out = forward(p, x, cfg, self, dead_mask, select_bias)
            return out.losses["total"], out

        (_, out), grads = jax.value_and_grad(total, has_aux=True)(params)
        return out, grads

    def loss_and_row_grads(self, params, x, cfg, dead_mask=None, select_bias=None):
        """`loss_and_grads` with W_enc, W_dec and b_enc's gradients as `lazy.Rows` at the touched
        latents (`lazy` module notes), when traced in `compile_step` with top-1 routing and no
        selection bias; dense gradients otherwise (the plain `encode`'s), which `lazy_update`
        takes too."""
        trace = self._trace
        if trace is None or cfg.experts_per_token != 1 or select_bias is not None:
            return self.loss_and_grads(params, x, cfg, dead_mask, select_bias)
        kept = cfg.routed_k + (cfg.aux_k if uses_auxk(cfg, dead_mask) else 0)
        trace.bound = lazy.row_bound(cfg.n_latents, x.shape[0], kept)
        used = trace.bound if trace.capacity is None else min(trace.capacity, trace.bound)
        latent = {n: params[n] for n in LATENT_ROW_PARAMS if n in params}
        dense = {n: p for n, p in params.items() if n not in latent}
        sinks = {n: jnp.zeros((used, *lazy.gather_rows(n, p, jnp.zeros(1, jnp.int32)).shape[1:]), p.dtype)
                 for n, p in latent.items()}

        def total(dense_params, sink):
            self._rows = _RowSinks(latent, sink, dense_params.get("W_dec_shared"))
            try:
                out = forward({**dense_params, **latent}, x, cfg, self, dead_mask)
                ids, count = self._rows.captured()
            finally:
                self._rows = None
            return out.losses["total"], (out, ids, count)

        (_, (out, ids, count)), (grads, row_grads) = jax.value_and_grad(total, (0, 1), has_aux=True)(dense, sinks)
        trace.used, trace.bound, trace.count = jnp.asarray(used), jnp.asarray(trace.bound), count
        return out, {**grads, **{n: lazy.Rows(ids, g, count) for n, g in row_grads.items()}}

    def update(self, params, grads, opt_state, lr, max_grad_norm=1.0, betas=(0.9, 0.999)):
        """On CPU (`blocked_update`), W_enc and W_dec updated a block of latents at a time, in
        place under `compile_step` (`update` module notes); elsewhere the spec's update."""
        rows = block_rows(params) if self.blocked_update else None
        if rows is None:
            return super().update(params, grads, opt_state, lr, max_grad_norm, betas)
        return blocked_update(params, grads, opt_state, lr, max_grad_norm, betas, rows)

    def lazy_update(self, params, grads, opt_state, lr, max_grad_norm=1.0, betas=(0.9, 0.999)):
        """Lazy Adam reading and writing the touched rows only (`lazy.lazy_update`), or the
        spec's (masked, dense) on dense gradients."""
        if isinstance(grads["W_dec"], lazy.Rows):
            return lazy.lazy_update(params, grads, opt_state, lr, max_grad_norm, betas)
        return super().lazy_update(params, grads, opt_state, lr, max_grad_norm, betas)

    def compile_step(self, step_fn):
        """step_fn(params, opt_state, x, lr, dead_mask=None, select_bias=None): the shared train step with backend
        and cfg bound.  `jax.jit` with donated params/optimiser buffers (`compile.compile_step`)."""
        return _compile.compile_step(step_fn, self._step_trace)

    @contextlib.contextmanager
    def _step_trace(self, capacity, dead_cap=None):
        self._trace = lazy.StepTrace(capacity, dead_cap)
        try:
            yield self._trace
        finally:
            self._trace = None

    def block_until_ready(self, tree):
        return jax.block_until_ready(tree)

    def device_name(self) -> str:
        device = jax.devices()[0]
        return f"jax {device.platform} ({device.device_kind})"

    def compile_forward(self, forward_fn):
        """forward_fn(params, x, dead_mask=None, select_bias=None): `core.spec.forward` with cfg and backend
        bound -> its `jax.jit` (`compile.compile_forward`)."""
        return _compile.compile_forward(forward_fn)


def _starts_on_cpu() -> bool:
    """Whether JAX's default backend will be the CPU, told without starting one: $JAX_PLATFORMS
    (`jax_platforms`) names cpu first, or none is set and no accelerator (a `jax_plugins` PJRT
    plugin, libtpu) is installed.  False where an accelerator may be the default."""
    platforms = jax.config.jax_platforms
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    return not importlib.metadata.entry_points(group="jax_plugins") and importlib.util.find_spec("libtpu") is None


class _RowSinks:
    """While `loss_and_row_grads` traces the forward pass: the latent-row parameters (constants
    there), the zero sinks that receive their gradients, and the touched ids the encoder found
    (which the decodes after it use)."""

    def __init__(self, latent: dict, sinks: dict, shared_decoder):
        self.latent, self.sinks, self.shared_decoder = latent, sinks, shared_decoder
        self.ids = self.count = None

    def owns_encoder(self, W_enc, keep_acts: bool) -> bool:
        if W_enc is not self.latent["W_enc"]:
            return False
        if keep_acts:
            raise RuntimeError("lazy Adam's row gradients need the encoder without its dense acts")
        return True

    def owns_decoder(self, table) -> bool:
        """Whether `table` is W_dec's (M, d) view (the spec passes W_dec_shared as it is)."""
        W_dec = self.latent["W_dec"]
        return table is not self.shared_decoder and table.shape[0] == W_dec.shape[0] * W_dec.shape[1]

    def encode(self, x, b_pre, W_enc, b_enc, expert, k, mode, dead=None, aux_k=0):
        out, self.ids, self.count = encode_topk_rows(x, b_pre, W_enc, b_enc, expert, k, mode, dead, aux_k,
                                                      self.sinks)
        return out

    def decode(self, values, indices, table, mode):
        if self.ids is None:
            raise RuntimeError("lazy Adam's row gradients: the routed decode ran before the encoder")
        return decode_rows(mode, values, indices, table, self.ids, self.sinks["W_dec"])

    def captured(self):
        """(ids, count) of the step; an error if the forward pass never ran the row encoder."""
        if self.ids is None:
            raise RuntimeError("lazy Adam's row gradients: the forward pass did not run the fused encoder")
        return self.ids, self.count
