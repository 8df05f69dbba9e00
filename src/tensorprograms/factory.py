"""Building a user's model from its factory, the same way everywhere."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def build(factory: Callable[[int], nn.Module], width: int, seed: int) -> nn.Module:
    """``factory(width)`` under ``torch.manual_seed(seed)``, leaving the caller's global RNG
    stream as it was; a clear TypeError if the factory does not return an ``nn.Module``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = factory(width)
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"factory({width}) returned {type(model).__name__}, not a torch.nn.Module; the "
            "factory must build and return the model for a given width, e.g. lambda n: MyNet(width=n)"
        )
    return model


def eval_mode(model: nn.Module) -> nn.Module:
    """``model.eval()`` except batch-norm layers that are in training mode, which keep
    normalizing by batch statistics.

    The frontend and ``tp.empirical`` evaluate models this way: dropout is off, and a
    ``nn.BatchNorm*d`` the factory left in training mode (PyTorch's default) uses the
    statistics of the batch it is given, so its limit depends on the batch
    (docs/sequence-models.md). Call ``.eval()`` on it in the factory for running statistics.
    """
    norms = nn.modules.batchnorm._BatchNorm
    batch_stats = [m for m in model.modules() if isinstance(m, norms) and m.training]
    model.eval()
    for m in batch_stats:
        m.train()
    return model
