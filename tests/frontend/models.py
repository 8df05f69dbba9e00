"""Plain PyTorch models used by the frontend tests, with initializations stated in code."""

from __future__ import annotations

import math

from torch import nn

SW2, SB2 = 1.5, 0.09  # weight variance (times 1/fan_in) and bias variance


def init_(module: nn.Module, sw2: float = SW2, sb2: float = SB2, bias: bool = True) -> nn.Module:
    """Weights N(0, sw2/fan_in), biases N(0, sb2) (width-independent), for Linear and Conv."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            fan_in = m.weight[0].numel()
            nn.init.normal_(m.weight, std=math.sqrt(sw2 / fan_in))
            if m.bias is not None:
                if bias:
                    nn.init.normal_(m.bias, std=math.sqrt(sb2))
                else:
                    nn.init.zeros_(m.bias)
    return module


class MLP(nn.Module):
    def __init__(self, width: int, act, d: int = 6, k: int = 32, bias: bool = True, depth: int = 2):
        super().__init__()
        self.act = act
        self.inp = nn.Linear(d, width, bias=bias)
        self.hidden = nn.ModuleList(nn.Linear(width, width, bias=bias) for _ in range(depth - 1))
        self.out = nn.Linear(width, k, bias=bias)
        init_(self, bias=bias)

    def forward(self, x):
        h = self.inp(x)
        for layer in self.hidden:
            h = layer(self.act(h))
        return self.out(self.act(h))
