"""NumPy reference backend: the spec on NumPy arrays, with hand-derived gradients."""

from __future__ import annotations

import array_api_compat.numpy as np_xp
import numpy as np

from switchsae.core.backend import Backend
from switchsae.core.spec import trace

from .gradients import loss_gradients


class NumpyBackend(Backend):
    name = "numpy"
    xp = np_xp
    dtypes = ("float32", "float16", "float64")

    def asarray(self, a, dtype=None):
        if hasattr(a, "detach"):  # a torch tensor
            a = a.detach().float().cpu().numpy() if str(a.dtype) == "torch.bfloat16" else a.detach().cpu().numpy()
        out = np.asarray(a)
        return out.astype(self.dtype(dtype), copy=False) if dtype is not None else out

    def to_numpy(self, a):
        return np.asarray(a)

    def topk(self, acts, k):
        # stable descending order via argsort of the negation: lower index first on ties
        indices = np.argsort(-acts, axis=-1, kind="stable")[:, :k]
        return np.take_along_axis(acts, indices, axis=-1), indices

    def scatter_add(self, target, indices, values):
        out = np.array(target, copy=True)
        np.add.at(out, indices, values)
        return out

    def loss_and_grads(self, params, x, cfg, dead_mask=None, select_bias=None):
        t = trace(params, x, cfg, self, dead_mask, select_bias=select_bias)
        return t.out, loss_gradients(params, x, cfg, t, dead_mask)
