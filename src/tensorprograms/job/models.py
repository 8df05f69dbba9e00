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
    """``nn.GRU`` reading the signal in ``STEPS`` consecutive chunks (one chunk of d/STEPS
    values per step); linear readout of the last state.

    Few steps keep the limit affordable: a GRU's limit kernel is a Monte Carlo expectation
    whose dimension grows with the number of steps (12 per step), and its cost with the
    pairs of steps (docs/sequence-models.md). PyTorch's default GRU initialization draws
    *every* weight with variance 1/(3·width), including the input weights of finite fan-in,
    so the input's effect vanishes as the width grows (the frontend rejects it with a
    WidthError). Here input weights are N(0, 1/fan_in), recurrent weights N(0, 1/width),
    biases zero."""

    STEPS = 4

    def __init__(self, width: int, d: int, classes: int):
        super().__init__()
        if d % self.STEPS:
            raise ValueError(f"the GRU reads {self.STEPS} chunks: d={d} must be a multiple of it")
        chunk = d // self.STEPS
        self.gru = nn.GRU(chunk, width, batch_first=True)
        nn.init.normal_(self.gru.weight_ih_l0, std=chunk ** -0.5)
        nn.init.normal_(self.gru.weight_hh_l0, std=width ** -0.5)
        nn.init.zeros_(self.gru.bias_ih_l0)
        nn.init.zeros_(self.gru.bias_hh_l0)
        self.out = nn.Linear(width, classes)

    def forward(self, x):
        h, _ = self.gru(x.reshape(x.shape[0], self.STEPS, -1))
        return self.out(h[:, -1])


MODELS = {"MLP": MLP, "CNN": CNN, "GRU": GRU}


def factory(name: str, d: int, classes: int):
    """``width -> nn.Module`` for model ``name`` on inputs of dimension ``d``."""
    return partial(MODELS[name], d=d, classes=classes)
