"""The main job's models: ordinary PyTorch modules (PyTorch's default initialization)
taking ``[N, d]`` float inputs (a signal of length d) and returning ``[N, classes]``."""

from __future__ import annotations

from functools import partial

import torch
from torch import nn


class MLP(nn.Module):
    """``d → width → width → classes``, ReLU."""

    def __init__(self, width: int, d: int, classes: int):
        super().__init__()
        self.l1, self.l2 = nn.Linear(d, width), nn.Linear(width, width)
        self.out = nn.Linear(width, classes)

    def forward(self, x):
        return self.out(torch.relu(self.l2(torch.relu(self.l1(x)))))


class CNN(nn.Module):
    """1-D CNN on the signal: conv(5, stride 4) → ReLU → conv(3, stride 2) → ReLU →
    flatten → linear. Two strided convolutions keep the number of positions (and the
    limit kernel's cost, which grows with position pairs) small."""

    def __init__(self, width: int, d: int, classes: int):
        super().__init__()
        self.c1 = nn.Conv1d(1, width, 5, stride=4, padding=2)
        self.c2 = nn.Conv1d(width, width, 3, stride=2, padding=1)
        positions = ((d + 4 - 5) // 4 + 1 + 2 - 3) // 2 + 1
        self.out = nn.Linear(width * positions, classes)

    def forward(self, x):
        h = torch.relu(self.c1(x[:, None, :]))
        h = torch.relu(self.c2(h))
        return self.out(h.flatten(1))


class GRU(nn.Module):
    """``nn.GRU`` reading the signal one value per step; linear readout of the last state."""

    def __init__(self, width: int, d: int, classes: int):
        super().__init__()
        self.gru = nn.GRU(1, width, batch_first=True)
        self.out = nn.Linear(width, classes)

    def forward(self, x):
        h, _ = self.gru(x[:, :, None])
        return self.out(h[:, -1])


MODELS = {"MLP": MLP, "CNN": CNN, "GRU": GRU}


def factory(name: str, d: int, classes: int):
    """``width -> nn.Module`` for model ``name`` on inputs of dimension ``d``."""
    return partial(MODELS[name], d=d, classes=classes)
