"""Decoder unit-norm constraint, as SAE trainers apply it each step."""

DECODERS = ("W_dec", "W_dec_shared")  # parameters whose rows (last axis) are unit-norm directions
NORM_EPS = 1.1920929e-07  # float32 epsilon, guarding the division by a row norm


def normalize_decoder(W_dec, xp):
    """Rescale every decoder row to unit norm.  W_dec: (..., d)."""
    norms = xp.sqrt(xp.sum(W_dec * W_dec, axis=-1, keepdims=True))
    return W_dec / (norms + NORM_EPS)


def remove_parallel_grad(grad_W_dec, W_dec, xp):
    """Drop the gradient component along each (unit) decoder row.  Both: (..., d)."""
    parallel = xp.sum(grad_W_dec * W_dec, axis=-1, keepdims=True)
    return grad_W_dec - parallel * W_dec
