"""Triton kernels for the sparse products of `sparse.py` (used for CUDA tensors).

Same contracts as `sparse.gather_sum / sampled_dot` (scatter_outer is gather_sum over the
transposed pattern, so it needs no kernel of its own, nor atomics); inputs are loaded in their
own dtype and accumulated in float32.  Run on CPU tensors with TRITON_INTERPRET=1 (set before
triton is imported) to test them without a GPU.

  gather_sum:  one program per (row, d-block); loops over the row's entries (the sparse decode
               forward, the decoder/encoder weight gradients, the encoder input gradient).
  sampled_dot: one program per block of entries; loops over d in blocks (the decode's
               d/d values)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_D = 128
BLOCK_NNZ = 32


@triton.jit
def _gather_sum_kernel(row_ptr, cols, weights, table, out, d, stride_table, stride_out,
                       BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < d
    start = tl.load(row_ptr + row)
    end = tl.load(row_ptr + row + 1)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for j in range(start, end):
        col = tl.load(cols + j)
        w = tl.load(weights + j).to(tl.float32)
        acc += w * tl.load(table + col * stride_table + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out + row * stride_out + offs, acc.to(out.dtype.element_ty), mask=mask)


@triton.jit
def _sampled_dot_kernel(rows, cols, src, table, out, nnz, d, stride_src, stride_table,
                        BLOCK_N: tl.constexpr, BLOCK: tl.constexpr):
    entries = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    emask = entries < nnz
    r = tl.load(rows + entries, mask=emask, other=0)
    c = tl.load(cols + entries, mask=emask, other=0)
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for d0 in range(0, d, BLOCK):
        offs = d0 + tl.arange(0, BLOCK)
        mask = emask[:, None] & (offs < d)[None, :]
        a = tl.load(src + r[:, None] * stride_src + offs[None, :], mask=mask, other=0.0)
        b = tl.load(table + c[:, None] * stride_table + offs[None, :], mask=mask, other=0.0)
        acc += tl.sum(a.to(tl.float32) * b.to(tl.float32), axis=1)
    tl.store(out + entries, acc.to(out.dtype.element_ty), mask=emask)


def gather_sum(p, weights, table):
    """-> (n_rows, d): out[r] = sum_{j in row r} weights[j] * table[cols[j]]."""
    table = table.contiguous()
    d = table.shape[1]
    out = torch.empty((p.n_rows, d), dtype=table.dtype, device=table.device)
    if p.n_rows:
        grid = (p.n_rows, triton.cdiv(d, BLOCK_D))
        _gather_sum_kernel[grid](p.row_ptr, p.cols, weights.contiguous(), table, out, d,
                                 table.stride(0), out.stride(0), BLOCK=BLOCK_D)
    return out


def sampled_dot(p, src, table):
    """-> (nnz,): out[j] = <src[rows[j]], table[cols[j]]>."""
    src, table = src.contiguous(), table.contiguous()
    nnz = p.cols.shape[0]
    out = torch.empty(nnz, dtype=src.dtype, device=src.device)
    if nnz:
        grid = (triton.cdiv(nnz, BLOCK_NNZ),)
        _sampled_dot_kernel[grid](p.rows, p.cols, src, table, out, nnz, src.shape[1],
                                  src.stride(0), table.stride(0), BLOCK_N=BLOCK_NNZ, BLOCK=BLOCK_D)
    return out
