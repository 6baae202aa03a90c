"""The experts of a Switch SAE as contiguous ranges of global latent ids.

Routed expert e owns ids e*m .. e*m + m - 1 and is keyed "e"; a shared (always-on) expert,
when the config has one, owns ids M .. M + m_s - 1 and is keyed "shared".  A feature's
address in the browser is "<key>/<i>" with i its index inside the expert.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

SHARED = "shared"


class Group(NamedTuple):
    """key: "0".."N-1" or "shared"; start: first global id; width: latents in the group."""

    key: str
    start: int
    width: int


def expert_groups(cfg) -> list[Group]:
    """The routed experts in order, then the shared expert if any."""
    m = cfg.expert_width
    groups = [Group(str(e), e * m, m) for e in range(cfg.n_experts)]
    shared = getattr(cfg, "shared_latents", 0)
    if shared:
        groups.append(Group(SHARED, cfg.n_latents, shared))
    return groups


def group_of(groups: list[Group]) -> np.ndarray:
    """(total latents,) index into `groups` of every global latent id."""
    return np.repeat(np.arange(len(groups)), [g.width for g in groups])


def decoder_rows(sae) -> np.ndarray:
    """(total latents, d) float32 decoder directions ordered by global id."""
    params = sae.numpy_params()
    rows = [params["W_dec"].reshape(sae.cfg.n_latents, sae.cfg.d_in)]
    if "W_dec_shared" in params:
        rows.append(params["W_dec_shared"])
    return np.concatenate(rows).astype(np.float32)
