"""Attention and transformer blocks (1/d scaling): the limit of the actual PyTorch modules
vs a closed-form layer recursion and vs finite-width Monte Carlo; 1/√d and other
settings without a limit are rejected with errors naming the op and the source line."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import tensorprograms as tp
from tensorprograms.attention_models import SelfAttention, SequenceModel, TransformerBlock
from tensorprograms.empirical import nngp as empirical_nngp
from tensorprograms.empirical import ntk_mean
from tensorprograms.frontend.rules_positional import sinusoidal_table

from .reference import apply_pair, infinite_heads_attention, relu_pair

WIDTH, SAMPLES, Z = 1024, 100, 4.5
B, T, D_IN, EPS = 3, 4, 3, 1e-5


@pytest.fixture
def x():
    gen = torch.Generator().manual_seed(3)
    return torch.randn(B, T, D_IN, generator=gen, dtype=torch.float64)


@pytest.fixture
def x_padded(x):
    """The last position of the first sequence and the last two of the second are padding
    (zero vectors); the models mask them as keys."""
    x = x.clone()
    x[0, -1] = 0.0
    x[1, -2:] = 0.0
    return x


class Padded(nn.Module):
    """Input layer, attention with a key padding mask read off the inputs, mean readout."""

    def __init__(self, width, heads=2, impl="sdpa", causal=False, shared_qk=True):
        super().__init__()
        self.model = SequenceModel(width, [], d_in=D_IN)
        self.attn = SelfAttention(width, heads, shared_qk, causal, impl)

    def forward(self, x):
        padding = x.abs().sum(-1) == 0  # [B, T]
        h = self.model.embed(x)
        h = h + self.attn(h, key_padding=padding)
        return self.model.out(h.mean(1))


def check_against_monte_carlo(factory, x, width=WIDTH, samples=SAMPLES):
    K = tp.infinite_width(factory, x).nngp(x)
    emp = empirical_nngp(factory, width, x, samples=samples, seed=11)
    z = (emp.mean - K).abs() / emp.stderr
    assert z.max() < Z, f"max |MC - limit| / SE = {z.max():.2f}"
    return K


# ---------------------------------------------------------------------- closed form

def _normalize(K: np.ndarray) -> np.ndarray:
    """LayerNorm of a zero-mean Gaussian vector: Z_i / sqrt(E[Z_i²] + eps)."""
    s = np.sqrt(np.diag(K) + EPS)
    return K / np.outer(s, s)


def _attention_matrix(logits: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Softmax over keys of the same sequence (mask: which (query, key) pairs may attend)."""
    z = np.where(mask, logits, -np.inf)
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def block_recursion(x: np.ndarray, norm_first: bool, causal: bool = False,
                    positional_variance: float = 0.0) -> np.ndarray:
    """The NNGP of SequenceModel(TransformerBlock) from the math, over all N = B·T positions.

    Input layer: K0 = <x, x'>/d_in + σ_b². Shared-QK attention with 1/d logits: the logits
    converge to σ_q² E[u_i u_j] (u the attention's input), the weights A to their softmax over
    keys of the same sequence, the output's covariance to σ_v² σ_o² A K_u Aᵀ. Residuals add
    covariances (fresh matrices are independent). LayerNorm of a zero-mean Gaussian vector
    divides by sqrt(K_ii + eps). ReLU: arc-cosine kernel. Readout: mean over positions.
    A learned positional embedding adds an independent N(0, σ_p²) vector per position.
    """
    b, t, d = x.shape
    X = x.reshape(b * t, d)
    seq = np.repeat(np.arange(b), t)
    pos = np.tile(np.arange(t), b)
    K0 = X @ X.T / d + 0.25 + positional_variance * (pos[:, None] == pos[None, :])
    mask = seq[:, None] == seq[None, :]
    if causal:
        mask &= pos[None, :] <= pos[:, None]

    def attention(Ku):
        A = _attention_matrix(Ku, mask)
        return A @ Ku @ A.T

    def feed_forward(Ku):
        return apply_pair(2.0 * Ku, relu_pair)  # W2 has σ² = 1

    if norm_first:
        U = _normalize(K0)
        K1 = K0 + attention(U)
        K2 = K1 + feed_forward(_normalize(K1))
    else:
        K1 = _normalize(K0 + attention(K0))
        K2 = _normalize(K1 + feed_forward(K1))
    return K2.reshape(b, t, b, t).mean(axis=(1, 3))


@pytest.mark.parametrize("norm_first, causal", [(True, False), (False, True)],
                         ids=["pre-norm", "post-norm-causal"])
def test_transformer_block_equals_recursion(x, norm_first, causal):
    def factory(w):
        return SequenceModel(w, [TransformerBlock(w, norm_first=norm_first, causal=causal)])

    K = tp.infinite_width(factory, x).nngp(x)
    ref = block_recursion(x.numpy(), norm_first, causal)
    rel = np.abs(K.numpy() - ref).max() / np.abs(ref).max()
    assert rel < 1e-8, f"relative error {rel:.2e}"


def test_learned_positional_embedding_equals_recursion(x):
    def factory(w):
        return SequenceModel(w, [TransformerBlock(w, causal=True)], positions=6, positional_variance=0.5)

    K = tp.infinite_width(factory, x).nngp(x)
    ref = block_recursion(x.numpy(), True, True, positional_variance=0.5)
    rel = np.abs(K.numpy() - ref).max() / np.abs(ref).max()
    assert rel < 1e-8, f"relative error {rel:.2e}"


def test_heads_share_one_limit(x):
    """Every head's logits converge to the same Moment, so the limit does not depend on the
    number of heads (and sdpa equals hand-written attention)."""
    K = [tp.infinite_width(lambda w, h=h, i=i: SequenceModel(w, [SelfAttention(w, h, impl=i, causal=True)]),
                           x).nngp(x) for h, i in ((1, "hand"), (4, "sdpa"))]
    torch.testing.assert_close(K[1], K[0], rtol=1e-12, atol=0)


def test_independent_qk_attends_uniformly(x):
    """With independent W_Q, W_K the 1/d logits converge to E[Z^q Z^k] = 0: causal attention
    becomes the running mean over earlier positions."""

    class RunningMean(nn.Module):
        def __init__(self, width):
            super().__init__()
            self.attn = SelfAttention(width, 2, shared_qk=False, causal=True)

        def forward(self, h):
            t = h.shape[1]
            causal = torch.ones(t, t, dtype=h.dtype).tril()
            weights = causal / causal.sum(1, keepdim=True)  # [query, key]: 1/(i+1) for keys ≤ i
            v = self.attn.v(h)
            return self.attn.o((v[:, None] * weights[None, :, :, None]).sum(2))

    K = tp.infinite_width(lambda w: SequenceModel(w, [SelfAttention(w, 2, shared_qk=False, causal=True)]),
                          x).nngp(x)
    ref = tp.infinite_width(lambda w: SequenceModel(w, [RunningMean(w)]), x).nngp(x)
    torch.testing.assert_close(K, ref, rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------------- Monte Carlo

@pytest.mark.slow
def test_hand_written_attention_monte_carlo(x):
    check_against_monte_carlo(lambda w: SequenceModel(w, [SelfAttention(w, 1, impl="hand")]), x)


def test_sdpa_heads_causal_monte_carlo(x):
    check_against_monte_carlo(
        lambda w: SequenceModel(w, [SelfAttention(w, 4, causal=True)], readout=-1), x, samples=32)


@pytest.mark.slow
def test_key_padding_mask_monte_carlo(x_padded):
    check_against_monte_carlo(lambda w: Padded(w, heads=2, impl="sdpa"), x_padded)


@pytest.mark.slow
def test_pre_norm_block_monte_carlo(x):
    check_against_monte_carlo(lambda w: SequenceModel(w, [TransformerBlock(w, heads=2, impl="sdpa")]), x)


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["hand", "sdpa"])
def test_padding_and_causal_hand_monte_carlo(x_padded, impl):
    check_against_monte_carlo(lambda w: Padded(w, heads=4, impl=impl, causal=True), x_padded)


@pytest.mark.slow
def test_learned_positional_embedding_monte_carlo(x):
    check_against_monte_carlo(
        lambda w: SequenceModel(w, [SelfAttention(w, 2, causal=True)], positions=6,
                                positional_variance=0.5), x)


@pytest.mark.slow
def test_stacked_post_norm_blocks_monte_carlo(x):
    check_against_monte_carlo(
        lambda w: SequenceModel(w, [TransformerBlock(w, heads=2, norm_first=False, causal=True),
                                    TransformerBlock(w, heads=2, norm_first=False, activation="gelu")],
                                readout=0), x)


# ---------------------------------------------------------------------- errors

def _error(factory, x, *needles):
    with pytest.raises(tp.UnsupportedOperation) as info:
        tp.infinite_width(factory, x)
    msg = str(info.value)
    for needle in needles:
        assert needle in msg, msg
    return msg


class SDPA(nn.Module):
    def __init__(self, width, **kwargs):
        super().__init__()
        self.embed = nn.Linear(D_IN, width)
        self.q = nn.Linear(width, width, bias=False)
        self.k = nn.Linear(width, width, bias=False)
        self.out = nn.Linear(width, 1)
        self.kwargs = kwargs

    def forward(self, x):
        h = self.embed(x)
        q, k = self.q(h), self.k(h)
        return self.out(F.scaled_dot_product_attention(q, k, h, **self.kwargs).mean(1))  # sdpa-line


def test_inverse_sqrt_scaling_is_rejected(x):
    msg = _error(lambda w: SDPA(w), x, "1/√d", "scale=1/head_dim", "sdpa-line", "central limit")
    assert "_softmax" in msg or "add" in msg


def test_multihead_attention_module_is_rejected(x):
    class MHA(nn.Module):
        def __init__(self, width):
            super().__init__()
            self.embed = nn.Linear(D_IN, width)
            self.attn = nn.MultiheadAttention(width, 2, batch_first=True)
            self.out = nn.Linear(width, 1)

        def forward(self, x):
            h = self.embed(x)
            return self.out(self.attn(h, h, h, need_weights=False)[0].mean(1))  # mha-line

    _error(lambda w: MHA(w), x, "1/√d", "mha-line", "nn.MultiheadAttention", "num_heads = width // head_dim")


class _ManyHeads(nn.Module):
    """nn.MultiheadAttention with head dimension 8 (heads ∝ width), PyTorch's 1/√8 logits."""

    def __init__(self, width: int, causal: bool):
        super().__init__()
        self.embed = nn.Linear(D_IN, width, bias=False)
        nn.init.normal_(self.embed.weight, std=D_IN ** -0.5)
        self.attn = nn.MultiheadAttention(width, width // 8, bias=False, batch_first=True)
        self.out = nn.Linear(width, 16, bias=False)
        nn.init.normal_(self.out.weight, std=width ** -0.5)
        self.causal = causal

    def forward(self, x):
        h = self.embed(x)
        mask = torch.triu(torch.ones(x.shape[1], x.shape[1], dtype=torch.bool), 1) if self.causal else None
        return self.out(self.attn(h, h, h, need_weights=False, attn_mask=mask)[0].mean(1))


@pytest.mark.slow
@pytest.mark.parametrize("causal", [False, True])
def test_infinite_heads_reference_matches_multihead_attention(x, causal):
    """The infinite-heads limit (docs/attention.md): the Monte Carlo formula of
    ``reference.infinite_heads_attention`` and the frontend's limit of the module each vs the
    NNGP of the actual ``nn.MultiheadAttention(1024, 128)`` (64 networks), within Z combined
    standard errors; the deterministic-logit answer (uniform attention) is rejected by the
    same test."""
    x = 2.0 * x  # sharper random attention, so uniform attention is far from the answer
    Xf = x.reshape(B * T, D_IN).numpy()
    Kh = Xf @ Xf.T / D_IN
    # PyTorch's init: in_proj xavier_uniform on [3n, n] (entry variance 1/(2n)); out_proj
    # kaiming_uniform(a=√5) (1/(3n)); readout N(0, 1/n)
    Ko, se = infinite_heads_attention(Kh, T, 8, 0.5, 0.5, 1.0 / 3.0, causal=causal)
    ref = Ko.reshape(B, T, B, T).mean((1, 3))
    ref_se = se.reshape(B, T, B, T).sum((1, 3)) / T ** 2  # SE of a mean of correlated entries: at most this
    emp = empirical_nngp(lambda w: _ManyHeads(w, causal), WIDTH, x, samples=64)
    bound = Z * np.sqrt(emp.stderr.numpy() ** 2 + ref_se ** 2)
    assert (np.abs(emp.mean.numpy() - ref) <= bound).all(), (emp.mean, ref, bound)
    K, K_se = tp.infinite_width(lambda w: _ManyHeads(w, causal), x).nngp(x, stderr=True, seeds=6)
    bound_limit = Z * np.sqrt(emp.stderr.numpy() ** 2 + K_se.numpy() ** 2)
    for name, value, spread in (("reference", ref, ref_se), ("frontend", K.numpy(), K_se.numpy())):
        z = np.abs(emp.mean.numpy() - value) / np.sqrt(emp.stderr.numpy() ** 2 + spread ** 2)
        rel = np.linalg.norm(emp.mean.numpy() - value) / np.linalg.norm(value)
        print(f"{name}: max |z| {z.max():.2f}, relative Frobenius {rel:.3f}, SE {spread.max():.2g}")
    z_ref = np.abs(K.numpy() - ref) / np.sqrt(K_se.numpy() ** 2 + ref_se ** 2)
    print(f"frontend vs reference: max |z| {z_ref.max():.2f}")
    assert (np.abs(emp.mean.numpy() - K.numpy()) <= bound_limit).all(), (emp.mean, K, bound_limit)
    w = np.tril(np.ones((T, T))) if causal else np.ones((T, T))
    w = (w / w.sum(1, keepdims=True)).mean(0)  # mean over queries of the uniform weights
    uniform = np.einsum("a,xayb,b->xy", w, 0.5 * Kh.reshape(B, T, B, T), w) / 3.0
    assert (np.abs(emp.mean.numpy() - uniform) > bound).any()


def test_transformer_encoder_layer_is_rejected(x):
    class Encoder(nn.Module):
        def __init__(self, width):
            super().__init__()
            self.embed = nn.Linear(D_IN, width)
            layer = nn.TransformerEncoderLayer(width, 2, 2 * width, dropout=0.0, batch_first=True)
            self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
            self.out = nn.Linear(width, 1)

        def forward(self, x):
            return self.out(self.enc(self.embed(x)).mean(1))  # encoder-line

    _error(lambda w: Encoder(w), x, "1/√d", "encoder-line")


def test_other_width_dependent_scalings_are_rejected(x):
    class Squared(SDPA):
        def forward(self, x):
            h = self.embed(x)
            q = self.q(h)
            d = q.shape[-1]
            return self.out((torch.softmax(q @ q.transpose(1, 2) / d**2, -1) @ h).mean(1))

    class Scaled(SDPA):
        def forward(self, x):
            h = self.embed(x)
            return self.out(torch.relu(self.q(h) / h.shape[-1]).mean(1))

    _error(lambda w: Squared(w), x, "width^-1", "1/d")
    _error(lambda w: Scaled(w), x, "width^-1", "relu")


def test_per_head_masks_are_rejected(x):
    class PerHead(SDPA):
        def forward(self, x):
            h = self.embed(x)
            q = self.q(h).view(B, T, 2, -1).transpose(1, 2)
            mask = torch.ones(2, T, T, dtype=torch.bool)
            mask[1] = torch.ones(T, T, dtype=torch.bool).tril()
            o = F.scaled_dot_product_attention(q, q, q, attn_mask=mask, scale=1.0 / q.shape[-1])
            return self.out(o.transpose(1, 2).reshape(B, T, -1).mean(1))

    _error(lambda w: PerHead(w), x, "differ between heads")


def test_value_contraction_over_positions_is_rejected(x):
    class Linear(SDPA):
        def forward(self, x):
            h = self.embed(x)
            kv = h.transpose(1, 2) @ h / h.shape[1]  # [B, n, n]: contracts positions, not width
            return self.out((h @ kv).mean(1))

    _error(lambda w: Linear(w), x, "test_attention.py")


# ---------------------------------------------------------------------- NTK

def _frozen_layernorm(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, nn.LayerNorm):
            for p in m.parameters():
                p.requires_grad_(False)
    return model


NTK_MODELS = {
    "sdpa-heads-causal": lambda w: SequenceModel(w, [SelfAttention(w, 2, causal=True)]),
    "pre-norm-block": lambda w: _frozen_layernorm(SequenceModel(w, [TransformerBlock(w)])),
    "post-norm-block": lambda w: _frozen_layernorm(
        SequenceModel(w, [TransformerBlock(w, heads=2, norm_first=False)])),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(NTK_MODELS))
def test_ntk_matches_empirical(x, name):
    factory = NTK_MODELS[name]
    theta = tp.infinite_width(factory, x).ntk(x)
    emp = ntk_mean(factory, 512, x, samples=16, seed=5, parametrization="ntk")
    z = ((emp.mean - theta).abs() / emp.stderr).max()
    assert z < Z, f"max |MC - limit| / SE = {z:.2f}"


def _layernorm_only(model: nn.Module) -> nn.Module:
    for name, p in model.named_parameters():
        p.requires_grad_(".ln" in name)
    return model


@pytest.mark.slow
@pytest.mark.parametrize("norm_first", [True, False], ids=["pre-norm", "post-norm"])
def test_layernorm_gain_ntk_of_attention_block_matches_empirical(x, norm_first):
    """Trainable LayerNorm gains and shifts (init 1, 0) of a transformer block, the only
    trainable parameters, in the standard parametrization (in the NTK one their init variance
    0 gives them no term): their NTK terms through attention, residuals and the feed-forward
    vs the mean empirical NTK of the module at width 1024. Without the terms the limit is 0."""

    def factory(w):
        return _layernorm_only(SequenceModel(w, [TransformerBlock(w, heads=2, norm_first=norm_first)]))

    width = 1024
    theta = tp.infinite_width(factory, x, parametrization="standard", nominal_width=width).ntk(x)
    emp = ntk_mean(factory, width, x, samples=32, seed=5, parametrization="standard")
    z = ((emp.mean - theta).abs() / emp.stderr).max()
    assert z < Z, f"max |MC - limit| / SE = {z:.2f}"


@pytest.mark.slow
def test_query_key_weights_drop_out_of_the_ntk(x):
    """With 1/d logits, ∂f/∂W_Q reaches the output only through the logits: the logits'
    gradient is O(1) and ∂(q·k/d)/∂q = k/d is O(1/n) per coordinate, so W_Q's NTK term is
    O(1/n). The limit has none; the empirical term decays like 1/width."""

    def queries_only(w):
        m = SequenceModel(w, [SelfAttention(w, 1)])
        for name, p in m.named_parameters():
            p.requires_grad_(name.startswith("blocks.0.q."))
        return m

    theta = tp.infinite_width(queries_only, x).ntk(x)
    assert torch.equal(theta, torch.zeros_like(theta))
    small = ntk_mean(queries_only, 64, x, samples=16, seed=5, parametrization="ntk")
    large = ntk_mean(queries_only, 1024, x, samples=16, seed=5, parametrization="ntk")
    full = tp.infinite_width(lambda w: SequenceModel(w, [SelfAttention(w, 1)]), x).ntk(x)
    # 16x the width: O(1/width) predicts a 16x smaller term (O(1/√width) would give 4x)
    ratio = large.mean.diagonal() / small.mean.diagonal()
    assert (ratio < 0.2).all(), ratio
    assert (large.mean.diagonal() < 1e-2 * full.diagonal()).all()


def test_non_sinusoidal_buffer_is_rejected(x):
    class Buffer(SDPA):
        def __init__(self, width, base=100.0):
            super().__init__(width)
            pos = torch.arange(T, dtype=torch.float64)[:, None]
            freq = base ** (-torch.arange(0, width, 2, dtype=torch.float64) / width)  # not 10000
            pe = torch.zeros(T, width)
            pe[:, 0::2], pe[:, 1::2] = torch.sin(pos * freq), torch.cos(pos * freq)
            self.register_buffer("pe", pe)

        def forward(self, x):
            return self.out((self.embed(x) + self.pe).mean(1))  # pe-line

    _error(lambda w: Buffer(w), x, "buffer pe", "pe-line", "sinusoidal", "nn.Embedding")


class Sinusoidal(nn.Module):
    """Input layer plus the standard sinusoidal table (a buffer of ``max_len`` rows, sliced
    to the sequence), then ``blocks``; readout by fixed weights over positions (all pairs of
    positions count, with different weights) or a mean."""

    WEIGHTS = (1.0, -0.5, 0.7, 0.3)

    def __init__(self, width, blocks=(), layout="interleaved", max_len=8, readout="weights"):
        super().__init__()
        self.embed = nn.Linear(D_IN, width)
        tp.init.normal_(self.embed, 1.0, 0.25)
        self.register_buffer("pe", sinusoidal_table(torch.arange(max_len), width, layout).float())
        self.blocks = nn.Sequential(*blocks)
        self.out = tp.init.normal_(nn.Linear(width, 1, bias=False), 1.0)
        self.readout = readout

    def forward(self, x):
        h = self.blocks(self.embed(x) + self.pe[: x.shape[1]])
        if self.readout == "mean":
            return self.out(h.mean(1))
        return self.out(sum(w * h[:, p] for p, w in enumerate(self.WEIGHTS)))


def pe_gram(t: int) -> np.ndarray:
    """E[PE_p PE_q] = ½ ∫_0^1 cos((p − q)·10000^(−u)) du (scipy quadrature, independent of
    the library): half the coordinates are sines and half cosines of the same frequencies,
    sin·sin + cos·cos = cos of the difference, and u = 2i/d is uniform on [0, 1)."""
    from scipy.integrate import quad

    def entry(k):
        return 0.5 * quad(lambda u: math.cos(k * 10000.0 ** (-u)), 0.0, 1.0, epsabs=1e-14, limit=200)[0]

    return np.array([[entry(p - q) for q in range(t)] for p in range(t)])


@pytest.mark.parametrize("layout", ["interleaved", "halves"])
def test_sinusoidal_encoding_gram_equals_integral(x, layout):
    """Readout Σ_p w_p (embed(x_p) + PE_p): NNGP = Σ_pq w_p w_q (⟨x_p, x'_q⟩/d_in + σ_b² +
    E[PE_p PE_q]) — the encoding is independent of the Gaussian embedding — to 1e-10."""
    K = tp.infinite_width(lambda w: Sinusoidal(w, layout=layout), x).nngp(x).numpy()
    w = np.array(Sinusoidal.WEIGHTS)
    X = x.numpy()
    ref = np.einsum("p,q,apd,bqd->ab", w, w, X, X) / D_IN + 0.25 * w.sum() ** 2 + w @ pe_gram(T) @ w
    np.testing.assert_allclose(K, ref, rtol=1e-10, atol=0)


def test_sinusoidal_table_is_read_back():
    from tensorprograms.frontend.rules_positional import read_positions

    for layout in ("interleaved", "halves"):
        table = sinusoidal_table(torch.tensor([0.0, 3.0, 7.0, 100.0]), 64, layout).float()
        pos, found = read_positions(table)
        assert found == layout and pos.tolist() == [0.0, 3.0, 7.0, 100.0]
    assert read_positions(torch.randn(4, 64)) is None


def test_sinusoidal_encoding_ntk_matches_empirical(x):
    """The encoding has no parameters and is shared by the batch: the NTK's backward pass
    gives it no cotangent; the rest is the embedding's and readout's terms."""
    theta = tp.infinite_width(Sinusoidal, x).ntk(x)
    emp = ntk_mean(Sinusoidal, WIDTH, x, samples=16, seed=1, parametrization="ntk")
    z = ((emp.mean - theta).abs() / emp.stderr).max()
    assert z < Z, f"max |MC - limit| / SE = {z:.2f}"


@pytest.mark.slow
def test_sinusoidal_transformer_monte_carlo(x):
    """A pre-norm transformer block on embedded inputs plus the sinusoidal table, mean
    readout, vs the module at width 1024. LayerNorm of the non-Gaussian sum makes the limit's
    expectations Monte Carlo: its own SE comes from 4 engine seeds."""
    def factory(w):
        return Sinusoidal(w, [TransformerBlock(w, heads=2)], readout="mean")

    K, se = tp.infinite_width(factory, x).nngp(x, stderr=True, seeds=4)
    emp = empirical_nngp(factory, WIDTH, x, samples=SAMPLES, seed=11)
    z = ((emp.mean - K).abs() / (emp.stderr**2 + se**2).sqrt()).max()
    assert z < Z, f"max |MC - limit| / SE = {z:.2f}"


def test_attention_dropout_is_rejected(x):
    class Dropout(SDPA):
        def forward(self, x):
            h = self.embed(x)
            o = F.scaled_dot_product_attention(h, h, h, dropout_p=0.1, scale=1.0 / h.shape[-1])  # drop-line
            return self.out(o.mean(1))

    _error(lambda w: Dropout(w), x, "dropout_p=0", "drop-line")
