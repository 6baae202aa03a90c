"""JAX backend (`switchsae.use("jax")`); expert/data parallelism lives in `.sharding`."""

from .backend import JaxBackend as Backend
from .expert_ops import use_pallas_ragged_dot

__all__ = ["Backend", "use_pallas_ragged_dot"]
