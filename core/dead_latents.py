"""Dead-latent tracking: tokens since each latent last fired."""


def update_tokens_since_fired(counter, top_indices, top_values, backend):
    """counter: (M,) tokens since each latent fired; top_indices/values: (batch, k).
    -> updated counter: reset where a latent fired with a non-zero value in this batch."""
    xp = backend.xp
    flat_idx = xp.reshape(top_indices, (-1,))
    fired = xp.astype(xp.reshape(top_values, (-1,)) != 0, counter.dtype)
    hits = backend.scatter_add(xp.zeros_like(counter), flat_idx, fired)
    return xp.where(hits > 0, xp.zeros_like(counter), counter + top_indices.shape[0])


def dead_mask(counter, dead_tokens: int):
    """(M,) bool: latents silent for at least `dead_tokens` tokens."""
    return counter >= dead_tokens
