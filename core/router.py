"""The router: which expert each token goes to, and the gate that scales its decode."""


def router_probs(x, b_router, W_router, xp):
    """Softmax router probabilities.  x: (batch, d) -> (batch, N)."""
    logits = (x - b_router) @ xp.matrix_transpose(W_router)
    logits = logits - xp.max(logits, axis=-1, keepdims=True)
    unnorm = xp.exp(logits)
    return unnorm / xp.sum(unnorm, axis=-1, keepdims=True)


def choose_experts(probs, xp):
    """Top-1 expert per token, lowest index on ties.  probs: (batch, N) -> (batch,) int."""
    return xp.argmax(probs, axis=-1)


def expert_one_hot(expert, n_experts, dtype, xp):
    """expert: (batch,) -> (batch, N) one-hot in `dtype` (no scatter needed)."""
    return xp.astype(expert[:, None] == xp.arange(n_experts, device=_device(expert, xp))[None, :], dtype)


def gate_values(probs, expert, router_scale, xp):
    """The factor on each token's decode: p[e] ("soft") or 1 ("hard").  -> (batch,)."""
    if router_scale == "hard":
        return xp.ones(probs.shape[:1], dtype=probs.dtype, device=_device(probs, xp))
    one_hot = expert_one_hot(expert, probs.shape[-1], probs.dtype, xp)
    return xp.sum(probs * one_hot, axis=-1)


def _device(a, xp):
    from array_api_compat import device

    return device(a)
