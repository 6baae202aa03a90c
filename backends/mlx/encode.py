"""The expert encoder on MLX: tokens sorted by expert, one `mx.gather_mm` (MLX-LM's SwitchGLU
trick); the same pre-activations as `switchsae.core.experts.encode_reference`."""

from __future__ import annotations

import mlx.core as mx


def encode(x_centered, W_enc, b_enc, expert):
    """Pre-activations of each token's own expert, computing only that expert.

    x_centered: (batch, d); W_enc: (N, d, m); b_enc: (N, m) or None; expert: (batch,) int
    -> (batch, m).  Tokens are sorted by expert so `mx.gather_mm` multiplies contiguous runs by
    one expert matrix each (`sorted_indices=True`), then put back in their original order.
    MLX's CPU GatherMM is float32-only, so other dtypes are upcast there (Metal runs them
    natively, accumulating in float32 as the upcast does)."""
    if W_enc.dtype != mx.float32 and mx.default_device().type == mx.cpu:
        upcast = None if b_enc is None else b_enc.astype(mx.float32)
        pre = encode(x_centered.astype(mx.float32), W_enc.astype(mx.float32), upcast, expert)
        return pre.astype(W_enc.dtype)
    expert = mx.stop_gradient(expert)
    order = mx.stop_gradient(mx.argsort(expert))
    expert_sorted = expert[order]
    pre = mx.gather_mm(x_centered[order][:, None, :], W_enc,
                       rhs_indices=expert_sorted, sorted_indices=True)[:, 0, :]
    if b_enc is not None:
        pre = pre + b_enc[expert_sorted]
    return pre[mx.stop_gradient(mx.argsort(order))]
