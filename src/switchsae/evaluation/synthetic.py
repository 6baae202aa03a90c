"""Synthetic activations with a known dictionary, and how well a trained SAE recovers it.

The generator (`SyntheticBenchmark`): n_features unit directions in d dimensions, in
n_clusters clusters.  Cluster c has a random unit centroid u_c; each of its features is
    f = sqrt(s) u_c + sqrt(1 - s) g,   g a random unit vector orthogonal to u_c,
so cos(f, u_c) = sqrt(s) (s = `cluster_similarity`) and two features of one cluster have
cosine ~s.  A token belongs to one cluster (uniformly drawn); each feature of that cluster
fires independently, the cluster's r-th feature with probability proportional to r^-zipf
(a power law, scaled so `mean_active` fire per token on average), with magnitude uniform in
[0.5, 1.5].  x = sum of the firing features' magnitude * direction + Gaussian noise of
expected norm `noise`.  Every draw is a pure function of (seed, batch index).

Scores: `best_cosines` / `recovery_score` (mean over true features of the best cosine with a
learned decoder row) and `cluster_routing` (does each cluster go to one expert?).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, NamedTuple

import numpy as np


class SyntheticBatch(NamedTuple):
    """x: (batch, d) float32 activations; cluster: (batch,) each token's cluster;
    codes: (batch, n_features) float32 true feature magnitudes (0 = not firing)."""

    x: np.ndarray
    cluster: np.ndarray
    codes: np.ndarray


@dataclass(frozen=True)
class SyntheticBenchmark:
    """A known dictionary in superposition (see the module docstring).

    Attributes built from the fields: `dictionary` (n_features, d) unit rows, feature f in
    cluster f // (n_features / n_clusters); `centroids` (n_clusters, d); `fire_prob`
    (n_features,) the probability that a feature fires on a token of its cluster."""

    d: int = 32
    n_features: int = 128
    n_clusters: int = 8
    cluster_similarity: float = 0.25
    mean_active: float = 3.0
    zipf: float = 0.5
    noise: float = 0.01
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("d", "n_features", "n_clusters"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.n_features % self.n_clusters:
            raise ValueError(f"n_features ({self.n_features}) must be divisible by n_clusters "
                             f"({self.n_clusters})")
        if self.d < 2:
            raise ValueError(f"d must be >= 2 (a centroid and a direction orthogonal to it), got {self.d}")
        if not 0.0 <= self.cluster_similarity < 1.0:
            raise ValueError(f"cluster_similarity must be in [0, 1), got {self.cluster_similarity}")
        per_cluster = self.n_features // self.n_clusters
        if not 0.0 < self.mean_active <= per_cluster:
            raise ValueError(f"mean_active must be in (0, features per cluster = {per_cluster}], "
                             f"got {self.mean_active}")
        if self.zipf < 0 or self.noise < 0:
            raise ValueError(f"zipf and noise must be >= 0, got {self.zipf}, {self.noise}")
        rng = np.random.default_rng([self.seed, 0])
        centroids = _unit(rng.normal(size=(self.n_clusters, self.d)))
        owner = self.feature_cluster
        g = rng.normal(size=(self.n_features, self.d))
        g -= np.sum(g * centroids[owner], axis=-1, keepdims=True) * centroids[owner]
        s = self.cluster_similarity
        dictionary = _unit(np.sqrt(s) * centroids[owner] + np.sqrt(1 - s) * _unit(g))
        object.__setattr__(self, "centroids", centroids)
        object.__setattr__(self, "dictionary", dictionary)
        object.__setattr__(self, "fire_prob", _zipf_probs(per_cluster, self.zipf, self.mean_active,
                                                          self.n_clusters))

    @property
    def feature_cluster(self) -> np.ndarray:
        """(n_features,) the cluster of each feature."""
        return np.arange(self.n_features) // (self.n_features // self.n_clusters)

    def batch(self, batch_size: int, index: int = 0) -> SyntheticBatch:
        """Batch number `index` (deterministic: drawn from (seed, index))."""
        if batch_size < 1 or index < 0:
            raise ValueError(f"need batch_size >= 1 and index >= 0, got {batch_size}, {index}")
        rng = np.random.default_rng([self.seed, 1, index])
        cluster = rng.integers(self.n_clusters, size=batch_size)
        in_cluster = self.feature_cluster[None, :] == cluster[:, None]
        fires = in_cluster & (rng.random((batch_size, self.n_features)) < self.fire_prob)
        codes = np.where(fires, rng.uniform(0.5, 1.5, size=fires.shape), 0.0)
        x = codes @ self.dictionary + rng.normal(scale=self.noise / np.sqrt(self.d),
                                                 size=(batch_size, self.d))
        return SyntheticBatch(x.astype(np.float32), cluster, codes.astype(np.float32))

    def batches(self, batch_size: int, start: int = 0) -> Iterator[SyntheticBatch]:
        """Endless stream of batches `start`, `start` + 1, ..."""
        index = start
        while True:
            yield self.batch(batch_size, index)
            index += 1


def best_cosines(dictionary: np.ndarray, decoder: np.ndarray) -> np.ndarray:
    """For each true feature, the largest cosine with any learned decoder row.

    dictionary: (F, d) true directions; decoder: (..., d), e.g. W_dec (N, m, d) -> (F,)."""
    learned = _unit(np.asarray(decoder, dtype=np.float64).reshape(-1, dictionary.shape[-1]))
    return np.max(_unit(np.asarray(dictionary, dtype=np.float64)) @ learned.T, axis=-1)


def recovery_score(dictionary: np.ndarray, decoder: np.ndarray) -> float:
    """Mean over true features of the best cosine with a learned decoder row (1 = all found)."""
    return float(np.mean(best_cosines(dictionary, decoder)))


class ClusterRouting(NamedTuple):
    """purity: (n_clusters,) fraction of each cluster's tokens sent to its majority expert;
    majority: (n_clusters,) that expert; experts_used: distinct majority experts."""

    purity: np.ndarray
    majority: np.ndarray
    experts_used: int


def cluster_routing(cluster: np.ndarray, expert: np.ndarray, n_clusters: int,
                    n_experts: int) -> ClusterRouting:
    """How cleanly clusters map to experts.  cluster, expert: (tokens,) ints, top-1 experts."""
    cluster, expert = np.asarray(cluster), np.asarray(expert)
    if cluster.shape != expert.shape or cluster.ndim != 1:
        raise ValueError(f"cluster and expert must be equal-length 1-D arrays, got "
                         f"{cluster.shape} and {expert.shape}")
    counts = np.zeros((n_clusters, n_experts))
    np.add.at(counts, (cluster, expert), 1.0)
    seen = counts.sum(axis=1)
    if np.any(seen == 0):
        raise ValueError(f"clusters {np.flatnonzero(seen == 0).tolist()} have no tokens")
    majority = counts.argmax(axis=1)
    return ClusterRouting(counts.max(axis=1) / seen, majority, len(set(majority.tolist())))


def _zipf_probs(per_cluster: int, exponent: float, mean_active: float, n_clusters: int) -> np.ndarray:
    """Firing probabilities c * r^-exponent (r = 1..per_cluster) with sum mean_active, capped
    at 1 (the excess moved to the rarer features), repeated for every cluster."""
    weights = np.arange(1, per_cluster + 1, dtype=np.float64) ** -exponent
    probs = np.zeros(per_cluster)
    free = np.ones(per_cluster, dtype=bool)
    while True:
        probs[free] = (mean_active - np.sum(probs[~free])) * weights[free] / weights[free].sum()
        over = free & (probs > 1.0)
        if not over.any():
            return np.tile(probs, n_clusters)
        probs[over], free[over] = 1.0, False


def _unit(a: np.ndarray) -> np.ndarray:
    return a / np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), 1e-12)
