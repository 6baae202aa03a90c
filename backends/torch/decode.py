"""Sparse decode: x_hat[t] = sum_j values[t, j] W_dec_flat[indices[t, j]], W_dec as one (N*m, d)
table, with a sparse backward: the table gradient touches only the selected rows and the values
gradient is one dot product per selected row.  No dense (T, N*m) or (T, m) activation exists."""

from __future__ import annotations

import torch

from .sparse import fixed_pattern, gather_sum, sampled_dot, scatter_outer


class SparseDecode(torch.autograd.Function):
    """(values (T, k), indices (T, k) int, table (M, d)) -> (T, d)."""

    @staticmethod
    def forward(ctx, values, indices, table):
        pattern = fixed_pattern(indices, table.shape[0])
        ctx.save_for_backward(values, indices, table)
        return gather_sum(pattern, values.reshape(-1), table)

    @staticmethod
    def backward(ctx, grad_out):
        values, indices, table = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        pattern = fixed_pattern(indices, table.shape[0])
        grad_values = grad_table = None
        if ctx.needs_input_grad[0]:
            grad_values = sampled_dot(pattern, grad_out, table).view(values.shape)
        if ctx.needs_input_grad[2]:
            grad_table = scatter_outer(pattern, values.reshape(-1), grad_out)
        return grad_values, None, grad_table


def decode(values, indices, table):
    """values, indices: (T, k); table: (N*m, d) -> (T, d)."""
    return SparseDecode.apply(values, indices, table)
