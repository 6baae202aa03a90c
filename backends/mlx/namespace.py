"""An Array API namespace over `mlx.core`, limited to what `switchsae.core` uses.

`array_api_compat` does not wrap MLX, and raw `mlx.core` differs from the standard in
signatures (`argsort` has no `descending`/`stable`, `astype` is a method, creation functions
take `stream=` instead of `device=`) and in index dtypes (uint32).  Each function below has the
standard's signature; the spec runs on it unchanged.  Index-valued results are int32 so that
index arithmetic (e*m + i) stays signed.

Importing this module also gives `mlx.core.array` the standard's `device` attribute (the
default device: MLX arrays live in unified memory and have none of their own), which the spec
reads through `array_api_compat.device`.
"""

from __future__ import annotations

import builtins

import mlx.core as mx

if not hasattr(mx.array, "device"):  # guarded: a future MLX may define it
    mx.array.device = property(lambda self: mx.default_device())

INDEX_DTYPE = mx.int32

float32 = mx.float32
bfloat16 = mx.bfloat16
inf = float("inf")

# element-wise and reductions whose MLX signatures already match the standard for our use
exp = mx.exp
log = mx.log
sqrt = mx.sqrt
maximum = mx.maximum
minimum = mx.minimum
where = mx.where
max = mx.max  # noqa: A001
min = mx.min  # noqa: A001
mean = mx.mean
sum = mx.sum  # noqa: A001
any = mx.any  # noqa: A001


def astype(x, dtype, /, *, copy: bool = True, device=None):
    return x.astype(dtype)


def reshape(x, /, shape, *, copy=None):
    return mx.reshape(x, shape)


def concat(arrays, /, *, axis=0):
    return mx.concatenate(list(arrays), axis=axis)


def permute_dims(x, /, axes):
    return mx.transpose(x, axes)


def matrix_transpose(x, /):
    """Swap the last two axes."""
    return mx.swapaxes(x, -1, -2)


def take(x, indices, /, *, axis=None):
    """Integer indices carry no gradient; detaching them is what lets `mx.grad` differentiate
    through a gather whose indices depend on the parameters (e.g. the chosen expert)."""
    return mx.take(x, mx.stop_gradient(indices), axis=axis)


def take_along_axis(x, indices, /, *, axis=-1):
    return mx.take_along_axis(x, mx.stop_gradient(indices), axis=axis)


def argmax(x, /, *, axis=None, keepdims: bool = False):
    """Index of the first maximum (MLX returns the first occurrence on ties)."""
    return mx.argmax(x, axis=axis, keepdims=keepdims).astype(INDEX_DTYPE)


def argsort(x, /, *, axis: int = -1, descending: bool = False, stable: bool = True):
    """Indices that sort x along `axis`; equal elements keep their original order.

    MLX's argsort is ascending and stable (CPU: std::stable_sort with an index tie-break;
    Metal: a stable merge sort).  Descending order sorts the reversed array ascending and
    reverses the result back, so ties stay in original order without negating values."""
    if not descending:
        return mx.argsort(x, axis=axis).astype(INDEX_DTYPE)
    n = x.shape[axis]
    flipped = _flip(x, axis)
    order = _flip(mx.argsort(flipped, axis=axis).astype(INDEX_DTYPE), axis)
    return (n - 1) - order


def _flip(x, axis: int):
    index = [slice(None)] * x.ndim
    index[axis] = slice(None, None, -1)
    return x[tuple(index)]


# -- creation: `device` maps to MLX's `stream` (a Device is accepted there) ------------------

def asarray(obj, /, *, dtype=None, device=None, copy=None):
    if isinstance(obj, mx.array):
        return obj if dtype is None else obj.astype(dtype)
    return mx.array(obj, dtype=dtype)


def arange(start, /, stop=None, step=1, *, dtype=None, device=None):
    if stop is None:
        start, stop = 0, start
    return mx.arange(start, stop, step, dtype=dtype or _default_arange_dtype(start, stop, step),
                     stream=device)


def _default_arange_dtype(*bounds):
    return float32 if builtins.any(isinstance(b, float) for b in bounds) else INDEX_DTYPE


def ones(shape, *, dtype=None, device=None):
    return mx.ones(shape, dtype=dtype or float32, stream=device)


def ones_like(x, /, *, dtype=None, device=None):
    return mx.ones_like(x, dtype=dtype, stream=device)


def zeros_like(x, /, *, dtype=None, device=None):
    return mx.zeros_like(x, dtype=dtype, stream=device)


def full_like(x, /, fill_value, *, dtype=None, device=None):
    return mx.full(x.shape, fill_value, dtype=dtype or x.dtype, stream=device)
