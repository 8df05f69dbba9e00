"""Recurrent test models (plain PyTorch), with initializations stated in code.

``init_normal_`` (``tp.init.normal_`` with this file's σ²) gives every weight
N(0, σ_w²/fan_in) and every bias N(0, σ_b²): the width-independent input-layer variance
an infinite-width limit needs (PyTorch's default RNN init, U(±1/√hidden) for every weight,
makes the input weights vanish with width).
"""

from __future__ import annotations

import torch
from torch import nn

import tensorprograms as tp

D = 3  # input features per time step
SW2, SB2 = 1.5, 0.1


def init_normal_(module: nn.Module, sw2: float = SW2, sb2: float = SB2) -> nn.Module:
    return tp.init.normal_(module, sw2, sb2)


class Fused(nn.Module):
    """``nn.RNN``/``nn.GRU``/``nn.LSTM`` + a readout of the last state or the mean over time."""

    def __init__(self, width: int, kind: str = "rnn", layers: int = 1, bidirectional: bool = False,
                 batch_first: bool = True, readout: str = "last", nonlinearity: str = "tanh", k: int = 32):
        super().__init__()
        kw = {"num_layers": layers, "bidirectional": bidirectional, "batch_first": batch_first}
        if kind == "rnn":
            kw["nonlinearity"] = nonlinearity
        self.rnn = {"rnn": nn.RNN, "gru": nn.GRU, "lstm": nn.LSTM}[kind](D, width, **kw)
        self.batch_first, self.readout = batch_first, readout
        self.out = nn.Linear(width * (2 if bidirectional else 1), k)
        init_normal_(self)

    def forward(self, x):  # x: [batch, time, D]
        y, _ = self.rnn(x if self.batch_first else x.transpose(0, 1))
        y = y if self.batch_first else y.transpose(0, 1)
        return self.out(y[:, -1] if self.readout == "last" else y.mean(1))


class Loop(nn.Module):
    """The same recurrences written as a Python loop over time with shared cells."""

    def __init__(self, width: int, cell: str = "rnn", k: int = 32):
        super().__init__()
        self.width, self.kind = width, cell
        if cell == "erf":
            self.U, self.W = nn.Linear(D, width), nn.Linear(width, width, bias=False)
        else:
            self.cell = {"rnn": nn.RNNCell, "gru": nn.GRUCell, "lstm": nn.LSTMCell}[cell](D, width)
        self.out = nn.Linear(width, k)
        init_normal_(self)

    def forward(self, x):
        h = torch.zeros(x.shape[0], self.width, dtype=x.dtype)
        c = torch.zeros_like(h)
        for t in range(x.shape[1]):
            if self.kind == "erf":
                h = torch.erf(self.W(h) + self.U(x[:, t]))
            elif self.kind == "lstm":
                h, c = self.cell(x[:, t], (h, c))
            else:
                h = self.cell(x[:, t], h)
        return self.out(h)


class TokenRNN(nn.Module):
    """Token ids -> ``nn.Embedding`` (finite vocabulary) -> ``nn.RNN`` -> mean over time."""

    def __init__(self, width: int, vocab: int = 5, k: int = 32):
        super().__init__()
        self.emb = nn.Embedding(vocab, width)  # default N(0, 1) rows: width-independent
        self.rnn = nn.RNN(width, width, batch_first=True)
        self.out = nn.Linear(width, k)
        init_normal_(self.rnn)
        init_normal_(self.out)

    def forward(self, tokens):
        y, _ = self.rnn(self.emb(tokens))
        return self.out(y.mean(1))
