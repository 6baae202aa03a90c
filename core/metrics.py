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
