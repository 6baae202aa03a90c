"""`jax.jit` wrappers for the shared train step and forward pass.

The functions given here have the backend and config already bound (a closure, e.g.
`functools.partial(core.train_step.train_step, backend, cfg)`), so they are static to jit.
Arrays (params, optimiser state, x, lr, dead_mask and every index array derived from them)
are jit arguments, never baked-in constants."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from .auxk import dead_cap as dead_cap_of
from .lazy import next_capacity


def compile_step(step_fn, step_trace):
    """step_fn(params, opt_state, x, lr, dead_mask=None, select_bias=None) -> (params, opt_state, ForwardOutput):
    the shared train step with backend and cfg bound.  Returns the jit-compiled equivalent.

    The `params` and `opt_state` buffers are DONATED: the arrays passed in are invalid after
    the call; use the returned ones.  `opt_state.step` is carried as an int32 jnp scalar
    (a Python int is converted), so the step count never triggers a recompile; neither does
    a Python-float lr (`core.optim` keeps bfloat16 parameters bfloat16).

    step_trace(capacity): the backend's context manager giving the `lazy.StepTrace` of one
    trace.  A step with lazy Adam's row gradients reports its touched count, which is read back
    (a sync per step): at a count over its row capacity the step, which then changed nothing,
    runs again at the next capacity (`lazy` module notes); a dense step is not waited for.
    With a dead mask, once a trace has shown that the step's AuxK can use it, the experts' most
    dead latents are read back before each step (a sync) and bucketed into a static cap
    (`auxk.dead_cap`): AuxK then runs as dense products over the dead columns (`auxk`)."""

    dead_shape = None  # (N, m) once a trace's AuxK could use a cap on the dead counts

    def traced(capacity, dead_cap, params, opt_state, x, lr, dead_mask, select_bias):
        nonlocal dead_shape
        with step_trace(capacity, dead_cap) as trace:
            result = step_fn(params, opt_state, x, lr, dead_mask, select_bias)
        dead_shape = trace.dead_shape or dead_shape
        return result, trace.outputs()

    jitted = jax.jit(traced, static_argnums=(0, 1), donate_argnums=(2, 3))
    capacity = None  # the row capacity of the next step (None: the bound)
    dead_cap = None  # the cap on the experts' dead counts of the last step (`auxk.dead_cap`)

    def step(params, opt_state, x, lr, dead_mask=None, select_bias=None):
        nonlocal capacity, dead_cap
        opt_state = _step_as_array(opt_state)
        cap = None
        if dead_mask is not None and dead_shape is not None:
            cap = dead_cap = dead_cap_of(int(_max_dead(dead_mask, dead_shape)), dead_shape[1], dead_cap)
        while True:
            result, rows = jitted(capacity, cap, params, opt_state, x, lr, dead_mask, select_bias)
            if rows is None:
                return result
            count, used, bound = (int(a) for a in jax.device_get(rows))
            capacity = next_capacity(capacity, count, used, bound)
            if count <= used:
                return result
            params, opt_state = result[0], result[1]  # unchanged: run again with more rows

    return step


def compile_forward(forward_fn):
    """forward_fn(params, x, dead_mask=None, select_bias=None) -> ForwardOutput (`core.spec.forward` with cfg
    and backend bound).  Returns the jit-compiled equivalent; nothing is donated."""
    jitted = jax.jit(forward_fn)

    def forward(params, x, dead_mask=None, select_bias=None):
        return jitted(params, x, dead_mask, select_bias)

    return forward


@functools.partial(jax.jit, static_argnums=(1,))
def _max_dead(dead_mask, shape):
    """The most dead latents of one expert: dead_mask (total latents,) bool, the routed N * m first."""
    n, m = shape
    return jnp.max(jnp.sum(dead_mask[:n * m].reshape(n, m), axis=1, dtype=jnp.int32))


def _step_as_array(opt_state):
    """AdamState with `step` as a jnp int32 scalar (weakly typed when it was a Python int,
    matching what the compiled step returns, so the first and later calls share one trace)."""
    if isinstance(opt_state.step, jax.Array):
        return opt_state
    return opt_state._replace(step=jnp.asarray(int(opt_state.step)))

