"""`mx.compile` for the shared train step (`switchsae.core.train_step.train_step`).

`mx.compile` treats Python numbers as constants and retraces whenever one changes, so the Adam
step count and the learning rate enter the compiled graph as MLX scalars (int32, float32);
`core.optim` keeps bfloat16 parameters and moments bfloat16 despite the float32 lr."""

from __future__ import annotations

import mlx.core as mx


def compile_train_step(step_fn):
    """step_fn(params, opt_state, x, lr, dead_mask=None, select_bias=None) -> (params, opt_state,
    ForwardOutput): the shared train step with its backend and config bound.  Returns a function
    of the same signature running one compiled graph per (shapes, dtypes, dead_mask and
    select_bias given or not).
    opt_state.step may be a Python int (as `adam_init` makes it); it comes back an int32 array."""

    compiled = mx.compile(step_fn)

    def step(params, opt_state, x, lr, dead_mask=None, select_bias=None):
        if not isinstance(opt_state.step, mx.array):
            opt_state = opt_state._replace(step=mx.array(opt_state.step, dtype=mx.int32))
        if not isinstance(lr, mx.array):
            lr = mx.array(lr, dtype=mx.float32)
        return compiled(params, opt_state, x, lr, dead_mask, select_bias)

    return step

