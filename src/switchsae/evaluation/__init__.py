"""Evaluating Switch SAEs beyond reconstruction: downstream fidelity (splicing the
reconstruction into a transformers model) and recovery of a known synthetic dictionary.

Reconstruction, sparsity, routing and duplication metrics are in `switchsae.core.metrics`,
FLOPs per token in `switchsae.core.flops`.  Importing this package does not import torch.
"""

from .fidelity import Fidelity, FidelityError, LayerSplice, load_model, splice_fidelity
from .synthetic import (ClusterRouting, SyntheticBatch, SyntheticBenchmark, best_cosines,
                        cluster_routing, recovery_score)

__all__ = [
    "ClusterRouting", "Fidelity", "FidelityError", "LayerSplice", "SyntheticBatch",
    "SyntheticBenchmark", "best_cosines", "cluster_routing", "load_model", "recovery_score",
    "splice_fidelity",
]
