"""FLOPs per token of a Switch SAE, counted from its config (the useful work, not a profile).

Convention (as Kaplan et al. count transformers): 2 FLOPs per multiply-add of a matrix
product; d = d_in, N experts of m latents, e = experts_per_token, k kept latents (shared
expert's included), m_s shared latents.

Forward (inference), per token:
  router          2dN      logits (x - b_router) @ W_router.T; 0 when N = 1, since a single
                           expert needs no router (p = 1) and the model is a dense TopK SAE
  encoder         2dm * e  only the chosen experts' pre-activations
  shared_encoder  2dm_s    the always-on shared expert (absent without one)
  decoder         2kd      sparse decode: k rows of W_dec scaled and summed
So a Switch SAE of expert width m costs what a dense TopK SAE of width m costs, plus 2dN.

Training step = forward + backward.  The backward counts, for each product above, its
weight-gradient and input-gradient products at their *sparse* size, the work a sparse
implementation does:
  decoder_backward  4kd   d/d top_values (k dot products) and d/d W_dec (k rows)
  encoder_backward  4dk   the pre-activation gradient is zero outside the k kept latents
                          (TopK then ReLU), so d/d W_enc fills k columns (2dk) and
                          d/d x_centered, which b_pre needs, is a k-term sum (2dk)
  router_backward   4dN   d/d W_router and d/d (x - b_router) from the (batch, N) logit
                          gradient (0 when N = 1)
  auxk              10 d k_aux  with AuxK on (auxk_coef > 0): its sparse decode (2), the
                          decoder backward (4) and the encoder backward (4) of k_aux latents
A dense autograd backward through the encoder would spend 4dm (4dm_s) instead of 4dk; that
is wasted on zeros and not counted.

Not counted (lower order): element-wise work (centering d, ReLU e*m, gating k, softmax N),
TopK selection (~e*m comparisons, no multiply-adds), and per-step work that is amortised
over the batch: Adam, gradient clipping and decoder renormalisation (O(parameters) per step).
"""

from __future__ import annotations


def forward_flops(cfg) -> dict[str, int]:
    """Per-token FLOPs of the forward pass by part ("router", "encoder", ["shared_encoder"],
    "decoder") and their "total"."""
    d, n = cfg.d_in, cfg.n_experts
    parts = {
        "router": 2 * d * n if n > 1 else 0,
        "encoder": 2 * d * cfg.expert_width * cfg.experts_per_token,
    }
    if cfg.shared_latents:
        parts["shared_encoder"] = 2 * d * cfg.shared_latents
    parts["decoder"] = 2 * cfg.k * d
    parts["total"] = sum(parts.values())
    return parts


def train_flops(cfg) -> dict[str, int]:
    """Per-token FLOPs of a training step (forward + sparse backward, see the module notes)
    by part, the forward parts included, and their "total"."""
    d, n, k = cfg.d_in, cfg.n_experts, cfg.k
    parts = {name: v for name, v in forward_flops(cfg).items() if name != "total"}
    parts["router_backward"] = 4 * d * n if n > 1 else 0
    parts["encoder_backward"] = 4 * d * k
    parts["decoder_backward"] = 4 * k * d
    if cfg.auxk_coef > 0:
        parts["auxk"] = 10 * d * cfg.aux_k
    parts["total"] = sum(parts.values())
    return parts
