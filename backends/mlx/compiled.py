"""`mx.compile` for the shared train step (`switchsae.core.train_step.train_step`).

`mx.compile` treats Python numbers as constants and retraces whenever one changes, so the Adam
step count and the learning rate enter the compiled graph as MLX scalars (int32, float32).
Those scalars would promote bfloat16 parameters and moments to float32 in `core.optim`, so the
compiled step casts its results back to the dtypes it was given."""

from __future__ import annotations

import mlx.core as mx
from switchsae.core.optim import AdamState


def compile_train_step(step_fn):
    """step_fn(params, opt_state, x, lr, dead_mask=None) -> (params, opt_state, ForwardOutput):
    the shared train step with its backend and config bound.  Returns a function of the same
    signature running one compiled graph per (shapes, dtypes, dead_mask given or not).
    opt_state.step may be a Python int (as `adam_init` makes it); it comes back an int32 array."""

    def pinned(params, opt_state, x, lr, dead_mask):
        new_params, new_state, out = step_fn(params, opt_state, x, lr, dead_mask)
        new_state = AdamState(new_state.step, _cast_like(new_state.m, opt_state.m),
                              _cast_like(new_state.v, opt_state.v))
        return _cast_like(new_params, params), new_state, out

    compiled = mx.compile(pinned)

    def step(params, opt_state, x, lr, dead_mask=None):
        if not isinstance(opt_state.step, mx.array):
            opt_state = opt_state._replace(step=mx.array(opt_state.step, dtype=mx.int32))
        if not isinstance(lr, mx.array):
            lr = mx.array(lr, dtype=mx.float32)
        return compiled(params, opt_state, x, lr, dead_mask)

    return step


def _cast_like(new: dict, old: dict) -> dict:
    return {name: a.astype(old[name].dtype) for name, a in new.items()}
