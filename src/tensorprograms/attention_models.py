"""Plain PyTorch attention models with an infinite-width limit (1/d attention scaling).

Used by the tests, the docs and ``examples/convergence_transformer.py``. Every model takes
sequences ``x`` of shape ``[batch, positions, d_in]`` and returns ``[batch, k]``. Weights are
initialized ``N(0, σ²/fan_in)`` explicitly, so the limit and the finite-width Monte Carlo
see the same variances.

The attention logits are ``q·k/d`` (d = head dimension ∝ width). With independent query
and key weights their limit ``E[Z^q Z^k]`` is 0 (uniform attention over the allowed keys);
``shared_qk=True`` uses one projection for queries and keys (as Reformer does), so the
limiting logits ``σ² E[Z^u_i Z^u_j]`` depend on the inputs.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


def _normal_(linear: nn.Linear, sigma2: float, bias_variance: float = 0.0) -> nn.Linear:
    nn.init.normal_(linear.weight, std=math.sqrt(sigma2 / linear.in_features))
    if linear.bias is not None:
        if bias_variance > 0:
            nn.init.normal_(linear.bias, std=math.sqrt(bias_variance))
        else:
            nn.init.zeros_(linear.bias)
    return linear


class SelfAttention(nn.Module):
    """Multi-head self-attention with logits ``q·k/head_dim`` (the 1/d scaling).

    Args:
        width: model width n; ``heads`` must divide it (head dim n/heads ∝ n).
        shared_qk: one projection for queries and keys (non-uniform limiting attention).
        causal: attend only to positions ≤ the query's.
        impl: ``"sdpa"`` (``F.scaled_dot_product_attention(scale=1/head_dim)``) or
            ``"hand"`` (``softmax(q @ kᵀ / head_dim) @ v``, masks by ``masked_fill``).
        sigma2: σ² of the projections.
    """

    def __init__(self, width: int, heads: int = 1, shared_qk: bool = True, causal: bool = False,
                 impl: str = "sdpa", sigma2: float = 1.0):
        super().__init__()
        if width % heads:
            raise ValueError(f"heads={heads} must divide width={width}")
        if impl not in ("sdpa", "hand"):
            raise ValueError(f"impl must be 'sdpa' or 'hand', got {impl!r}")
        self.heads, self.causal, self.impl, self.shared_qk = heads, causal, impl, shared_qk
        self.q = _normal_(nn.Linear(width, width, bias=False), sigma2)
        self.k = None if shared_qk else _normal_(nn.Linear(width, width, bias=False), sigma2)
        self.v = _normal_(nn.Linear(width, width, bias=False), sigma2)
        self.o = _normal_(nn.Linear(width, width, bias=False), sigma2)

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        B, T, n = t.shape
        return t.view(B, T, self.heads, n // self.heads).transpose(1, 2)  # [B, H, T, d]

    def forward(self, h: torch.Tensor, key_padding: torch.Tensor | None = None) -> torch.Tensor:
        """``h`` ``[B, T, n]``; ``key_padding`` ``[B, T]`` bool, True where a key is padding."""
        B, T, n = h.shape
        q = self._split(self.q(h))
        k = q if self.shared_qk else self._split(self.k(h))
        v = self._split(self.v(h))
        d = n // self.heads
        mask = None
        if key_padding is not None:
            mask = ~key_padding[:, None, None, :]  # True = attend
        if self.impl == "sdpa":
            if self.causal and mask is not None:
                causal = torch.ones(T, T, dtype=torch.bool).tril()
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask & causal, scale=1.0 / d)
            else:
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=self.causal,
                                                     scale=1.0 / d)
        else:
            logits = q @ k.transpose(-2, -1) / d
            if self.causal:
                logits = logits.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
            if mask is not None:
                logits = logits.masked_fill(~mask, float("-inf"))
            out = torch.softmax(logits, dim=-1) @ v
        return self.o(out.transpose(1, 2).reshape(B, T, n))


class TransformerBlock(nn.Module):
    """One transformer block: attention and a ReLU (or GELU) feed-forward, each with a residual.

    ``norm_first=True`` (pre-norm): ``h + Attn(LN(h))``, then ``h + FF(LN(h))``;
    ``False`` (post-norm): ``LN(h + Attn(h))``, then ``LN(h + FF(h))``. LayerNorms have
    PyTorch's default constant gains/biases (1, 0).
    """

    def __init__(self, width: int, heads: int = 1, norm_first: bool = True, shared_qk: bool = True,
                 causal: bool = False, impl: str = "hand", ff_ratio: int = 2, sigma2: float = 1.0,
                 activation: str = "relu"):
        super().__init__()
        if activation not in ("relu", "gelu"):
            raise ValueError(f"activation must be 'relu' or 'gelu', got {activation!r}")
        self.act = torch.relu if activation == "relu" else F.gelu
        self.norm_first = norm_first
        self.attn = SelfAttention(width, heads, shared_qk, causal, impl, sigma2)
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.ff1 = _normal_(nn.Linear(width, ff_ratio * width, bias=False), 2.0)
        self.ff2 = _normal_(nn.Linear(ff_ratio * width, width, bias=False), sigma2)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.norm_first:
            h = h + self.attn(self.ln1(h))
            return h + self.ff2(self.act(self.ff1(self.ln2(h))))
        h = self.ln1(h + self.attn(h))
        return self.ln2(h + self.ff2(self.act(self.ff1(h))))


class SequenceModel(nn.Module):
    """``Linear(d_in, n)`` per position, ``blocks``, mean over positions (or one position),
    then ``Linear(n, k)``."""

    def __init__(self, width: int, blocks: list[nn.Module] | nn.Module, d_in: int = 3, k: int = 1,
                 readout: str | int = "mean", input_bias_variance: float = 0.25,
                 positions: int = 0, positional_variance: float = 1.0):
        super().__init__()
        self.embed = _normal_(nn.Linear(d_in, width), 1.0, input_bias_variance)
        # learned positional embeddings: an input layer over the (finite) positions
        self.pos = nn.Embedding(positions, width) if positions else None
        if self.pos is not None:
            nn.init.normal_(self.pos.weight, std=math.sqrt(positional_variance))
        self.blocks = nn.Sequential(*blocks) if isinstance(blocks, list) else blocks
        self.readout = readout
        self.out = _normal_(nn.Linear(width, k, bias=False), 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        if self.pos is not None:
            h = h + self.pos(torch.arange(x.shape[1]))
        h = self.blocks(h)
        h = h.mean(1) if self.readout == "mean" else h[:, self.readout]
        return self.out(h)


def transformer_block(width: int) -> nn.Module:
    """The single-head 1/d-attention transformer block used for convergence plots: input
    layer, pre-norm block (shared-QK attention, LayerNorm, ReLU feed-forward, residuals),
    mean over positions, ``Linear(width, 1)``."""
    return SequenceModel(width, [TransformerBlock(width, heads=1, norm_first=True)])
