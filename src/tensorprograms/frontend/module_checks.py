"""Checks on the user's modules before capture, for options no ATen rule can see clearly."""

from __future__ import annotations

import torch

from ..errors import UnsupportedOperation


def check_recurrent_modules(model: torch.nn.Module) -> None:
    """Reject recurrent-module options the lowering does not cover, naming the module.

    ``proj_size > 0`` (projected LSTM) is rejected: its projection is a readout-like
    finite layer inside the recurrence. ``dropout`` needs no check: models are captured
    in eval mode (as ``tp.empirical`` runs them), where recurrent dropout is inactive.
    """
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.RNNBase) and getattr(m, "proj_size", 0):
            raise UnsupportedOperation(
                f"{name or 'the model'} = {m!r}: aten.lstm with proj_size={m.proj_size} (a projected "
                "LSTM) has no rule; use proj_size=0 (the default)."
            )
