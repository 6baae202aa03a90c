"""switchsae: Switch Sparse Autoencoders on NumPy, PyTorch, JAX and MLX.

    import switchsae
    switchsae.use("torch")
    cfg = switchsae.SwitchSAEConfig(d_in=384, n_latents=3072, n_experts=8, k=32)
    sae = switchsae.SwitchSAE.init(cfg, seed=0)
    out = sae.forward(x)        # x_hat, expert, router_probs, top_values, top_indices, losses
"""

from switchsae.backends import BackendError, installed_backends
from switchsae.core.config import ConfigError, SwitchSAEConfig
from switchsae.core.spec import ForwardOutput

from ._active import backend_name, get_backend, use
from .model import InputError, SwitchSAE
from .checkpoint import save
from .interop import export, load
from .training import TrainConfig, Trainer

__version__ = "0.1.0"

__all__ = [
    "BackendError", "ConfigError", "ForwardOutput", "InputError", "SwitchSAE",
    "SwitchSAEConfig", "backend_name", "get_backend", "installed_backends", "use",
    "export", "load", "save", "Trainer", "TrainConfig",
]
