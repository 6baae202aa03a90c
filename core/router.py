"""The router: which expert each token goes to."""


def router_probs(x, b_router, W_router, xp):
    """Softmax router probabilities.  x: (batch, d) -> (batch, N)."""
    logits = (x - b_router) @ xp.matrix_transpose(W_router)
    logits = logits - xp.max(logits, axis=-1, keepdims=True)
    unnorm = xp.exp(logits)
    return unnorm / xp.sum(unnorm, axis=-1, keepdims=True)


def choose_experts(probs, xp):
    """Top-1 expert per token, lowest index on ties.  probs: (batch, N) -> (batch,) int."""
    return xp.argmax(probs, axis=-1)


def one_hot(experts, n_experts, dtype, xp):
    """experts: (...,) int -> (..., N) one-hot in `dtype` (a comparison, no scatter)."""
    from array_api_compat import device

    return xp.astype(experts[..., None] == xp.arange(n_experts, device=device(experts)), dtype)


def expert_counts(experts, n_experts, dtype, xp):
    """How often each expert was chosen.  experts: (batch, e) int -> (N,) in `dtype`."""
    return xp.sum(one_hot(experts, n_experts, dtype, xp), axis=(0, 1))
