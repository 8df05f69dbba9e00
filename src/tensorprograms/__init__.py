"""tensorprograms: infinite-width limits of PyTorch models via Tensor Programs."""

__version__ = "0.1.0"
