"""Expert encode and sparse decode, in standard ops (the dense definition backends must match)."""

from .router import one_hot


def encode_reference(x_centered, W_enc, b_enc, expert, xp):
    """Pre-activations of each token's own expert.

    x_centered: (batch, d) = x - b_pre; W_enc: (N, d, m); b_enc: (N, m) or None;
    expert: (batch,) -> (batch, m).  Computes every expert densely, then selects:
    this is the definition, not a fast path.
    """
    n, d, m = W_enc.shape
    all_pre = x_centered @ xp.reshape(xp.permute_dims(W_enc, (1, 0, 2)), (d, n * m))
    all_pre = xp.reshape(all_pre, (x_centered.shape[0], n, m))
    if b_enc is not None:
        all_pre = all_pre + b_enc[None, :, :]
    chosen = one_hot(expert, n, all_pre.dtype, xp)
    return xp.sum(all_pre * chosen[:, :, None], axis=1)


def relu(pre, xp):
    """max(pre, 0), elementwise (any shape)."""
    return xp.where(pre > 0, pre, xp.zeros_like(pre))


def decode_reference(values, indices, W_dec_flat, xp):
    """Sparse decode: sum_j values[:, j] * W_dec_flat[indices[:, j]].

    values: (batch, k); indices: (batch, k) global latent ids e*m + i;
    W_dec_flat: (N*m, d) -> (batch, d).
    """
    batch, k = values.shape
    rows = xp.take(W_dec_flat, xp.reshape(indices, (batch * k,)), axis=0)
    rows = xp.reshape(rows, (batch, k, W_dec_flat.shape[-1]))
    return xp.sum(values[:, :, None] * rows, axis=1)
