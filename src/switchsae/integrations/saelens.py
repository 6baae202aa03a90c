"""The Switch SAE as a SAELens architecture, registered through SAELens's own registry.

    import switchsae.integrations.saelens          # registers architecture "switch"
    sae = sae_lens.SAE.load_from_disk("out/sae")   # written by switchsae.export(..., "saelens")
    acts = sae.encode(x)     # (batch, d_sae) dense, at most k non-zeros a row
    x_hat = sae.decode(acts) # = the library's x_hat

`SwitchSAE` here is a `sae_lens.SAE`: its hooks, `forward`, `W_enc` (d_in, d_sae), `W_dec`
(d_sae, d_in) and `b_dec` are what SAELens, SAEBench and SAE-dashboard use.  The encoder
computes every expert's pre-activations densely and keeps the k largest gated ones among the
chosen experts' (the shared expert's shared_k among its own), the same latents and values as
`switchsae.core.spec`; decode is acts @ W_dec + b_dec.  Inference only (no training class).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from sae_lens import SAE, SAEConfig, register_sae_class
from sae_lens.registry import SAE_CLASS_REGISTRY
from torch import nn

from switchsae.interop.saelens import SWITCH_ARCHITECTURE

__all__ = ["SwitchSAE", "SwitchSAEConfig"]


@dataclass
class SwitchSAEConfig(SAEConfig):
    """SAELens config of a Switch SAE: d_sae = n_latents + shared_latents (see
    `switchsae.interop.saelens` for the file layout)."""

    n_experts: int = 1
    k: int = 32
    experts_per_token: int = 1
    router_scale: str = "soft"
    shared_latents: int = 0
    shared_k: int = 0
    encoder_bias: bool = True

    @classmethod
    def architecture(cls) -> str:
        return SWITCH_ARCHITECTURE


class SwitchSAE(SAE[SwitchSAEConfig]):
    """A Switch SAE inside SAELens.  Parameters: W_enc, b_enc, W_dec, b_dec (= b_pre),
    W_router (N, d_in), b_router (d_in,)."""

    b_enc: nn.Parameter
    W_router: nn.Parameter
    b_router: nn.Parameter

    def initialize_weights(self) -> None:
        super().initialize_weights()
        c, kw = self.cfg, {"dtype": self.dtype, "device": self.device}
        self.b_enc = nn.Parameter(torch.zeros(c.d_sae, **kw))
        self.W_router = nn.Parameter(torch.zeros(c.n_experts, c.d_in, **kw))
        self.b_router = nn.Parameter(torch.zeros(c.d_in, **kw))

    @property
    def n_routed(self) -> int:
        return self.cfg.d_sae - self.cfg.shared_latents

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., d_in) -> dense latent activations (..., d_sae)."""
        c = self.cfg
        x = x.to(self.dtype)
        probs = torch.softmax((x - self.b_router) @ self.W_router.T, dim=-1)
        sae_in = self.process_sae_in(x)
        pre = self.hook_sae_acts_pre(sae_in @ self.W_enc + self.b_enc)
        M, m = self.n_routed, self.n_routed // c.n_experts
        experts = probs.argmax(-1, keepdim=True) if c.experts_per_token == 1 else \
            probs.topk(c.experts_per_token, dim=-1).indices
        gates = torch.ones_like(probs) if c.router_scale == "hard" else probs
        chosen = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, experts, True)
        gated = pre[..., :M].relu().unflatten(-1, (c.n_experts, m)) * gates[..., None]
        candidates = gated.masked_fill(~chosen[..., None], -torch.inf).flatten(-2)
        acts = _keep_top(candidates, c.k - c.shared_k)
        if c.shared_latents:
            acts = torch.cat([acts, _keep_top(pre[..., M:].relu(), c.shared_k)], dim=-1)
        return self.hook_sae_acts_post(acts)

    def decode(self, feature_acts: torch.Tensor) -> torch.Tensor:
        """(..., d_sae) activations -> x_hat (..., d_in)."""
        return self.hook_sae_recons(feature_acts.to(self.dtype) @ self.W_dec + self.b_dec)


def _keep_top(values: torch.Tensor, k: int) -> torch.Tensor:
    """The k largest entries of each row kept, the rest 0 (-inf candidates never survive)."""
    top = values.topk(k, dim=-1)
    return torch.zeros_like(values).scatter(-1, top.indices, top.values.clamp_min(0))


if SWITCH_ARCHITECTURE not in SAE_CLASS_REGISTRY:  # importing twice (e.g. a reload) registers once
    register_sae_class(SWITCH_ARCHITECTURE, SwitchSAE, SwitchSAEConfig)
