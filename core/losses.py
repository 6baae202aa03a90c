"""Loss terms: reconstruction MSE, Switch load balancing, AuxK dead-latent loss."""

from .router import expert_counts


def mse_loss(error, xp):
    """mean over tokens of ||x - x_hat||^2.  error = x - x_hat: (batch, d) (AuxK's residual too,
    so it is formed once) -> scalar."""
    return xp.mean(xp.sum(error * error, axis=-1))  # a product, not ** 2: a cheaper autograd graph


def expert_fractions(experts, n_experts, dtype, xp):
    """f_i: fraction of routing choices that went to expert i.  experts: (batch,) or
    (batch, e) -> (N,), summing to 1."""
    experts = experts[:, None] if experts.ndim == 1 else experts
    return expert_counts(experts, n_experts, dtype, xp) / (experts.shape[0] * experts.shape[1])


def load_balance_loss(probs, fractions, xp):
    """N * sum_i f_i P_i (Switch Transformer; 1 when balanced).  probs: (batch, N);
    fractions: (N,) f_i (`expert_fractions`: hard choices, no gradient) -> scalar.
    P_i = mean router probability."""
    return probs.shape[-1] * xp.sum(fractions * xp.mean(probs, axis=0))


def total_variance(x, xp):
    """sum over tokens of ||x - mean(x)||^2.  x: (batch, d) -> scalar."""
    return xp.sum((x - xp.mean(x, axis=0, keepdims=True)) ** 2)


def auxk_loss(aux_recon, residual, n_dead, k_aux, variance, xp):
    """Gao et al.'s AuxK: dead latents reconstruct the (detached) residual x - x_hat.

    aux_recon, residual: (batch, d); n_dead: scalar count of dead latents; variance: the
    total variance of x (`total_variance`).
    scale min(n_dead / k_aux, 1) * sum ||aux_recon - residual||^2 / total variance."""
    scale = xp.minimum(n_dead / k_aux, xp.ones_like(n_dead))
    diff = aux_recon - residual
    return scale * xp.sum(diff * diff) / variance  # a product, as `mse_loss`
