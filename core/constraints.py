"""Decoder unit-norm constraint, as SAE trainers apply it each step."""


def normalize_decoder(W_dec, xp):
    """Rescale every decoder row to unit norm.  W_dec: (N, m, d)."""
    norms = xp.sqrt(xp.sum(W_dec * W_dec, axis=-1, keepdims=True))
    return W_dec / (norms + 1.1920929e-07)


def remove_parallel_grad(grad_W_dec, W_dec, xp):
    """Drop the gradient component along each (unit) decoder row.  Both: (N, m, d)."""
    parallel = xp.sum(grad_W_dec * W_dec, axis=-1, keepdims=True)
    return grad_W_dec - parallel * W_dec
