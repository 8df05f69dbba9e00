"""tp.init.normal_: σ_w²/fan_in per weight entry, σ_b² per bias entry, embedding tables
σ_w², norm layers untouched; the frontend reads the same variances back."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import tensorprograms as tp
from tensorprograms.frontend import read_initialization


class Net(nn.Module):
    def __init__(self, n: int):
        super().__init__()
        self.emb = nn.Embedding(5, n)
        self.gru = nn.GRU(n, n, batch_first=True)
        self.conv = nn.Conv1d(n, n, 3)
        self.ln = nn.LayerNorm(n)
        self.out = nn.Linear(n, 2)


def test_variances_read_back_by_the_frontend():
    factory = lambda n: tp.init.normal_(Net(n), 1.5, 0.1)  # noqa: E731
    inits = read_initialization(factory, (64, 128))
    for name, init in inits.items():
        shape = init.shapes[0]
        if name == "emb.weight":
            want = 1.5
        elif name.startswith("ln."):
            want = 0.0  # constant (1 and 0), as PyTorch left them
        elif len(shape) >= 2:
            want = 1.5 / (shape[1] * (shape[2] if len(shape) > 2 else 1))
        else:
            want = 0.1
        assert float(init.variances[0]) == pytest.approx(want, rel=1e-12), name
    m = factory(8)
    assert torch.equal(m.ln.weight, torch.ones(8)) and torch.equal(m.ln.bias, torch.zeros(8))


def test_zero_bias_variance_gives_zero_biases_and_bad_arguments_raise():
    m = tp.init.normal_(nn.Linear(4, 3), 2.0)
    assert torch.equal(m.bias, torch.zeros(3))
    with pytest.raises(ValueError, match="weight_variance must be a number ≥ 0"):
        tp.init.normal_(nn.Linear(4, 3), -1.0)
    with pytest.raises(TypeError, match="nn.Module"):
        tp.init.normal_(torch.zeros(3))
