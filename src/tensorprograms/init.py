"""Initializations with an infinite-width limit, for models written in plain PyTorch.

PyTorch's defaults are not all width-independent in the way a limit needs (``nn.RNN``'s
U(±1/√hidden) makes the input weights vanish with width, biases' 1/fan_in variance
vanishes). :func:`normal_` states one: ``σ_w²/fan_in`` per weight entry, ``σ_b²`` per bias
entry, which the frontend reads back from the code (``tp.infinite_width``).
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["normal_"]


@torch.no_grad()
def normal_(module: nn.Module, weight_variance: float = 1.0, bias_variance: float = 0.0) -> nn.Module:
    """Initialize every parameter of ``module`` in place (in ``named_parameters`` order) and
    return ``module``.

    * weights (parameters with ≥ 2 dims: ``nn.Linear``, ``nn.Conv*d``, the ``weight_ih`` /
      ``weight_hh`` of ``nn.RNN``/``GRU``/``LSTM`` and their cells): ``N(0, σ_w²/fan_in)``,
      ``fan_in = prod(shape[1:])`` — the NTK/standard parametrization's hidden, input and
      readout layers;
    * ``nn.Embedding`` tables: ``N(0, σ_w²)`` per entry (a one-hot input has fan-in 1);
    * biases (1-D parameters whose name ends in ``bias``, ``bias_ih_l0`` …):
      ``N(0, σ_b²)``, or zeros when ``bias_variance`` is 0;
    * normalization layers' gains and shifts (LayerNorm, GroupNorm, BatchNorm) and other
      1-D parameters keep their constant init.

    Args:
        module: any ``nn.Module``.
        weight_variance: σ_w² ≥ 0.
        bias_variance: σ_b² ≥ 0.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"normal_ initializes an nn.Module, got {type(module).__name__}")
    for name, value in (("weight_variance", weight_variance), ("bias_variance", bias_variance)):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0:
            raise ValueError(f"{name} must be a number ≥ 0, got {value!r}")
    tables = {id(m.weight) for m in module.modules() if isinstance(m, nn.Embedding)}
    norms = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase)
    affine = {id(p) for m in module.modules() if isinstance(m, norms) for p in m.parameters()}
    for name, p in module.named_parameters():
        if id(p) in affine:
            continue
        if id(p) in tables:
            nn.init.normal_(p, std=math.sqrt(weight_variance))
        elif p.ndim >= 2:
            fan_in = math.prod(p.shape[1:])
            nn.init.normal_(p, std=math.sqrt(weight_variance / fan_in))
        elif name.rsplit(".", 1)[-1].startswith("bias"):
            if bias_variance > 0:
                nn.init.normal_(p, std=math.sqrt(bias_variance))
            else:
                nn.init.zeros_(p)
    return module
