"""JAX backend (`switchsae.use("jax")`); expert/data parallelism lives in `.distributed`."""

from .backend import JaxBackend as Backend
from .encode import use_pallas_ragged_dot

__all__ = ["Backend", "use_pallas_ragged_dot"]
