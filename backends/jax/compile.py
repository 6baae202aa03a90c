"""`jax.jit` wrappers for the shared train step and forward pass.

The functions given here have the backend and config already bound (a closure, e.g.
`functools.partial(core.train_step.train_step, backend, cfg)`), so they are static to jit.
Arrays (params, optimiser state, x, lr, dead_mask and every index array derived from them)
are jit arguments, never baked-in constants."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .lazy import next_capacity


def compile_step(step_fn, step_trace):
    """step_fn(params, opt_state, x, lr, dead_mask=None) -> (params, opt_state, ForwardOutput):
    the shared train step with backend and cfg bound.  Returns the jit-compiled equivalent.

    The `params` and `opt_state` buffers are DONATED: the arrays passed in are invalid after
    the call; use the returned ones.  `opt_state.step` is carried as an int32 jnp scalar
    (a Python int is converted), so the step count never triggers a recompile; neither does
    a Python-float lr (`core.optim` keeps bfloat16 parameters bfloat16).

    step_trace(capacity): the backend's context manager giving the `lazy.StepTrace` of one
    trace.  A step with lazy Adam's row gradients reports its touched count, which is read back
    (a sync per step): at a count over its row capacity the step, which then changed nothing,
    runs again at the next capacity (`lazy` module notes); a dense step is not waited for."""

    def traced(capacity, params, opt_state, x, lr, dead_mask):
        with step_trace(capacity) as trace:
            result = step_fn(params, opt_state, x, lr, dead_mask)
        return result, trace.outputs()

    jitted = jax.jit(traced, static_argnums=(0,), donate_argnums=(1, 2))
    capacity = None  # the row capacity of the next step (None: the bound)

    def step(params, opt_state, x, lr, dead_mask=None):
        nonlocal capacity
        opt_state = _step_as_array(opt_state)
        while True:
            result, rows = jitted(capacity, params, opt_state, x, lr, dead_mask)
            if rows is None:
                return result
            count, used, bound = (int(a) for a in jax.device_get(rows))
            capacity = next_capacity(capacity, count, used, bound)
            if count <= used:
                return result
            params, opt_state = result[0], result[1]  # unchanged: run again with more rows

    return step


def compile_forward(forward_fn):
    """forward_fn(params, x, dead_mask=None) -> ForwardOutput (`core.spec.forward` with cfg
    and backend bound).  Returns the jit-compiled equivalent; nothing is donated."""
    jitted = jax.jit(forward_fn)

    def forward(params, x, dead_mask=None):
        return jitted(params, x, dead_mask)

    return forward


def _step_as_array(opt_state):
    """AdamState with `step` as a jnp int32 scalar (weakly typed when it was a Python int,
    matching what the compiled step returns, so the first and later calls share one trace)."""
    if isinstance(opt_state.step, jax.Array):
        return opt_state
    return opt_state._replace(step=jnp.asarray(int(opt_state.step)))

