"""Expert encoder with a grouped-GEMM forward and a sparse backward.

Forward: tokens sorted by expert, one grouped GEMM, unsorted: only each token's own expert runs.
Backward: after ReLU and TopK the gradient reaching the pre-activations is non-zero at most at
the k (+ AuxK) kept positions of each row, so both gradients are sparse products over those
entries (Gao et al. 2024): with c = expert * m + i the global latent of entry (t, i),
  dW_enc[e][:, i] = sum_t g[t, i] x[t]   (scatter_outer into the (N*m, d) transposed table)
  dx[t]           = sum_i g[t, i] W_enc[e][:, i]   (gather_sum from that table)
so nothing of size (T, N*m) or (T, N, m) is ever formed.  Both products read and write W_enc
as an (N*m, d) table of latent rows: with a `latent_major` W_enc that is a view, otherwise a
transposed copy each way."""

from __future__ import annotations

import torch

from .dispatch import grouped_matmul, route
from .sparse import accumulation_dtype, gather_sum, row_pattern, scatter_outer


class ExpertEncode(torch.autograd.Function):
    """(x_centered (T, d), W_enc (N, d, m), b_enc (N, m) or None, expert (T,)) -> pre (T, m)."""

    @staticmethod
    def forward(ctx, x_centered, W_enc, b_enc, expert):
        routing = route(expert, W_enc.shape[0])
        if W_enc.shape[0] == 1:  # one expert (a plain TopK SAE): tokens are already in order
            pre = grouped_matmul(x_centered, W_enc, routing.ends)
        else:
            pre = torch.empty((x_centered.shape[0], W_enc.shape[-1]), dtype=x_centered.dtype,
                              device=x_centered.device)
            pre[routing.perm] = grouped_matmul(x_centered[routing.perm], W_enc, routing.ends)
        if b_enc is not None:
            pre += b_enc[expert]
        ctx.save_for_backward(x_centered, W_enc, expert)
        ctx.has_bias = b_enc is not None
        return pre

    @staticmethod
    def backward(ctx, grad_pre):
        x_centered, W_enc, expert = ctx.saved_tensors
        n, d, m = W_enc.shape
        rows, local = torch.nonzero(grad_pre).unbind(1)  # row-major: rows ascending
        values = grad_pre[rows, local]
        pattern = row_pattern(rows, expert[rows] * m + local, grad_pre.shape[0], n * m)
        grad_x = grad_W = grad_b = None
        if ctx.needs_input_grad[0]:
            table = W_enc.transpose(1, 2).reshape(n * m, d)  # latent rows: a view if latent-major
            grad_x = gather_sum(pattern, values, table)
        if ctx.needs_input_grad[1]:
            grad_W = scatter_outer(pattern, values, x_centered).view(n, m, d).transpose(1, 2)
            if grad_W.stride() != W_enc.stride():  # give the gradient its parameter's layout
                grad_W = torch.empty_like(W_enc).copy_(grad_W)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            acc = values.new_zeros(n * m, dtype=accumulation_dtype(values.dtype))
            grad_b = acc.index_add_(0, pattern.cols, values.to(acc.dtype)).view(n, m).to(values.dtype)
        return grad_x, grad_W, grad_b, None


def latent_major(W_enc: torch.Tensor) -> torch.Tensor:
    """W_enc (N, d, m) stored with each latent's d weights contiguous (strides (d*m, 1, d)), the
    layout whose sparse backward needs no transposes; W_enc itself when it already is."""
    rows = W_enc.transpose(1, 2)
    return W_enc if rows.is_contiguous() else rows.contiguous().transpose(1, 2)


def encode(x_centered, W_enc, b_enc, expert):
    """Pre-activations of each token's own expert: (T, d), (N, d, m), (N, m) | None, (T,) -> (T, m)."""
    return ExpertEncode.apply(x_centered, W_enc, b_enc, expert)
