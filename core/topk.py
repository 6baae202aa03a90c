"""TopK activation (Gao et al. 2024) in standard ops; backends override with native top-k."""


def topk_reference(acts, k, xp):
    """The k largest entries per row, ties broken towards the lower index.

    acts: (batch, m) -> values (batch, k), indices (batch, k) int, both in descending order.
    """
    order = xp.argsort(acts, axis=-1, descending=True, stable=True)
    indices = order[:, :k]
    return xp.take_along_axis(acts, indices, axis=-1), indices


def biased_topk(acts, bias, k, topk, xp):
    """TopK chosen by acts + bias wherever acts > 0 (`core.selection_bias`), the kept values
    being the acts themselves: the bias changes which latents are kept, never a value.
    acts: (batch, m) >= 0; bias: (batch, m) >= 0, each row's expert's bias; topk(a, k) -> (values,
    indices), the backend's TopK (its tie rule) -> values, indices: (batch, k), by biased score."""
    score = xp.where(acts > 0, acts + bias, acts)
    indices = topk(score, k)[1]
    return xp.take_along_axis(acts, indices, axis=-1), indices
