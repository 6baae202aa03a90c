"""MLX backend: the spec on `mlx.core` arrays, gradients by `mx.value_and_grad`, the train
step by `mx.compile`, and native fast paths for top-k, expert encode and sparse decode."""

from __future__ import annotations

import platform

import mlx.core as mx
import numpy as np
from mlx.utils import tree_map
from switchsae.core.backend import Backend
from switchsae.core.spec import forward

from . import namespace
from .compile import compile_train_step
from .decode import decode
from .encode import encode
from .topk import topk


class MLXBackend(Backend):
    name = "mlx"
    xp = namespace
    extra = "mlx"
    dtypes = ("float32", "bfloat16")

    # -- arrays ---------------------------------------------------------------------------
    def asarray(self, a, dtype=None):
        """NumPy array, MLX array or nested sequence -> mx.array (float64 input becomes
        float32, MLX's widest float on every device), optionally cast to a config dtype."""
        out = a if isinstance(a, mx.array) else mx.array(np.asarray(a))
        return out.astype(self.dtype(dtype)) if dtype is not None else out

    def to_numpy(self, a) -> np.ndarray:
        return np.array(a.astype(mx.float32) if a.dtype == mx.bfloat16 else a)

    def scatter_add(self, target, indices, values):
        return target.at[indices].add(values)

    # -- spec hooks -----------------------------------------------------------------------
    def topk(self, acts, k):
        return topk(acts, k)

    def encode(self, x_centered, W_enc, b_enc, expert):
        return encode(x_centered, W_enc, b_enc, expert)

    def decode(self, values, indices, W_dec_flat):
        return decode(values, indices, W_dec_flat)

    def stop_gradient(self, a):
        return mx.stop_gradient(a)

    # -- training -------------------------------------------------------------------------
    def loss_and_grads(self, params, x, cfg, dead_mask=None, select_bias=None):
        """Autodiff of the spec's total loss w.r.t. the params dict (an MLX tree)."""
        return outputs_and_grads(lambda p: forward(p, x, cfg, self, dead_mask, select_bias), params)

    def compile_step(self, step_fn):
        """step_fn(params, opt_state, x, lr, dead_mask=None, select_bias=None), see
        `compile.compile_train_step`."""
        return compile_train_step(step_fn)

    # -- timing ---------------------------------------------------------------------------
    def block_until_ready(self, tree):
        """Evaluate MLX's lazy graph for every array in `tree`; returns `tree`."""
        mx.eval(tree)
        return tree

    def device_name(self) -> str:
        """e.g. "mlx gpu (Apple M2 Max, Darwin arm64)" or "mlx cpu (AMD EPYC, Linux x86_64)"."""
        device = mx.default_device()
        chip = mx.device_info(device).get("device_name", "unknown")
        return f"mlx {device.type.name} ({chip}, {platform.system()} {platform.machine()})"


def outputs_and_grads(run, params):
    """run(params) -> ForwardOutput.  -> (ForwardOutput, d losses["total"] / d params).

    The outputs leave `mx.value_and_grad` as copies: under `mx.compile`, MLX 0.32 fails
    (IndexError "_Map_base::at") when an auxiliary output of a differentiated function is a
    common subexpression of its loss graph, as `expert = experts[:, 0]` is in the spec."""

    def loss(p):
        out = run(p)
        return out.losses["total"], tree_map(mx.array, out)

    (_, out), grads = mx.value_and_grad(loss)(params)
    return out, grads
