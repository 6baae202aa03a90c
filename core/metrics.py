"""Reconstruction and sparsity metrics (backend-agnostic, Array API)."""

from __future__ import annotations

from .losses import expert_fractions, total_variance


def fvu(x, x_hat, xp):
    """Fraction of variance unexplained: sum ||x - x_hat||^2 / sum ||x - mean x||^2."""
    return xp.sum((x - x_hat) ** 2) / total_variance(x, xp)


def normalized_mse(x, x_hat, xp):
    """mean ||x - x_hat||^2 / mean ||x||^2."""
    return xp.sum((x - x_hat) ** 2) / xp.sum(x * x)


def l0(top_values, xp):
    """Mean number of latents that survive TopK with a non-zero value.  top_values: (batch, k)."""
    return xp.mean(xp.sum(xp.astype(top_values != 0, top_values.dtype), axis=-1))


def expert_load(expert, n_experts, xp, dtype=None):
    """Fraction of tokens routed to each expert.  expert: (batch,) -> (N,)."""
    return expert_fractions(expert, n_experts, dtype or xp.float32, xp)


def load_entropy(load, xp):
    """Entropy of the expert load in nats (log N when perfectly balanced)."""
    safe = xp.where(load > 0, load, xp.ones_like(load))
    return -xp.sum(load * xp.log(safe))


def dead_fraction(tokens_since_fired, dead_tokens: int, xp):
    """Fraction of latents that have not fired within `dead_tokens` tokens.  (M,) -> scalar."""
    return xp.mean(xp.astype(tokens_since_fired >= dead_tokens, xp.float32))


def dense_fraction(frequency, xp, threshold: float = 0.1):
    """Fraction of latents firing on more than `threshold` of the tokens.

    frequency: (M,) fraction of tokens on which each latent fired -> scalar.  Such dense
    latents are usually uninterpretable; a healthy SAE has few."""
    return xp.mean(xp.astype(frequency > threshold, xp.float32))


def max_partner_cosine(W_dec, xp, across_experts: bool = True, block_elements: int = 2**24):
    """For every latent, the largest cosine between its decoder row and a partner's row.

    W_dec: (N, m, d) -> (N*m,), ordered by global id e*m + i.  Partners are the latents of the
    *other* experts (`across_experts`) or every other latent; -inf where there is none
    (N = 1 across experts).  Rows are compared in blocks of at most `block_elements`
    similarities, so an M x M matrix is never held (M = 65536: 256 rows per block)."""
    n, m, d = W_dec.shape
    rows = xp.reshape(W_dec, (n * m, d))
    unit = rows / (xp.sqrt(xp.sum(rows * rows, axis=-1, keepdims=True)) + 1e-12)
    ids = xp.arange(n * m, device=_device(W_dec))
    owner = ids // m if across_experts else ids
    step = max(1, block_elements // (n * m))
    best = []
    for start in range(0, n * m, step):
        stop = min(start + step, n * m)
        sims = unit[start:stop, ...] @ xp.matrix_transpose(unit)
        same = owner[start:stop, None] == owner[None, :]
        sims = xp.where(same, xp.asarray(-xp.inf, dtype=sims.dtype, device=_device(sims)), sims)
        best.append(xp.max(sims, axis=-1))
    return xp.concat(best)


def duplication_fraction(W_dec, xp, threshold: float = 0.9, across_experts: bool = True,
                         block_elements: int = 2**24):
    """Fraction of latents whose decoder row has a partner with cosine > `threshold`: by
    default a latent of a different expert (a feature learned twice), else any other latent.

    W_dec: (N, m, d) -> scalar.  0 for N = 1 across experts.  See `max_partner_cosine`."""
    best = max_partner_cosine(W_dec, xp, across_experts, block_elements)
    return xp.mean(xp.astype(best > threshold, xp.float32))


def _device(a):
    from array_api_compat import device

    return device(a)
