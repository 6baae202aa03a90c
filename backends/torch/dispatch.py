"""Token dispatch: sort tokens by expert once, then run every expert's matmul as ONE grouped GEMM.

`torch.nn.functional.grouped_mm` (torch >= 2.9; `torch._grouped_mm` before) multiplies
consecutive row blocks of a (T, d) matrix by per-group (d, m) matrices.  It needs 16-byte aligned
strides and a supported dtype (float32 / bfloat16 / float16 on CPU in torch 2.13; CUDA has
wanted bfloat16 on sm80+), probed once per device and dtype; anything else takes
`grouped_matmul_loop`, a loop over experts with the same result."""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .sparse import counts

_grouped_mm = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


class Routing(NamedTuple):
    """perm: (T,) int64, token ids sorted by expert (stable), None with one expert (tokens are
    already in order); ends: (N,) int32, the end of each expert's block of rows in the sorted
    order (cumulative token counts)."""

    perm: torch.Tensor | None
    ends: torch.Tensor


def route(expert: torch.Tensor, n_experts: int) -> Routing:
    """expert: (T,) int -> Routing (a stable argsort and cumulative counts; no host sync)."""
    perm = torch.argsort(expert, stable=True) if n_experts > 1 else None
    return Routing(perm, torch.cumsum(counts(expert, n_experts), 0).to(torch.int32))


def sort_rows(t: torch.Tensor, perm: torch.Tensor | None) -> torch.Tensor:
    """Rows of t (T, ...) taken in `perm` order; t itself when perm is None."""
    return t if perm is None else t.index_select(0, perm)


def unsort_rows(t_sorted: torch.Tensor, perm: torch.Tensor | None) -> torch.Tensor:
    """The inverse of `sort_rows`: rows in `perm` order -> rows in the original order."""
    if perm is None:
        return t_sorted
    return torch.empty_like(t_sorted).index_copy_(0, perm, t_sorted)


def _aligned(t: torch.Tensor) -> bool:
    """Every non-unit stride (size-1 dimensions included, as grouped_mm checks) and the data
    pointer are multiples of 16 bytes."""
    size = t.element_size()
    return all(s * size % 16 == 0 for s in t.stride() if s != 1) and t.data_ptr() % 16 == 0


def grouped_mm_supported(x: torch.Tensor, W: torch.Tensor) -> bool:
    """Whether the native grouped GEMM takes x: (T, d) and W: (N, d, m) as they are."""
    if _grouped_mm is None or x.dtype != W.dtype or x.device != W.device:
        return False
    out_row_bytes = W.shape[-1] * W.element_size()
    return _aligned(x) and _aligned(W) and out_row_bytes % 16 == 0 and _native_ok(x.device, x.dtype)


@functools.cache
def _native_ok(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether this torch runs grouped_mm for `dtype` on `device` (probed once on tiny inputs:
    support differs across versions and GPUs, e.g. CUDA wanted bfloat16 on sm80+)."""
    x = torch.ones((4, 16), dtype=dtype, device=device)  # 16 elements: 16-byte aligned rows
    W = torch.ones((2, 16, 16), dtype=dtype, device=device)
    try:
        out = _grouped_mm(x, W, offs=torch.tensor([1, 4], dtype=torch.int32, device=device))
    except (RuntimeError, NotImplementedError):
        return False
    return bool(torch.all(out == 16))


@torch.library.custom_op("switchsae::grouped_matmul", mutates_args=())
def grouped_matmul(x_sorted: torch.Tensor, W: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """x_sorted: (T, d) rows grouped by expert; W: (N, d, m); ends: (N,) int32 -> (T, m),
    row block e multiplied by W[e].  A custom op, so torch.compile treats it as one opaque call
    (grouped_mm's meta function rejects float32, which CPU runs)."""
    if grouped_mm_supported(x_sorted, W):
        return _grouped_mm(x_sorted, W, offs=ends)
    return grouped_matmul_loop(x_sorted, W, ends)


@grouped_matmul.register_fake
def _(x_sorted, W, ends):
    return x_sorted.new_empty((x_sorted.shape[0], W.shape[-1]))


def grouped_matmul_loop(x_sorted: torch.Tensor, W: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """The fallback: one matmul per expert block (reads `ends` on the host)."""
    out = x_sorted.new_empty((x_sorted.shape[0], W.shape[-1]))
    start = 0
    for e, end in enumerate(ends.tolist()):
        torch.mm(x_sorted[start:end], W[e], out=out[start:end])
        start = end
    return out
