"""Dead-latent tracking: tokens since each latent last fired, counting the tokens that were
routed to its expert (the only ones it can fire on)."""

from .router import expert_counts


def tokens_seen(cfg, experts, backend):
    """(M + m_s,) tokens of this batch each latent could fire on: its expert's routed tokens
    (summed over processes), every token for the shared expert's.  experts: (batch / R,) or
    (batch / R, e) this process's routing choices."""
    xp = backend.xp
    experts = experts[:, None] if experts.ndim == 1 else experts
    counts = backend.all_sum(expert_counts(experts, cfg.n_experts, xp.float32, xp))
    per_latent = counts[:, None] * xp.ones((cfg.n_experts, cfg.expert_width), dtype=xp.float32)
    routed = xp.reshape(per_latent, (-1,))
    if not cfg.shared_latents:
        return routed
    batch = xp.ones((cfg.shared_latents,), dtype=xp.float32) * float(experts.shape[0] * backend.world_size)
    return xp.concat([routed, batch])


def update_tokens_since_fired(counter, top_indices, top_values, backend, seen=None):
    """counter: (M,) tokens since each latent fired; top_indices/values: (batch / R, k), this
    process's tokens of a batch split over R = backend.world_size processes; seen: (M,) tokens
    each latent could fire on (`tokens_seen`; None: the whole batch).  -> the updated counter,
    equal on every process: reset where any process fired a latent with a non-zero value,
    else advanced by `seen` (backend.all_sum sums the (M,) hit counts)."""
    xp = backend.xp
    hits = fire_counts(xp.zeros_like(counter), top_indices, top_values, backend)
    step = top_indices.shape[0] * backend.world_size if seen is None else xp.astype(seen, counter.dtype)
    return xp.where(hits > 0, xp.zeros_like(counter), counter + step)


def fire_counts(zeros, top_indices, top_values, backend):
    """zeros: (L,) float, one per latent of the ids; top_indices/values: (batch / R, k) this
    process's tokens -> (L,) how often each latent fired (a non-zero kept value) in the whole
    batch, summed over the processes."""
    xp = backend.xp
    fired = xp.astype(xp.reshape(top_values, (-1,)) != 0, zeros.dtype)
    return backend.all_sum(backend.scatter_add(zeros, xp.reshape(top_indices, (-1,)), fired))


def dead_mask(counter, dead_tokens: int):
    """(M,) bool: latents silent for at least `dead_tokens` tokens."""
    return counter >= dead_tokens
