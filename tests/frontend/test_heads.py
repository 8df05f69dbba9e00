"""Infinitely many heads of fixed size (``nn.MultiheadAttention(n, n // 8)``, PyTorch's own
1/√d_h logits): the frontend's limit vs the Monte Carlo reference formula of
``reference.infinite_heads_attention`` (Hron et al. 2020) and vs finite-width Monte Carlo of
the actual modules (``nn.MultiheadAttention``, ``nn.TransformerEncoderLayer``, stacked);
deep copies equal at initialization (``nn.TransformerEncoder``) lowered as one weight; errors
for what is not covered."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import tensorprograms as tp
from tensorprograms.empirical import nngp as empirical_nngp
from tensorprograms.empirical import ntk_mean

from .reference import infinite_heads_attention

B, T, D_IN, HEAD, Z = 3, 4, 3, 8, 4.5


@pytest.fixture
def x():
    gen = torch.Generator().manual_seed(3)
    return 2.0 * torch.randn(B, T, D_IN, generator=gen, dtype=torch.float64)


def _embed(width: int) -> nn.Linear:
    embed = nn.Linear(D_IN, width, bias=False)
    nn.init.normal_(embed.weight, std=D_IN ** -0.5)
    return embed


def _readout(width: int, outputs: int = 16) -> nn.Linear:
    out = nn.Linear(width, outputs, bias=False)
    nn.init.normal_(out.weight, std=width ** -0.5)
    return out


def _causal(x: torch.Tensor) -> torch.Tensor:
    return torch.triu(torch.ones(x.shape[1], x.shape[1], dtype=torch.bool), 1)


WEIGHTS = (1.0, -0.6, 0.8, 0.3)  # readout weights over positions: every pair of positions counts


def _read(o: torch.Tensor, weighted: bool) -> torch.Tensor:
    """Σ_p w_p o_p (weighted) or the mean over positions."""
    return sum(w * o[:, p] for p, w in enumerate(WEIGHTS[: o.shape[1]])) if weighted else o.mean(1)


class ManyHeads(nn.Module):
    """Embedding, nn.MultiheadAttention(width, width // 8, bias=False), readout (16 outputs, so
    each network gives 16 samples) of fixed weights over positions or of the mean."""

    def __init__(self, width: int, causal: bool = False, weighted: bool = False):
        super().__init__()
        self.embed = _embed(width)
        self.attn = nn.MultiheadAttention(width, width // HEAD, bias=False, batch_first=True)
        self.out = _readout(width)
        self.causal, self.weighted = causal, weighted

    def forward(self, x):
        h = self.embed(x)
        mask = _causal(x) if self.causal else None
        return self.out(_read(self.attn(h, h, h, need_weights=False, attn_mask=mask)[0], self.weighted))


class HandHeads(nn.Module):
    """The same attention written by hand: heads by view/transpose, logits q·kᵀ/√8."""

    def __init__(self, width: int, causal: bool = False):
        super().__init__()
        self.embed = _embed(width)
        self.qkv = nn.ModuleList(nn.Linear(width, width, bias=False) for _ in range(4))
        for lin in self.qkv:
            nn.init.normal_(lin.weight, std=width ** -0.5)
        self.out = _readout(width)
        self.causal = causal

    def forward(self, x):
        h = self.embed(x)
        Bx, Tx, n = h.shape
        q, k, v = (lin(h).view(Bx, Tx, n // HEAD, HEAD).transpose(1, 2) for lin in self.qkv[:3])
        logits = q @ k.transpose(-2, -1) / math.sqrt(HEAD)
        if self.causal:
            logits = logits.masked_fill(_causal(x), float("-inf"))
        o = (torch.softmax(logits, -1) @ v).transpose(1, 2).reshape(Bx, Tx, n)
        return self.out(self.qkv[3](o).mean(1))


def _reference(x: torch.Tensor, causal: bool, sqk2: float, sv2: float, so2: float, samples: int = 200_000):
    """The reference formula's [B·T, B·T] covariance and standard error of the attention output."""
    Xf = x.reshape(-1, D_IN).numpy()
    return infinite_heads_attention(Xf @ Xf.T / D_IN, x.shape[1], HEAD, sqk2, sv2, so2, causal=causal,
                                    samples=samples)


def _mean_over_positions(K: np.ndarray, n: int) -> np.ndarray:
    return K.reshape(n, T, n, T).mean((1, 3))


# PyTorch's init of nn.MultiheadAttention: in_proj xavier_uniform_ on [3n, n] (entry variance
# 1/(2n): σ² = 1/2 for q, k, v), out_proj kaiming_uniform_(a=√5) (1/(3n): σ² = 1/3)
MHA_SIGMAS = (0.5, 0.5, 1.0 / 3.0)


# ---------------------------------------------------------------------- vs the reference formula

def _read_reference(K: np.ndarray, se: np.ndarray, n: int, t: int, weighted: bool):
    """The readout's kernel and (an upper bound on) its standard error from the reference's
    [n·t, n·t] covariance and per-entry standard errors."""
    w = np.array(WEIGHTS[:t]) if weighted else np.full(t, 1.0 / t)
    K, se = K.reshape(n, t, n, t), se.reshape(n, t, n, t)
    return np.einsum("p,apbq,q->ab", w, K, w), np.einsum("p,apbq,q->ab", np.abs(w), se, np.abs(w))


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_multihead_attention_nngp_equals_reference_formula(x, causal):
    """The frontend's NNGP of the actual nn.MultiheadAttention(n, n // 8), read out with fixed
    weights over positions, equals the reference formula (an independent numpy Monte Carlo
    over one head) within Z combined standard errors (small case: 2 sequences of 3 positions;
    the frontend's standard error over 6 engine seeds)."""
    x = x[:2, :3].contiguous()
    K, se = tp.infinite_width(lambda w: ManyHeads(w, causal, weighted=True), x).nngp(x, stderr=True, seeds=6)
    ref, ref_se = _read_reference(*_reference(x, causal, *MHA_SIGMAS, samples=60_000), 2, 3, True)
    z = np.abs(K.numpy() - ref) / np.sqrt(se.numpy() ** 2 + ref_se ** 2)
    rel = np.linalg.norm(K.numpy() - ref) / np.linalg.norm(ref)
    print(f"max |z| {z.max():.2f}, relative Frobenius {rel:.4f}")
    assert z.max() < Z, (z.max(), K, ref)


@pytest.mark.slow
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_handwritten_heads_equal_reference_formula(x, causal):
    """Heads of size 8 written by hand (view/transpose, q·kᵀ/√8, masked_fill, softmax) lower by
    the same mechanism and equal the reference formula (σ² = 1 for every projection)."""
    K, se = tp.infinite_width(lambda w: HandHeads(w, causal), x).nngp(x, stderr=True, seeds=6)
    ref, ref_se = _read_reference(*_reference(x, causal, 1.0, 1.0, 1.0), B, T, False)
    z = np.abs(K.numpy() - ref) / np.sqrt(se.numpy() ** 2 + ref_se ** 2)
    rel = np.linalg.norm(K.numpy() - ref) / np.linalg.norm(ref)
    print(f"max |z| {z.max():.2f}, relative Frobenius {rel:.4f}")
    assert z.max() < Z, (z.max(), K, ref)


# ---------------------------------------------------------------------- vs finite width

class Encoder(nn.Module):
    """Embedding, nn.TransformerEncoderLayer(width, width // 8, 2·width, dropout=0, ReLU) ×
    layers (as nn.TransformerEncoder builds them: deep copies, equal at initialization, or
    independent layers), mean readout."""

    def __init__(self, width: int, norm_first: bool, layers: int = 1, copies: bool = True,
                 causal: bool = False):
        super().__init__()
        self.embed = _embed(width)

        def layer():
            return nn.TransformerEncoderLayer(width, width // HEAD, 2 * width, dropout=0.0,
                                              batch_first=True, norm_first=norm_first)

        if copies:
            self.enc = nn.TransformerEncoder(layer(), layers, enable_nested_tensor=False)
        else:
            self.enc = nn.Sequential(*[layer() for _ in range(layers)])
        self.out = _readout(width)
        self.causal = causal

    def forward(self, x):
        h = self.embed(x)
        if self.causal:
            mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1], dtype=x.dtype)
            h = self.enc(h, mask=mask, is_causal=True)
        else:
            h = self.enc(h)
        return self.out(h.mean(1))


def _check_against_networks(factory, x, width=1024, samples=64, seeds=4):
    """Limit (with its standard error over engine seeds) vs tp.empirical.nngp of the module."""
    K, se = tp.infinite_width(factory, x).nngp(x, stderr=True, seeds=seeds)
    emp = empirical_nngp(factory, width, x, samples=samples, seed=11)
    z = (emp.mean - K).abs() / (emp.stderr ** 2 + se ** 2).sqrt()
    rel = float((emp.mean - K).norm() / K.norm())
    print(f"max |z| {z.max():.2f}, relative Frobenius {rel:.3f}, SE limit {se.max():.2g}, "
          f"SE networks {emp.stderr.max():.2g}")
    assert z.max() < Z, (z.max(), K, emp.mean)
    return K, emp


@pytest.mark.slow
@pytest.mark.parametrize("norm_first", [True, False], ids=["pre-norm", "post-norm"])
@pytest.mark.parametrize("layers,copies", [(1, True), (2, True), (2, False)],
                         ids=["one", "encoder-copies", "independent"])
def test_transformer_encoder_layer_nngp_matches_networks(x, norm_first, layers, copies):
    """nn.TransformerEncoderLayer with num_heads = width // 8 (its own 1/√8 logits), one layer,
    two as nn.TransformerEncoder stacks them (deep copies: equal weights at initialization),
    two independent: NNGP vs 64 networks at width 1024."""
    _check_against_networks(lambda w: Encoder(w, norm_first, layers, copies), x)


@pytest.mark.slow
def test_causal_transformer_encoder_nngp_matches_networks(x):
    _check_against_networks(lambda w: Encoder(w, True, 2, causal=True), x)


class KeyPadding(ManyHeads):
    """nn.MultiheadAttention with a key padding mask read off the inputs (zero vectors)."""

    def forward(self, x):
        padding = x.abs().sum(-1) == 0
        h = self.embed(x)
        return self.out(self.attn(h, h, h, need_weights=False, key_padding_mask=padding)[0].mean(1))


@pytest.mark.slow
def test_key_padding_mask_with_many_heads_matches_networks(x):
    """Padding masks merge with the heads ([B·H, 1, T] in PyTorch's decomposition) and are the
    same for every head; the unmasked model's limit is rejected by the same networks."""
    x = x.clone()
    x[0, -1] = 0.0
    x[1, -2:] = 0.0
    _, emp = _check_against_networks(KeyPadding, x)
    unmasked = tp.infinite_width(lambda w: ManyHeads(w), x).nngp(x)
    assert ((emp.mean - unmasked).abs() / emp.stderr).max() > Z


@pytest.mark.slow
def test_deep_copies_differ_from_independent_layers(x):
    """The two stacks' limits differ (so the copies' test above can tell them apart)."""
    K_copies = tp.infinite_width(lambda w: Encoder(w, True, 2, True), x).nngp(x)
    K_indep = tp.infinite_width(lambda w: Encoder(w, True, 2, False), x).nngp(x)
    print(f"max relative difference {((K_copies - K_indep).abs() / K_indep.abs().max()).max():.3f}")
    assert ((K_copies - K_indep).abs() / K_indep.abs().max()).max() > 0.1


def _empirical_ntk(factory, x, width, samples):
    """tp.empirical.ntk_mean without PyTorch's fused attention kernels (flash SDPA and the
    encoder layer's fast path have no forward-mode AD)."""
    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            return ntk_mean(factory, width, x, samples=samples, seed=5, parametrization="ntk")
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)


class MergedReadout(HandHeads):
    """Hand-written heads read out directly from the merged heads (no output projection)."""

    def forward(self, x):
        h = self.embed(x)
        Bx, Tx, n = h.shape
        q, k, v = (lin(h).view(Bx, Tx, n // HEAD, HEAD).transpose(1, 2) for lin in self.qkv[:3])
        o = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(HEAD), -1) @ v
        return self.out(o.transpose(1, 2).reshape(Bx, Tx, n).mean(1))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["attention-causal", "encoder-pre-norm", "merged-readout"])
def test_infinite_heads_ntk_matches_networks(x, name):
    """NTK (NTK parametrization) vs tp.empirical.ntk_mean at width 512 (64 heads), 16 networks:
    the backward pass through the random per-head logits and the split projections (and the
    readout's cotangent seed on merged heads)."""
    factory = {"attention-causal": lambda w: ManyHeads(w, True),
               "encoder-pre-norm": lambda w: Encoder(w, True, 1),
               "merged-readout": MergedReadout}[name]
    theta, se = tp.infinite_width(factory, x).ntk(x, stderr=True, seeds=4)
    emp = _empirical_ntk(factory, x, 512, 16)
    z = (emp.mean - theta).abs() / (emp.stderr ** 2 + se ** 2).sqrt()
    rel = float((emp.mean - theta).norm() / theta.norm())
    print(f"max |z| {z.max():.2f}, relative Frobenius {rel:.3f}, SE limit {se.max():.2g}, "
          f"SE networks {emp.stderr.max():.2g}")
    assert z.max() < Z, (z.max(), theta, emp.mean)


# ---------------------------------------------------------------------- deep copies

class CopiedMLP(nn.Module):
    """a = relu(input); out(relu(hidden(a) + second(a))), second = hidden again (shared), a deep
    copy of it, or a fresh layer."""

    def __init__(self, width: int, second: str):
        super().__init__()
        self.inp = nn.Linear(D_IN, width)
        self.hidden = nn.Linear(width, width)
        if second != "shared":
            self.second = copy.deepcopy(self.hidden) if second == "copy" else nn.Linear(width, width)
        self.out = nn.Linear(width, 1)

    def forward(self, x):
        a = torch.relu(self.inp(x))
        g = self.hidden(a)
        # the second layer's output is added to the first's: with one weight they are correlated
        return self.out(torch.relu(g + getattr(self, "second", self.hidden)(a)))


def test_deep_copies_are_lowered_as_one_weight(x):
    """A layer and its deep copy are the same random matrix at initialization: the limit equals
    the weight-shared model's (to rounding) and differs from independent layers'."""
    x = x[:, 0]
    shared, copied, fresh = (tp.infinite_width(lambda w, s=s: CopiedMLP(w, s), x).nngp(x)
                             for s in ("shared", "copy", "fresh"))
    torch.testing.assert_close(copied, shared, rtol=1e-12, atol=0)
    assert ((fresh - shared).abs() / shared.abs().max()).max() > 1e-3


def test_ntk_of_deep_copies_is_rejected(x):
    x = x[:, 0]
    limit = tp.infinite_width(lambda w: CopiedMLP(w, "copy"), x)
    with pytest.raises(tp.UnsupportedOperation, match="equal at initialization") as info:
        limit.ntk(x)
    assert "'hidden.weight' and 'second.weight'" in str(info.value)


# ---------------------------------------------------------------------- errors

def _error(factory, x, *needles):
    with pytest.raises(tp.UnsupportedOperation) as info:
        tp.infinite_width(factory, x).nngp(x)
    msg = str(info.value)
    for needle in needles:
        assert needle in msg, msg
    return msg


class PerHeadMask(ManyHeads):
    """A 3-D attn_mask [B·heads, T, T] that differs between heads."""

    def forward(self, x):
        h = self.embed(x)
        heads = self.attn.num_heads
        rows = torch.arange(x.shape[0] * heads)[:, None, None]  # (example, head) pairs
        pos = torch.arange(x.shape[1])
        mask = (rows % 2 == 0) & (pos[None, None, :] > pos[None, :, None])  # causal for every other head
        return self.out(self.attn(h, h, h, need_weights=False, attn_mask=mask)[0].mean(1))  # mask-line


def test_per_head_mask_with_many_heads_is_rejected(x):
    _error(lambda w: PerHeadMask(w), x, "differs between heads", "mask-line")


class SplitAndWhole(HandHeads):
    """The query projection used through its heads and also as a whole vector."""

    def forward(self, x):
        h = self.embed(x)
        Bx, Tx, n = h.shape
        q = self.qkv[0](h)
        heads = q.view(Bx, Tx, n // HEAD, HEAD).transpose(1, 2)
        a = torch.softmax(heads @ heads.transpose(-2, -1) / math.sqrt(HEAD), -1) @ heads
        return self.out((self.qkv[3](a.transpose(1, 2).reshape(Bx, Tx, n)) + q).mean(1))


def test_projection_used_split_and_whole_is_rejected(x):
    _error(lambda w: SplitAndWhole(w), x, "split into heads of fixed size and also used unsplit")


class HeadReduction(HandHeads):
    """A softmax over the heads' axis (mixes the heads)."""

    def forward(self, x):
        h = self.embed(x)
        Bx, Tx, n = h.shape
        q = self.qkv[0](h).view(Bx, Tx, n // HEAD, HEAD)
        return self.out(torch.softmax(q, 2).reshape(Bx, Tx, n).mean(1))  # reduction-line


def test_reduction_over_heads_is_rejected(x):
    _error(lambda w: HeadReduction(w), x, "over the heads", "reduction-line")
