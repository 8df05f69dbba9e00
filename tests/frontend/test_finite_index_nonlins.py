"""Nonlinearities that mix finite indices per width coordinate (max-pooling, adaptive
max-pooling, softmax over positions): no closed form, so the engine integrates them by
quadrature or Monte Carlo and reports a standard error; the limit vs finite-width Monte
Carlo of the same PyTorch module at width 1024, tolerance Z·SE (the engine's own SE is
checked to be below a tenth of the finite-width SE)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import tensorprograms as tp

from .models import init_

Z = 4.5


class Pooled(nn.Module):
    """conv → relu → (a finite-index nonlinearity) → conv → relu → mean → linear."""

    def __init__(self, width: int, kind: str):
        super().__init__()
        two_d = kind in ("maxpool2d", "adaptivemax2d")
        conv = nn.Conv2d if two_d else nn.Conv1d
        self.c1, self.c2 = conv(2, width, 3, padding=1), conv(width, width, 3, padding=1)
        self.pool = {
            "maxpool1d": nn.MaxPool1d(2),
            "maxpool2d": nn.MaxPool2d(2),
            "adaptivemax1d": nn.AdaptiveMaxPool1d(2),
            "adaptivemax2d": nn.AdaptiveMaxPool2d(2),
            "softmax": nn.Softmax(dim=-1),
        }[kind]
        self.fc = nn.Linear(width, 16)
        init_(self)

    def forward(self, x):
        h = self.pool(torch.relu(self.c1(x)))
        h = torch.relu(self.c2(h))
        return self.fc(h.flatten(2).mean(-1))


def _inputs(kind: str) -> torch.Tensor:
    gen = torch.Generator().manual_seed(21)
    shape = (3, 2, 4, 4) if kind in ("maxpool2d", "adaptivemax2d") else (3, 2, 4)
    return torch.randn(*shape, generator=gen)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["maxpool1d", "maxpool2d", "adaptivemax1d", "adaptivemax2d", "softmax"])
def test_finite_index_nonlinearity_matches_monte_carlo(kind):
    x = _inputs(kind)
    factory = lambda n: Pooled(n, kind)  # noqa: E731
    L = tp.infinite_width(factory, x)
    K = L.nngp(x)
    engine = tp.master_theorem(L.program)
    engine.second_moment(L.output.var)
    backends = {r.backend for r in engine.records}
    assert backends & {"monte_carlo", "quadrature"}, engine.report()
    emp = tp.empirical.nngp(factory, 1024, x, samples=32, seed=4)
    # the readout (σ² = 1.5) passes the last expectation's Monte Carlo SE on to K; earlier
    # expectations' errors are not propagated by the engine, so they must stay below SE
    engine_se = 1.5 * max((r.max_stderr or 0.0) for r in engine.records)
    assert engine_se < emp.stderr.min(), engine.report()
    z = ((K - emp.mean).abs() / (emp.stderr**2 + engine_se**2).sqrt()).max().item()
    assert z < Z, f"max |MC − limit| / SE = {z:.2f}\n{engine.report()}"


def test_softmax_over_positions_reports_its_backend():
    """The report names the backend and the standard error of a Monte Carlo expectation."""
    x = _inputs("softmax")
    L = tp.infinite_width(lambda n: Pooled(n, "softmax"), x)
    engine = tp.master_theorem(L.program)
    engine.second_moment(L.output.var)
    text = engine.report()
    mc = [r for r in engine.records if r.backend == "monte_carlo"]
    assert mc and all(r.max_stderr is not None and r.max_stderr > 0 for r in mc), text
    assert "monte_carlo" in text and f"{mc[0].max_stderr:.2e}" in text

