"""PyTorch backend: grouped-GEMM expert dispatch, sparse decode and sparse backward, fused Adam."""

import os

# Transparent huge pages for PyTorch's CPU allocator: the optimiser's passes over the big
# (N, m, d) tensors page-fault much less (read when torch is first imported).
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

from .backend import TorchBackend as Backend  # noqa: E402

__all__ = ["Backend"]
