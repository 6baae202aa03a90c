"""`Backend`: what every backend provides.  The spec calls these hooks; the defaults here are
the standard-ops definitions, which a backend overrides with its fast paths."""

from __future__ import annotations

import numpy as np

from .config import DTYPES
from .experts import decode_reference, encode_reference, relu
from .topk import topk_reference


class Backend:
    """Base adapter.  Subclasses set `name`, `xp` (an Array API namespace) and implement the
    array conversions, `scatter_add` and `loss_and_grads`; they may override any hook."""

    name = "abstract"
    xp = None
    extra = ""  # pip extra that installs this backend
    dtypes = DTYPES

    # -- arrays ---------------------------------------------------------------------------
    def dtype(self, name: str):
        """The native dtype for a config dtype name."""
        if name not in self.dtypes:
            raise TypeError(
                f"backend {self.name!r} does not support dtype {name!r}; supported: {self.dtypes}"
            )
        return getattr(self.xp, name)

    def asarray(self, a, dtype: str | None = None):
        """NumPy or native array -> native array (optionally cast to a config dtype name)."""
        raise NotImplementedError

    def to_numpy(self, a) -> np.ndarray:
        """Native array -> NumPy array (bfloat16 comes back as float32)."""
        raise NotImplementedError

    # -- spec hooks (override with fast paths) --------------------------------------------
    def topk(self, acts, k: int):
        """acts: (batch, m) -> (values, indices): (batch, k) each, largest first."""
        return topk_reference(acts, k, self.xp)

    def encode(self, x_centered, W_enc, b_enc, expert):
        """x_centered: (batch, d), W_enc: (N, d, m), expert: (batch,) -> pre-activations (batch, m)."""
        return encode_reference(x_centered, W_enc, b_enc, expert, self.xp)

    def encode_topk(self, x, b_pre, W_enc, b_enc, expert, k: int, keep_acts: bool = True):
        """`encode` of x - b_pre, relu and `topk` in one hook, so that a backend can fuse them
        (and give the encoder a backward that touches only the k kept latents).  x: (batch, d);
        b_pre: (d,); the rest as `encode` -> acts (batch, m) = relu(pre-activations), which a
        backend may return as None when not keep_acts; values, indices: (batch, k) = topk(acts)."""
        acts = relu(self.encode(x - b_pre, W_enc, b_enc, expert), self.xp)
        values, indices = self.topk(acts, k)
        return acts, values, indices

    def decode(self, values, indices, W_dec_flat):
        """values, indices: (batch, k); W_dec_flat: (N*m, d) -> (batch, d)."""
        return decode_reference(values, indices, W_dec_flat, self.xp)

    def scatter_add(self, target, indices, values):
        """Return target with values[j] added at row indices[j], duplicates accumulating.

        target: (n, ...); indices: (j,) int; values: (j, ...)."""
        raise NotImplementedError

    def stop_gradient(self, a):
        """a, excluded from differentiation (identity for non-autograd backends)."""
        return a

    # -- training -------------------------------------------------------------------------
    def loss_and_grads(self, params: dict, x, cfg, dead_mask=None):
        """-> (ForwardOutput, grads: dict name -> array like params)."""
        raise NotImplementedError

    def update(self, params: dict, grads: dict, opt_state, lr, max_grad_norm=1.0, betas=(0.9, 0.999)):
        """The optimiser half of the train step (`core.train_step.apply_update`).  A backend may
        fuse it and update in place (arguments donated): callers use the returned values.
        -> (params, opt_state)."""
        from .train_step import apply_update

        return apply_update(self.xp, params, grads, opt_state, lr, max_grad_norm, betas)

    def compile_step(self, step_fn):
        """Wrap a pure train-step function for speed (jit); identity by default."""
        return step_fn

    def compile_forward(self, forward_fn):
        """Wrap a pure forward function (params, x, dead_mask=None) for speed; identity by default."""
        return forward_fn

    def block_until_ready(self, tree):
        """Wait for the asynchronous work that produces `tree` (timing); no-op by default."""
        return tree

    def device_name(self) -> str:
        """Where this backend computes, for benchmark records."""
        return "cpu"

    def __repr__(self) -> str:
        return f"<switchsae backend {self.name!r}>"
