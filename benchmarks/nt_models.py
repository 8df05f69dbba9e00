"""The PyTorch twins of the neural-tangents architectures in nt_compare.py (NTK-style init:
weights N(0, sw2 / fan_in), biases N(0, sb2))."""

from __future__ import annotations

import math

import torch
from torch import nn


def _init(module: nn.Module, sw2: float, sb2: float) -> nn.Module:
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.normal_(m.weight, std=math.sqrt(sw2 / m.weight[0].numel()))
            nn.init.normal_(m.bias, std=math.sqrt(sb2))
    return module


class MLP(nn.Module):
    """depth × [Linear, ReLU], then a Linear readout (stax: depth × [Dense, Relu], Dense)."""

    def __init__(self, width: int, d: int, depth: int, sw2: float, sb2: float):
        super().__init__()
        sizes = [d] + [width] * depth
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        self.out = nn.Linear(width, 1)
        _init(self, sw2, sb2)

    def forward(self, x):
        for layer in self.layers:
            x = torch.relu(layer(x))
        return self.out(x)


class CNN(nn.Module):
    """Myrtle-style: 2 × [conv 3×3 SAME, ReLU], avgpool 2×2, conv 3×3, ReLU, global avgpool, dense."""

    def __init__(self, width: int, cin: int, sw2: float, sb2: float):
        super().__init__()
        self.c1 = nn.Conv2d(cin, width, 3, padding=1)
        self.c2 = nn.Conv2d(width, width, 3, padding=1)
        self.c3 = nn.Conv2d(width, width, 3, padding=1)
        self.out = nn.Linear(width, 1)
        _init(self, sw2, sb2)

    def forward(self, x):
        x = torch.relu(self.c2(torch.relu(self.c1(x))))
        x = torch.relu(self.c3(nn.functional.avg_pool2d(x, 2)))
        return self.out(x.mean(dim=(2, 3)))


class FlatCNN(nn.Module):
    """2 × [conv 3×3 SAME, ReLU], flatten, dense (stax: 2 × [Conv, Relu], Flatten, Dense): no
    pooling, so the kernels need only same-position covariances."""

    def __init__(self, width: int, cin: int, side: int, sw2: float, sb2: float):
        super().__init__()
        self.c1 = nn.Conv2d(cin, width, 3, padding=1)
        self.c2 = nn.Conv2d(width, width, 3, padding=1)
        self.out = nn.Linear(width * side * side, 1)
        _init(self, sw2, sb2)

    def forward(self, x):
        return self.out(torch.relu(self.c2(torch.relu(self.c1(x)))).flatten(1))


class PoolFlatCNN(nn.Module):
    """2 × [conv 3×3 SAME, ReLU], avgpool 2×2, conv 3×3, ReLU, flatten, dense: the pairs
    within each pooling window below the pool, the same-position pairs above it."""

    def __init__(self, width: int, cin: int, side: int, sw2: float, sb2: float):
        super().__init__()
        self.c1 = nn.Conv2d(cin, width, 3, padding=1)
        self.c2 = nn.Conv2d(width, width, 3, padding=1)
        self.c3 = nn.Conv2d(width, width, 3, padding=1)
        self.out = nn.Linear(width * (side // 2) ** 2, 1)
        _init(self, sw2, sb2)

    def forward(self, x):
        x = torch.relu(self.c2(torch.relu(self.c1(x))))
        return self.out(torch.relu(self.c3(nn.functional.avg_pool2d(x, 2))).flatten(1))
