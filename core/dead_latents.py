"""Dead-latent tracking: tokens since each latent last fired."""


def update_tokens_since_fired(counter, top_indices, top_values, backend):
    """counter: (M,) tokens since each latent fired; top_indices/values: (batch / R, k), this
    process's tokens of a batch split over R = backend.world_size processes.  -> the updated
    counter, equal on every process: reset where any process fired a latent with a non-zero
    value, else advanced by the whole batch (backend.all_sum sums the (M,) hit counts)."""
    xp = backend.xp
    flat_idx = xp.reshape(top_indices, (-1,))
    fired = xp.astype(xp.reshape(top_values, (-1,)) != 0, counter.dtype)
    hits = backend.all_sum(backend.scatter_add(xp.zeros_like(counter), flat_idx, fired))
    return xp.where(hits > 0, xp.zeros_like(counter), counter + top_indices.shape[0] * backend.world_size)


def dead_mask(counter, dead_tokens: int):
    """(M,) bool: latents silent for at least `dead_tokens` tokens."""
    return counter >= dead_tokens
