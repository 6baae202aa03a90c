from .backend import NumpyBackend as Backend
