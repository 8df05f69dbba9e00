"""The main job's pieces, each usable on any ``factory`` and :class:`Dataset`:

* :func:`limit_accuracy`: test accuracy of the NNGP (GP posterior mean) and NTK (gradient
  flow to convergence) limits by one-hot regression, or the reason the frontend cannot
  take the model (``tp.UnsupportedOperation``);
* :func:`train_finite`: a finite-width network trained by minibatch SGD (cross-entropy);
* :func:`kernel_convergence`: relative distance of finite-width kernels to the limit.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from ..empirical import nngp as empirical_nngp
from ..empirical import ntk_mean
from ..errors import UnsupportedOperation, WidthError
from ..factory import build
from ..frontend import infinite_width
from ..predict import gp_posterior, gradient_flow, limit_kernels, one_hot
from .data import Dataset

Factory = Callable[[int], nn.Module]


@dataclass
class LimitResult:
    """Test accuracies (None with ``reason`` when the limit is unavailable) and seconds."""

    nngp: float | None = None
    ntk: float | None = None
    reason: str | None = None
    seconds: float = 0.0
    n_train: int = 0
    n_test: int = 0
    ntk_n_train: int = 0
    ntk_n_test: int = 0


def _short(e: Exception) -> str:
    """The first clause of the message (the op and where), without the long source path."""
    msg = str(e).split("\n")[0]
    if " at File " in msg:
        head, rest = msg.split(" at File ", 1)
        line = rest.split(", in ", 1)[-1] if ", in " in rest else rest
        msg = f"{head} in {line}"
    return msg[:140]


def build_limit(factory: Factory, x: torch.Tensor):
    """``(limit, None)``, or ``(None, reason)`` when the frontend cannot take the model."""
    try:
        return infinite_width(factory, x[:2].float()), None
    except (UnsupportedOperation, WidthError) as e:
        return None, _short(e)


def limit_accuracy(factory: Factory, data: Dataset, noise: float = 1e-6,
                   ntk_data: Dataset | None = None, limit=None, progress: bool = True) -> LimitResult:
    """NNGP and NTK test accuracy by one-hot regression: the NNGP's GP posterior mean on
    ``data`` and the NTK's gradient flow at t = ∞ on ``ntk_data`` (default ``data``; the
    NTK costs more per pair). All of each data set is used: subsample first. ``noise`` is
    relative: ``noise · mean(diag K_train)`` is added to the diagonal (PyTorch's default
    initialization gives kernels far below 1). ``limit``: an already built limit of it."""
    start = time.perf_counter()
    ntk_data = data if ntk_data is None else ntk_data
    lim, reason = (limit, None) if limit is not None else build_limit(factory, data.x_train)
    res = LimitResult(n_train=data.x_train.shape[0], n_test=data.x_test.shape[0],
                      ntk_n_train=ntk_data.x_train.shape[0], ntk_n_test=ntk_data.x_test.shape[0])
    if lim is None:
        res.reason = reason
        return res
    try:
        steps = [(kind, d) for kind, d in (("nngp", data), ("ntk", ntk_data)) if d.x_train.shape[0]]
        bar = tqdm(steps, desc="  limit kernels", leave=False, disable=not progress)
        for kind, d in bar:
            bar.set_postfix_str(f"{kind.upper()} on {d.x_train.shape[0] + d.x_test.shape[0]} inputs")
            blocks = limit_kernels(lim, d.x_train, d.x_test, ntk=(kind == "ntk"))
            k = blocks[kind]
            Y = one_hot(d.y_train, data.classes)
            ridge = noise * k.train.diagonal().mean().item()
            if kind == "nngp":
                pred = gp_posterior(k.train, Y, k.test_train, noise=ridge)
            else:
                pred = gradient_flow(k.train, Y, k.test_train, t=math.inf, noise=ridge)
            setattr(res, kind, (pred.classes() == d.y_test).double().mean().item())
    except UnsupportedOperation as e:
        res.reason = _short(e)
    res.seconds = time.perf_counter() - start
    return res


@dataclass
class TrainConfig:
    """Minibatch SGD (momentum 0.9) on cross-entropy, in the model's dtype."""

    epochs: int = 40
    lr: float = 0.05
    batch_size: int = 64
    momentum: float = 0.9


def train_finite(factory: Factory, width: int, data: Dataset, config: TrainConfig | None = None,
                 seed: int = 0, progress: bool = True) -> float:
    """Test accuracy of ``factory(width)`` (built under ``seed``) after SGD on ``data``."""
    config = config or TrainConfig()
    model = build(factory, width, seed)
    opt = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum)
    dtype = next(model.parameters()).dtype  # the model's own (float32 unless built otherwise)
    x, y = data.x_train.to(dtype), data.y_train
    gen = torch.Generator().manual_seed(seed)
    bar = tqdm(range(config.epochs), desc=f"  SGD width {width}", leave=False, disable=not progress)
    for _ in bar:
        perm = torch.randperm(x.shape[0], generator=gen)
        for i in range(0, x.shape[0], config.batch_size):
            idx = perm[i:i + config.batch_size]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    with torch.no_grad():
        return (model(data.x_test.to(dtype)).argmax(1) == data.y_test).double().mean().item()


@dataclass
class Convergence:
    """Relative Frobenius distance ``||K_width − K_∞|| / ||K_∞||`` per width."""

    widths: list[int]
    nngp: list[float] = field(default_factory=list)
    ntk: list[float] = field(default_factory=list)
    samples_nngp: int = 0
    samples_ntk: int = 0


def kernel_convergence(factory: Factory, x: torch.Tensor, widths: Sequence[int], samples_nngp: int = 64,
                       samples_ntk: int = 2, progress: bool = True, limit=None) -> Convergence | str:
    """Finite-width kernels of ``factory`` on inputs ``x`` vs the limit: the Monte Carlo
    NNGP over ``samples_nngp`` initializations and the mean empirical NTK (NTK
    parametrization) of ``samples_ntk`` networks, per width. Returns the reason instead when
    the limit is unavailable (``limit``: an already built ``tp.infinite_width`` of it).
    The NTK of one network converges to the limit like
    width^-1/2; the NNGP estimate also carries the Monte Carlo error of its samples."""
    lim, reason = (limit, None) if limit is not None else build_limit(factory, x)
    if lim is None:
        return reason
    try:
        K, theta = lim.kernels(x)
    except UnsupportedOperation as e:
        return _short(e)
    out = Convergence(list(widths), samples_nngp=samples_nngp, samples_ntk=samples_ntk)
    for w in tqdm(widths, desc="  kernels vs width", leave=False, disable=not progress):
        emp = empirical_nngp(factory, w, x, samples=samples_nngp, seed=0)
        out.nngp.append(((emp.mean - K).norm() / K.norm()).item())
        emp = ntk_mean(factory, w, x, samples=samples_ntk, seed=0, parametrization="ntk")
        out.ntk.append(((emp.mean - theta).norm() / theta.norm()).item())
    return out
