"""Coordinate checks, SP vs μP, for an MLP, a CNN and a transformer block.

    PYTHONPATH=src python examples/mup_coord_check.py --out out/coord_check

Writes one PNG per (model, parametrization, optimizer) and prints the slope tables.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F
from torch import nn

import tensorprograms.mup as mup


def mlp(width: int) -> nn.Module:
    return nn.Sequential(nn.Linear(16, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                         nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10))


class CNN(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.head = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.conv2(F.relu(self.conv1(x)))).mean(dim=(2, 3)))


class Block(nn.Module):
    def __init__(self, width: int, vocab: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.embed = nn.Embedding(vocab, width)
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.o = nn.Linear(width, width)
        self.up, self.down = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)
        self.readout = nn.Linear(width, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        b, t, n = x.shape
        q, k, v = (z.view(b, t, self.heads, -1).transpose(1, 2)
                   for z in self.qkv(self.ln1(x)).chunk(3, -1))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(a.transpose(1, 2).reshape(b, t, n))
        x = x + self.down(F.gelu(self.up(self.ln2(x))))
        return self.readout(x)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="out/coord_check")
    ap.add_argument("--widths", type=int, nargs="+", default=[128, 256, 512, 1024])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--seeds", type=int, default=3)
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    cases = {
        "mlp": (mlp, (torch.randn(64, 16, generator=g), torch.randint(0, 10, (64,), generator=g)),
                {"sgd": 0.1, "adam": 1e-2}),
        "cnn": (CNN, (torch.randn(32, 3, 8, 8, generator=g),
                      torch.randint(0, 10, (32,), generator=g)), {"sgd": 0.1, "adam": 3e-3}),
        "transformer": (Block, (torch.randint(0, 32, (8, 16), generator=g),
                                torch.randint(0, 32, (8, 16), generator=g)),
                        {"sgd": 0.05, "adam": 3e-3}),
    }
    for name, (factory, data, lrs) in cases.items():
        for p in ("standard", "mup"):
            for opt in ("sgd", "adam"):
                res = mup.coord_check(factory, a.widths, data, steps=a.steps, parametrization=p,
                                      optimizer=opt, lr=lrs[opt], seeds=a.seeds, progress=True)
                print(f"\n== {name}", res.summary(), sep="\n")
                res.plot(os.path.join(a.out, f"{name}_{p}_{opt}.png"))


if __name__ == "__main__":
    main()
