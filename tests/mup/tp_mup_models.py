"""Small user models (plain PyTorch, default initialisation) used by the tests."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def mlp(width: int, d_in: int = 16, d_out: int = 10, depth: int = 3) -> nn.Module:
    layers: list[nn.Module] = [nn.Linear(d_in, width), nn.ReLU()]
    for _ in range(depth - 1):
        layers += [nn.Linear(width, width), nn.ReLU()]
    layers.append(nn.Linear(width, d_out))
    return nn.Sequential(*layers)


class CNN(nn.Module):
    def __init__(self, width: int, channels: int = 3, classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv1(x))
        h = F.relu(self.conv2(h))
        return self.head(h.mean(dim=(2, 3)))


class Block(nn.Module):
    """Pre-LN transformer block with SDPA (head dim grows with width)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(width)
        self.q = nn.Linear(width, width)
        self.k = nn.Linear(width, width)
        self.v = nn.Linear(width, width)
        self.o = nn.Linear(width, width)
        self.ln2 = nn.LayerNorm(width)
        self.up = nn.Linear(width, 4 * width)
        self.down = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, n = x.shape
        h = self.ln1(x)

        def split(z: torch.Tensor) -> torch.Tensor:
            return z.view(b, t, self.heads, n // self.heads).transpose(1, 2)

        a = F.scaled_dot_product_attention(split(self.q(h)), split(self.k(h)), split(self.v(h)))
        x = x + self.o(a.transpose(1, 2).reshape(b, t, n))
        return x + self.down(F.gelu(self.up(self.ln2(x))))


class TinyLM(nn.Module):
    def __init__(self, width: int, vocab: int = 32, heads: int = 4, tied: bool = False) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.block = Block(width, heads)
        self.ln = nn.LayerNorm(width)
        self.readout = nn.Linear(width, vocab, bias=False)
        if tied:
            self.readout.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.readout(self.ln(self.block(self.embed(tokens))))


class MHALM(nn.Module):
    """Uses nn.MultiheadAttention (detected statically)."""

    def __init__(self, width: int, vocab: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.readout = nn.Linear(width, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)
        a, _ = self.attn(h, h, h)
        return self.readout(h + a)


class ExplicitLM(nn.Module):
    """Attention written out by hand, with the usual 1/sqrt(d) division."""

    def __init__(self, width: int, vocab: int = 32, heads: int = 4, style: str = "div") -> None:
        super().__init__()
        self.heads, self.style = heads, style
        self.embed = nn.Embedding(vocab, width)
        self.qkv = nn.Linear(width, 3 * width)
        self.readout = nn.Linear(width, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)
        b, t, n = h.shape
        d = n // self.heads
        q, k, v = (z.view(b, t, self.heads, d).transpose(1, 2) for z in self.qkv(h).chunk(3, -1))
        if self.style == "div":
            logits = q @ k.transpose(-2, -1) / math.sqrt(d)
        else:
            logits = d**-0.5 * torch.matmul(q, k.transpose(-2, -1))
        a = torch.softmax(logits, dim=-1) @ v
        return self.readout(h + a.transpose(1, 2).reshape(b, t, n))
