"""Activation data for Switch SAEs: sources yielding NumPy ``(batch, d_in)`` arrays.

See :mod:`switchsae.data.sources` (ArraySource, ShardSource, ShardWriter) and
:mod:`switchsae.data.harvest` (hidden states of a local transformers model).
Importing this package does not import torch / jax / mlx / transformers.
"""
from .harvest import (DEFAULT_LAYER, HarvestSource, cache_activations, default_model_path,
                      default_texts, harvest, read_texts)
from .sources import (MANIFEST_NAME, ActivationSource, ArraySource, DataError, ShardSource,
                      ShardWriter, to_numpy)

__all__ = ["ActivationSource", "ArraySource", "ShardSource", "ShardWriter", "DataError", "to_numpy",
           "MANIFEST_NAME", "DEFAULT_LAYER", "harvest", "cache_activations", "HarvestSource",
           "default_model_path", "default_texts", "read_texts"]
