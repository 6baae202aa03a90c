"""TopK activation (Gao et al. 2024) in standard ops; backends override with native top-k."""


def topk_reference(acts, k, xp):
    """The k largest entries per row, ties broken towards the lower index.

    acts: (batch, m) -> values (batch, k), indices (batch, k) int, both in descending order.
    """
    order = xp.argsort(acts, axis=-1, descending=True, stable=True)
    indices = order[:, :k]
    return xp.take_along_axis(acts, indices, axis=-1), indices
