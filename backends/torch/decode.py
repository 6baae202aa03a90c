"""Sparse decode: x_hat[t] = sum_j values[t, j] W_dec_flat[indices[t, j]], W_dec as one (N*m, d)
table, with a sparse backward: the table gradient touches only the selected rows and the values
gradient is one dot product per selected row.  No dense (T, N*m) or (T, m) activation exists.

Rows are processed in the order of their first latent, which groups a Switch SAE's tokens by
expert: consecutive rows then read (and write) the same expert's block of the table, which stays
in cache.  On CPU that halves the cost of the gathers and scatters against token order.

Rows that then form `sparse.Runs` (blocks of consecutive rows with one index list, at least
`RUN_MIN_ROWS` rows each on average: AuxK's rows when each lists all its expert's dead latents)
decode as one GEMM per block, as does their backward."""

from __future__ import annotations

import torch

from .dispatch import sort_rows, unsort_rows
from .sparse import (Pattern, compact_cols, fixed_pattern, gather_sum, nonzero_entries, run_columns, run_gather_sum,
                     run_sampled_dot, run_scatter_outer, runs_of, sampled_dot, scatter_outer)


class SparseDecode(torch.autograd.Function):
    """(values (T, k) >= 0, indices (T, k) int, table (M, d), sink) -> (T, d).  Entries of value
    0 are left out (`core.Backend.decode`: they decode to nothing and get gradient 0), so AuxK's
    padding costs no gathers.  sink: a `lazy.RowGradients` that takes the table's gradient at the
    rows used, or None."""

    @staticmethod
    def forward(ctx, values, indices, table, sink=None):
        order = torch.argsort(indices[:, 0]) if indices.shape[1] else None
        values, indices = sort_rows(values, order), sort_rows(indices, order)
        ctx.shape, ctx.sink, runs = values.shape, sink, runs_of(indices)
        ctx.used = None if runs is None else run_columns(runs, values)  # zero weights: no work
        if ctx.used is not None:
            ctx.save_for_backward(table, order)
            return unsort_rows(run_gather_sum(ctx.used, values.shape[0], table), order)
        pattern, weights, keep = nonzero_entries(fixed_pattern(indices, table.shape[0]), values.reshape(-1))
        ctx.save_for_backward(pattern.rows, pattern.cols, pattern.row_ptr, weights, keep, table, order)
        return unsort_rows(gather_sum(pattern, weights, table), order)

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.used is not None:
            return _runs_backward(ctx, grad_out)
        rows, cols, row_ptr, weights, keep, table, order = ctx.saved_tensors
        pattern = Pattern(rows, cols, row_ptr, table.shape[0])
        grad_out = sort_rows(grad_out, order).contiguous()
        grad_values = grad_table = None
        if ctx.needs_input_grad[0]:
            dots = sampled_dot(pattern, grad_out, table)
            if keep is not None:
                dots = dots.new_zeros(ctx.shape.numel()).index_copy_(0, keep, dots)
            grad_values = unsort_rows(dots.view(ctx.shape), order)
        if ctx.needs_input_grad[2]:
            grad_table = scatter_outer(pattern, weights, grad_out)
        if ctx.sink is not None:  # lazy Adam: (rows used, d), no (M, d) table
            ids, local = compact_cols(pattern)
            ctx.sink.add("W_dec", ids, scatter_outer(local, weights, grad_out))
        return grad_values, None, grad_table, None


def _runs_backward(ctx, grad_out):
    """`SparseDecode.backward` of rows decoded as `Runs`: GEMMs per run."""
    table, order = ctx.saved_tensors
    used = ctx.used
    grad_out = sort_rows(grad_out, order).contiguous()
    grad_values = grad_table = None
    if ctx.needs_input_grad[0]:
        grad_values = unsort_rows(run_sampled_dot(used, grad_out, table), order)
    if ctx.needs_input_grad[2] or ctx.sink is not None:
        rows = run_scatter_outer(used, grad_out)
        if ctx.needs_input_grad[2]:
            grad_table = table.new_zeros(table.shape).index_add_(0, used.ids, rows)
        if ctx.sink is not None:
            ids, by_id = torch.sort(used.ids)
            ctx.sink.add("W_dec", ids, rows.index_select(0, by_id))
    return grad_values, None, grad_table, None


def decode(values, indices, table, sink=None):
    """values, indices: (T, k); table: (N*m, d) -> (T, d).  sink: see `SparseDecode`."""
    return SparseDecode.apply(values, indices, table, sink)
