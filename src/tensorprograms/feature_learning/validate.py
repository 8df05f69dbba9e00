"""Finite-width μP networks against the computed limit.

``finite_width_run`` trains ``tp.mup.parametrize(factory, n, base_width)`` with
``tp.mup.SGD(model, lr)`` in float64 on the same batches as the limit; ``convergence``
does so for several widths and seeds and measures the distance to a limit run.
The readout bias (a finite parameter whose random init does not average out) is zeroed
in the finite networks, matching the limit's convention (:mod:`.trainer`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .. import mup
from .trainer import MuPLimitTrainer


@dataclass
class Run:
    """One training run: ``losses [T]`` (batch loss before each step), ``outputs [N, k]``
    on the held-out inputs after the last step; ``features [N, n]``, when asked for, the
    input of the readout layer (the last hidden layer's activations) on them."""

    losses: torch.Tensor
    outputs: torch.Tensor
    features: torch.Tensor | None = None


def finite_width_run(
    factory: Callable[[int], torch.nn.Module],
    width: int,
    base_width: int,
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    x_test: torch.Tensor,
    *,
    lr: float,
    loss: str = "mse",
    seed: int = 0,
    readout_bias: str | None = None,
    features_of: str | None = None,
    optimizer: str = "sgd",
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> Run:
    """Train the finite μP network at ``width`` (float64, seed ``seed``) with plain SGD
    (``tp.mup.SGD``) or, ``optimizer="adam"``, ``tp.mup.Adam`` with ``eps·base_width/width``
    (the limit's convention: ε scales like μP's Θ(1/n) gradients).

    ``readout_bias``: qualified name of the readout's bias, zeroed at init (None: none).
    ``features_of``: qualified name of the readout module (e.g. ``"2"`` in an
    ``nn.Sequential``); its input on ``x_test`` after training is returned as ``features``."""
    torch.manual_seed(seed)
    model = mup.parametrize(factory, width, base_width).double()
    if readout_bias is not None:
        with torch.no_grad():
            dict(model.named_parameters())[readout_bias].zero_()
    if optimizer == "adam":
        opt = mup.Adam(model, lr=lr, betas=betas, eps=eps * base_width / width)
    else:
        opt = mup.SGD(model, lr=lr)
    fn = F.mse_loss if loss == "mse" else F.cross_entropy
    losses = []
    for xb, yb in batches:
        opt.zero_grad()
        out = model(xb.double())
        value = fn(out, yb.double() if loss == "mse" else yb.long())
        value.backward()
        opt.step()
        losses.append(value.item())
    seen: list[torch.Tensor] = []
    hook = None
    if features_of is not None:
        hook = model.get_submodule(features_of).register_forward_pre_hook(
            lambda _m, args: seen.append(args[0].detach()))
    with torch.no_grad():
        out = model(x_test.double())
    if hook is not None:
        hook.remove()
    return Run(torch.tensor(losses, dtype=torch.float64), out, seen[0] if seen else None)


def limit_run(trainer: MuPLimitTrainer, batches, x_test: torch.Tensor, progress: bool = False) -> Run:
    """Train ``trainer`` on ``batches``; its losses and final held-out outputs."""
    losses = trainer.train(batches, progress=progress)
    return Run(torch.tensor(losses, dtype=torch.float64), trainer.predict(x_test))


@dataclass
class Convergence:
    """Distances of finite-width runs to the limit, per width (mean over seeds ± s.e.).

    ``output[i]``: RMS over held-out inputs and outputs of ``f_n - f_∞`` after training;
    ``loss[i]``: RMS over steps of ``loss_n - loss_∞``. ``slope(...)`` fits log-log."""

    widths: list[int]
    output: torch.Tensor
    output_se: torch.Tensor
    loss: torch.Tensor
    loss_se: torch.Tensor
    seeds: int

    def slope(self, what: str = "output", upto: int | None = None) -> float:
        """Least-squares slope of log distance vs log width (widths ≤ ``upto``)."""
        y = getattr(self, what)
        keep = [i for i, w in enumerate(self.widths) if upto is None or w <= upto]
        lx = torch.log(torch.tensor([float(self.widths[i]) for i in keep], dtype=torch.float64))
        ly = torch.log(y[keep])
        lx = lx - lx.mean()
        return float((lx * (ly - ly.mean())).sum() / (lx * lx).sum())

    def slope_stderr(self, what: str = "output", upto: int | None = None) -> float:
        """Standard error of :meth:`slope` from the seed-to-seed standard errors per width
        (delta method: ``se(log d) = se(d)/d``; widths independent)."""
        y, se = getattr(self, what), getattr(self, what + "_se")
        keep = [i for i, w in enumerate(self.widths) if upto is None or w <= upto]
        lx = torch.log(torch.tensor([float(self.widths[i]) for i in keep], dtype=torch.float64))
        lx = lx - lx.mean()
        sl = se[keep] / y[keep]
        return float(((lx * sl).pow(2).sum()).sqrt() / (lx * lx).sum())

    def table(self) -> str:
        rows = ["width   |f_n - f_inf|        |loss_n - loss_inf|"]
        for i, w in enumerate(self.widths):
            rows.append(f"{w:6d}  {self.output[i]:.4e} ± {self.output_se[i]:.1e}  "
                        f"{self.loss[i]:.4e} ± {self.loss_se[i]:.1e}")
        return "\n".join(rows)


def convergence(
    factory: Callable[[int], torch.nn.Module],
    limit: Run,
    widths: Sequence[int],
    seeds: int,
    base_width: int,
    batches,
    x_test: torch.Tensor,
    *,
    lr: float,
    loss: str = "mse",
    readout_bias: str | None = None,
    progress: bool = True,
    **optimizer,
) -> Convergence:
    """Train ``seeds`` finite μP networks per width and measure their distance to ``limit``;
    ``optimizer``: ``optimizer=``, ``betas=``, ``eps=`` of :func:`finite_width_run`."""
    out, out_se, lo, lo_se = [], [], [], []
    for w in tqdm(list(widths), disable=not progress, desc="finite widths"):
        d_out, d_loss = [], []
        for s in range(seeds):
            run = finite_width_run(factory, w, base_width, batches, x_test, lr=lr, loss=loss, seed=s,
                                   readout_bias=readout_bias, **optimizer)
            d_out.append(float((run.outputs - limit.outputs).pow(2).mean().sqrt()))
            d_loss.append(float((run.losses - limit.losses).pow(2).mean().sqrt()))
        for vals, m, se in ((d_out, out, out_se), (d_loss, lo, lo_se)):
            t = torch.tensor(vals, dtype=torch.float64)
            m.append(float(t.mean()))
            se.append(float(t.std() / math.sqrt(len(vals))) if len(vals) > 1 else float("nan"))
    f64 = torch.float64
    return Convergence(list(widths), torch.tensor(out, dtype=f64), torch.tensor(out_se, dtype=f64),
                       torch.tensor(lo, dtype=f64), torch.tensor(lo_se, dtype=f64), seeds)
