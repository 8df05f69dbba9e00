"""Recurrent models (nn.RNN/GRU/LSTM, hand-written loops, token embeddings): the limit vs
a closed-form recursion and vs finite-width Monte Carlo of the same PyTorch module.

Tolerance: |limit − MC mean| < Z·√(SE² + SE_engine²), SE the Monte Carlo standard error
over networks (``tp.empirical``). Gated cells have no closed form; the engine integrates
them by Monte Carlo, and SE_engine is the limit's own standard error from independent
engine seeds (``limit.nngp(x, stderr=True)``), which includes the error every gated step
passes on to the next. The finite-width bias is O(1/width) (≈ 1e-3 relative at width
1024), well below SE (1–3 %).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import tensorprograms as tp
from tensorprograms.empirical import ntk_mean

from .recurrent_models import SB2, SW2, Fused, Loop, TokenRNN, init_normal_
from .reference import erf_rnn_nngp

Z = 4.5


@pytest.fixture
def seq():
    gen = torch.Generator().manual_seed(11)
    return torch.randn(3, 4, 3, generator=gen)  # [batch, time, features]


def check_nngp(factory, x, width=1024, samples=24, seeds=4):
    """The limit (mean over ``seeds`` engine seeds, with its standard error) vs the mean
    over ``samples`` networks; returns (limit, K, SE of K)."""
    limit = tp.infinite_width(factory, x)
    K, engine_se = limit.nngp(x, stderr=True, seeds=seeds)
    emp = tp.empirical.nngp(factory, width, x, samples=samples, seed=3)
    assert (engine_se < emp.stderr).all(), (engine_se, emp.stderr)  # the MC of networks dominates
    z = ((K - emp.mean).abs() / (emp.stderr**2 + engine_se**2).sqrt()).max().item()
    assert z < Z, f"max |MC − limit| / SE = {z:.2f}\nlimit {K}\nMC {emp.mean}"
    return limit, K, engine_se


def test_erf_rnn_equals_closed_form_recursion(seq):
    """h_t = erf(W h_{t-1} + U x_t + b) read out from h_T: the library's limit equals the
    arcsine-kernel recursion over time (reference.py, numpy) to float64 rounding."""
    K = tp.infinite_width(lambda n: Loop(n, "erf"), seq).nngp(seq).numpy()
    ref = erf_rnn_nngp(seq.double().numpy(), SW2, SW2, SB2, SW2, SB2)
    np.testing.assert_allclose(K, ref, rtol=1e-8, atol=0)


def test_tanh_rnn_matches_monte_carlo(seq):
    check_nngp(lambda n: Fused(n, "rnn"), seq)


@pytest.mark.slow
@pytest.mark.parametrize("config", [
    {"kind": "rnn", "nonlinearity": "relu", "layers": 2, "bidirectional": True},
    {"kind": "rnn", "readout": "mean", "batch_first": False, "bidirectional": True},
    {"kind": "gru"},
    {"kind": "gru", "layers": 2, "bidirectional": True, "batch_first": False},
    {"kind": "lstm", "readout": "mean"},
    {"kind": "lstm", "bidirectional": True},
], ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_fused_recurrent_matches_monte_carlo(seq, config):
    check_nngp(lambda n: Fused(n, **config), seq)


@pytest.mark.slow
@pytest.mark.parametrize("cell", ["rnn", "gru", "lstm"])
def test_hand_written_loop_matches_monte_carlo_and_fused(seq, cell):
    """A loop over nn.RNNCell/GRUCell/LSTMCell (shared weights across time) matches MC, and
    the fused nn.RNN/GRU/LSTM with the same init has the same limit (within the engine's
    Monte Carlo error for gated cells)."""
    _, K1, se1 = check_nngp(lambda n: Loop(n, cell), seq)
    K2, se2 = tp.infinite_width(lambda n: Fused(n, cell), seq).nngp(seq, stderr=True, seeds=4)
    # the same seeds give the same samples to the same expectations only if the programs
    # name them alike: compare within the limits' own standard errors (0 for the tanh RNN)
    assert ((K1 - K2).abs() <= Z * (se1**2 + se2**2).sqrt() + 1e-10 * K1.abs().max()).all()


@pytest.mark.slow
def test_embedding_rnn_matches_monte_carlo():
    tokens = torch.tensor([[0, 1, 2, 3], [3, 1, 0, 0], [4, 4, 2, 1]])
    check_nngp(TokenRNN, tokens, samples=32)


def test_embedding_limit_is_the_token_gram():
    """Embedding rows are iid N(0, σ²) vectors: a readout of the mean embedding has kernel
    σ_v²·σ²·(fraction of equal-token pairs) — exact."""

    class MeanEmb(nn.Module):
        def __init__(self, n):
            super().__init__()
            self.emb, self.out = nn.Embedding(4, n), nn.Linear(n, 8, bias=False)
            nn.init.normal_(self.emb.weight, std=0.7)
            nn.init.normal_(self.out.weight, std=1 / math.sqrt(n))

        def forward(self, t):
            return self.out(self.emb(t).mean(1))

    tokens = torch.tensor([[0, 1, 2], [1, 1, 3], [3, 2, 0]])
    K = tp.infinite_width(MeanEmb, tokens).nngp(tokens)
    same = (tokens[:, None, :, None] == tokens[None, :, None, :]).double().mean((2, 3))
    torch.testing.assert_close(K, 0.49 * same, rtol=1e-12, atol=1e-14)


class DefaultBiasGRU(nn.Module):
    """nn.GRU with PyTorch's default biases (variance 1/(3·width): zero in the forward
    limit, but each bias still has a gradient — the NTK's ghost terms, per gate block)."""

    def __init__(self, width: int):
        super().__init__()
        self.rnn, self.out = nn.GRU(3, width, batch_first=True), nn.Linear(width, 16)
        for name, p in self.rnn.named_parameters():
            if "weight" in name:
                nn.init.normal_(p, std=math.sqrt(SW2 / p.shape[1]))
        nn.init.normal_(self.out.weight, std=1 / math.sqrt(width))

    def forward(self, x):
        return self.out(self.rnn(x)[0][:, -1])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["rnn", "gru", "lstm", "gru-loop", "token-rnn", "gru-default-bias"])
def test_recurrent_ntk_matches_empirical(seq, name):
    factory = {
        "rnn": lambda n: Fused(n, "rnn", readout="mean"),
        "gru": lambda n: Fused(n, "gru"),
        "lstm": lambda n: Fused(n, "lstm", batch_first=False),
        "gru-loop": lambda n: Loop(n, "gru"),
        "token-rnn": TokenRNN,
        "gru-default-bias": DefaultBiasGRU,
    }[name]
    x = torch.tensor([[0, 1, 2, 3], [3, 1, 0, 0], [4, 4, 2, 1]]) if name == "token-rnn" else seq
    theta = tp.infinite_width(factory, x).ntk(x)
    emp = ntk_mean(factory, 512, x, samples=8, seed=5, parametrization="ntk")
    z = ((emp.mean - theta).abs() / emp.stderr).max().item()
    assert z < Z, f"max |MC − limit| / SE = {z:.2f}"


@pytest.mark.slow
def test_lstm_ntk_at_two_widths(seq):
    """The LSTM NTK (NTK parametrization) vs the mean empirical NTK of the module at widths
    128 and 512: consistent within the combined standard error (networks' Monte Carlo and
    the limit's own, from 4 engine seeds) at each, and the networks' spread shrinks with
    width (∝ width^-1/2: about 2× from 128 to 512 at equal samples)."""
    factory = lambda n: Fused(n, "lstm")  # noqa: E731
    theta, se = tp.infinite_width(factory, seq).ntk(seq, stderr=True, seeds=4)
    spread = {}
    for width, samples in ((128, 32), (512, 8)):
        emp = ntk_mean(factory, width, seq, samples=samples, seed=5, parametrization="ntk")
        z = ((emp.mean - theta).abs() / (emp.stderr**2 + se**2).sqrt()).max().item()
        assert z < Z, f"width {width}: max |MC − limit| / SE = {z:.2f}"
        spread[width] = (emp.stderr * math.sqrt(samples)).mean().item()  # one network's std
    assert spread[512] < 0.75 * spread[128], spread


# ---------------------------------------------------------------------- bad inputs

def test_default_rnn_init_is_rejected_with_the_fix(seq):
    with pytest.raises(tp.WidthError, match=r"weight_ih_l0.*input_size|weight_ih_l0.*variance"):
        tp.infinite_width(lambda n: nn.Sequential(_Last(nn.GRU(3, n, batch_first=True)), nn.Linear(n, 2)),
                          seq)


def test_projected_lstm_is_rejected(seq):
    def factory(n):
        lstm = init_normal_(nn.LSTM(3, n, batch_first=True, proj_size=4))
        return nn.Sequential(_Last(lstm), nn.Linear(4, 2))

    with pytest.raises(tp.UnsupportedOperation, match="proj_size=4"):
        tp.infinite_width(factory, seq)


def test_nonzero_initial_state_is_rejected(seq):
    class H0(nn.Module):
        def __init__(self, n):
            super().__init__()
            self.n, self.rnn, self.out = n, init_normal_(nn.RNN(3, n, batch_first=True)), nn.Linear(n, 2)

        def forward(self, x):
            y, _ = self.rnn(x, torch.ones(1, x.shape[0], self.n, dtype=x.dtype))
            return self.out(y[:, -1])

    with pytest.raises(tp.UnsupportedOperation, match="initial|constant") as info:
        tp.infinite_width(H0, seq)
    assert "test_recurrent.py" in str(info.value)


class _Last(nn.Module):
    def __init__(self, rnn):
        super().__init__()
        self.rnn = rnn

    def forward(self, x):
        return self.rnn(x)[0][:, -1]


@pytest.mark.slow
@pytest.mark.parametrize("cell", ["rnn", "gru"])
def test_single_network_ntk_converges_like_inverse_sqrt_width(seq, cell):
    """One network's NTK (torch.func) approaches the limit at rate width^(-1/2): the fitted
    log-log slope of the RMS error is −1/2 within 3 standard errors of the fit."""
    from tensorprograms.empirical import ntk as empirical_ntk
    from tensorprograms.frontend import read_initialization

    from .test_ntk_empirical import fit_slope

    factory = (lambda n: Fused(n, "rnn")) if cell == "rnn" else (lambda n: Loop(n, "gru"))
    theta = tp.infinite_width(factory, seq).ntk(seq)
    widths, errs = [64, 128, 256, 512, 1024], []
    for n in widths:
        v = {k: p.variances[0] for k, p in read_initialization(factory, (n, 2 * n)).items()}
        e = []
        for s in range(12):
            torch.manual_seed(100 * n + s)
            K = empirical_ntk(factory(n), seq, parametrization="ntk", variances=v)
            e.append(((K - theta) ** 2).mean().item())
        errs.append(e)
    slope, se = fit_slope(widths, errs)
    assert abs(slope + 0.5) < 3 * se, f"slope {slope:.3f} ± {se:.3f}"
