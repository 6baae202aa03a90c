"""Expert-aware dead-latent counting: a latent's silence is counted in the tokens routed to its
expert (the only ones it can fire on); the shared expert's latents see every token."""

from __future__ import annotations

import numpy as np

import switchsae
from switchsae.core.config import SwitchSAEConfig
from switchsae.core.dead_latents import dead_mask, tokens_seen, update_tokens_since_fired

NUMPY = switchsae.get_backend("numpy")


def test_tokens_seen_are_the_expert_loads_and_the_whole_batch_for_the_shared_expert():
    cfg = SwitchSAEConfig(d_in=8, n_latents=12, n_experts=3, k=2, shared_latents=2, shared_k=1)
    experts = np.array([0, 2, 2, 2, 0, 2])  # expert 1 gets no token
    seen = np.asarray(tokens_seen(cfg, experts, NUMPY))
    assert seen.tolist() == [2.0] * 4 + [0.0] * 4 + [4.0] * 4 + [6.0] * 2
    top2 = SwitchSAEConfig(d_in=8, n_latents=12, n_experts=3, k=2, experts_per_token=2)
    both = np.array([[0, 1], [0, 2], [1, 0]])  # each token counts for both its experts
    assert np.asarray(tokens_seen(top2, both, NUMPY)).tolist() == [3.0] * 4 + [2.0] * 4 + [1.0] * 4


def test_counter_advances_by_the_tokens_seen_and_resets_where_a_latent_fired():
    cfg = SwitchSAEConfig(d_in=8, n_latents=6, n_experts=2, k=1)
    counter = np.array([5.0, 5.0, 5.0, 5.0, 5.0, 5.0], dtype=np.float32)
    experts = np.array([1, 1, 1, 0])
    top_indices = np.array([[4], [4], [3], [0]])
    top_values = np.array([[1.0], [2.0], [0.0], [0.5]], dtype=np.float32)  # latent 3 fired a zero
    new = update_tokens_since_fired(counter, top_indices, top_values, NUMPY, tokens_seen(cfg, experts, NUMPY))
    # expert 0 (latents 0-2) saw 1 token, expert 1 (latents 3-5) saw 3
    assert np.asarray(new).tolist() == [0.0, 6.0, 6.0, 8.0, 0.0, 8.0]
    batch = update_tokens_since_fired(counter, top_indices, top_values, NUMPY)  # without `seen`
    assert np.asarray(batch).tolist() == [0.0, 9.0, 9.0, 9.0, 0.0, 9.0]
    assert np.asarray(dead_mask(new, 8)).tolist() == [False, False, False, True, False, True]


def test_one_expert_counts_every_token_as_before():
    cfg = SwitchSAEConfig(d_in=8, n_latents=6, n_experts=1, k=1)
    counter = np.zeros(6, dtype=np.float32)
    idx, vals = np.array([[1], [2]]), np.ones((2, 1), dtype=np.float32)
    seen = tokens_seen(cfg, np.zeros(2, dtype=np.int64), NUMPY)
    assert np.array_equal(update_tokens_since_fired(counter, idx, vals, NUMPY, seen),
                          update_tokens_since_fired(counter, idx, vals, NUMPY))
