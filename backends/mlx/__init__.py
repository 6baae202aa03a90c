"""MLX backend (Apple silicon GPU via Metal; also runs on Linux CPU)."""

from .backend import MLXBackend as Backend

__all__ = ["Backend"]
