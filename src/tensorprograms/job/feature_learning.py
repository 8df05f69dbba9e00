"""The main job's feature-learning part: the μP (feature-learning) limit of an MLP vs the
NNGP and NTK limits of the same MLP, and finite μP networks, over several seeds.

One data set is handled in three moves (``compare``):

1. a fixed **pool** of training examples (a seeded subsample of the training split) and a
   fixed **test** subsample; the NNGP and NTK limit kernels are computed once on pool ∪ test
   (every kernel method below uses sub-blocks of them);
2. per seed ``s``: a training set and a validation set drawn from the pool (seeded
   permutation); kernel ridge regression on one-hot targets with the NNGP and the NTK
   (ridge chosen on the validation set), the μP limit trained by SGD on cross-entropy
   (the learning rate chosen once, on seed 0's validation set, from a grid), and finite μP
   networks at a few widths trained identically (same lr, batches, epochs);
3. the transfer task (:mod:`.transfer`).

The MLP is ``d → n → classes`` (one hidden ReLU layer, PyTorch's default init): its μP limit
costs ``O(M·B·(d + k))`` per step (two-layer mean-field dynamics: no hidden matrix), so
hundreds of steps and several seeds fit in the job's time. Deeper MLPs cost ``O(M·B²·T²)``
(docs/feature-learning.md). Accuracies are mean ± standard error over seeds.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from ..feature_learning import TrainingDiverged, finite_width_run
from ..frontend import infinite_width
from ..predict import gp_posterior, one_hot
from .data import Dataset


@dataclass
class FLConfig:
    """Sizes and hyperparameter grids (every choice made on a validation split)."""

    pool: int = 1600  # training examples the seeds draw from (kernels are computed on pool ∪ test)
    n_test: int = 500
    n_train: int = 1000
    n_val: int = 300
    seeds: int = 5
    particles: int = 4096
    epochs: int = 30
    batch: int = 32
    base_width: int = 64
    lrs: tuple[float, ...] = (0.1, 0.3, 1.0, 3.0)
    ridges: tuple[float, ...] = (1e-6, 1e-3, 1e-2, 1e-1)  # relative to mean(diag K)
    finite_widths: tuple[int, ...] = (256, 2048)
    # transfer: pretrain on classes < split, linear readout on classes >= split
    split_class: int = 5
    pretrain: int = 500
    readout_budgets: tuple[int, ...] = (50, 250)
    readout_val: int = 150


def mlp(d: int, classes: int):
    """``d → n → classes``, ReLU, PyTorch's default init; the readout module is ``"2"``."""

    def factory(n: int) -> nn.Module:
        return nn.Sequential(nn.Linear(d, n), nn.ReLU(), nn.Linear(n, classes))

    return factory


def mean_se(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (``std / √n``; nan for one value)."""
    t = torch.tensor([float(v) for v in values], dtype=torch.float64)
    se = float(t.std() / math.sqrt(len(t))) if len(t) > 1 else float("nan")
    return float(t.mean()), se


def ridge_predict(K: torch.Tensor, train: torch.Tensor, evals: torch.Tensor, y: torch.Tensor,
                  classes: int, ridge: float) -> torch.Tensor:
    """Classes predicted by kernel ridge regression on one-hot targets: ``K`` is a kernel on
    all points, ``train``/``evals`` index it, ``y [len(train)]`` labels; the ridge is
    ``ridge · mean(diag K_train)``."""
    k_tt = K[train][:, train]
    noise = ridge * k_tt.diagonal().mean().item()
    return gp_posterior(k_tt, one_hot(y, classes), K[evals][:, train], noise=noise).classes()


def ridge_select(K: torch.Tensor, y_all: torch.Tensor, train, val, test, classes: int,
                 ridges: Sequence[float]) -> tuple[float, float]:
    """``(test accuracy, ridge)`` with the ridge that is best on ``val``."""
    def acc(ev, lam):
        return float((ridge_predict(K, train, ev, y_all[train], classes, lam) == y_all[ev]).double().mean())

    val_acc = {lam: acc(val, lam) for lam in ridges}
    best = max(val_acc, key=val_acc.get)
    return acc(test, best), best


def batches(x: torch.Tensor, y: torch.Tensor, epochs: int, batch: int, seed: int):
    """Shuffled minibatches (last partial batch dropped), ``epochs`` passes."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=gen)
        out += [(x[perm[i:i + batch]], y[perm[i:i + batch]]) for i in range(0, len(x) - batch + 1, batch)]
    return out


@dataclass
class LimitRun:
    """One trained μP limit: the trainer, its wall seconds and whether it diverged."""

    trainer: object | None
    seconds: float
    diverged: str | None = None


def train_limit(limit, data_batches, lr: float, particles: int, seed: int) -> LimitRun:
    """Train the μP limit with SGD on cross-entropy over ``data_batches``."""
    start = time.perf_counter()
    trainer = limit.trainer(lr=lr, loss="cross_entropy", particles=particles, seed=seed, method="particles")
    try:
        trainer.train(data_batches, progress=False)
    except TrainingDiverged as e:
        return LimitRun(None, time.perf_counter() - start, str(e))
    return LimitRun(trainer, time.perf_counter() - start)


@dataclass
class FLResult:
    """Everything ``compare`` measured on one data set (accuracies per seed)."""

    dataset: str
    config: FLConfig
    n_train: int
    n_val: int
    n_test: int
    accuracy: dict[str, list[float]] = field(default_factory=dict)
    ridges: dict[str, list[float]] = field(default_factory=dict)
    lr: float = float("nan")
    lr_val: dict[float, float] = field(default_factory=dict)
    steps: int = 0
    seconds: dict[str, float] = field(default_factory=dict)
    kernel_points: int = 0
    transfer: object | None = None


def splits(pool: int, cfg: FLConfig, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seed ``seed``'s training and validation indices into the pool (disjoint)."""
    perm = torch.randperm(pool, generator=torch.Generator().manual_seed(1000 + seed))
    return perm[: cfg.n_train], perm[cfg.n_train: cfg.n_train + cfg.n_val]


def compare(data: Dataset, cfg: FLConfig | None = None, progress: bool = True) -> FLResult:
    """The μP limit vs the NNGP/NTK limits (and finite μP nets) on ``data``, plus transfer."""
    from .transfer import check_pool, transfer

    cfg = cfg or FLConfig()
    sub = data.subsample(cfg.pool, cfg.n_test)
    P, classes = sub.x_train.shape[0], data.classes
    X = torch.cat([sub.x_train, sub.x_test])
    y_all = torch.cat([sub.y_train, sub.y_test])
    test = torch.arange(P, X.shape[0])
    check_pool(sub.y_train, cfg)
    if P < cfg.n_train + 2:
        raise ValueError(f"{data.name} has {P} training examples in the pool; FLConfig.n_train = "
                         f"{cfg.n_train} leaves none for validation: lower n_train")
    res = FLResult(data.name, cfg, cfg.n_train, min(cfg.n_val, P - cfg.n_train), len(test))
    res.kernel_points = X.shape[0]
    factory = mlp(data.d, classes)
    bar = tqdm(total=2 + cfg.seeds + len(cfg.lrs) - 1, desc=f"  μP vs kernels ({data.name})", leave=False,
               disable=not progress)
    t0 = time.perf_counter()
    kernels = dict(zip(("nngp", "ntk"), infinite_width(factory, X[:2].float()).kernels(X)))
    res.seconds["kernels"] = time.perf_counter() - t0
    bar.update(1)
    mup_limit = infinite_width(factory, X[:2], parametrization="mup", base_width=cfg.base_width)
    names = ["nngp", "ntk", "mup"] + [f"finite {w}" for w in cfg.finite_widths]
    res.accuracy = {k: [] for k in names}
    res.ridges = {"nngp": [], "ntk": []}
    res.seconds.update({"mup": 0.0, "finite": 0.0})
    for seed in range(cfg.seeds):
        train, val = splits(P, cfg, seed)
        for k in ("nngp", "ntk"):
            acc, lam = ridge_select(kernels[k], y_all, train, val, test, classes, cfg.ridges)
            res.accuracy[k].append(acc)
            res.ridges[k].append(lam)
        data_batches = batches(X[train], y_all[train], cfg.epochs, cfg.batch, seed)
        res.steps = len(data_batches)
        if seed == 0:  # choose the lr on seed 0's validation set; keep the chosen run
            runs, t0 = {}, time.perf_counter()
            for lr in cfg.lrs:
                runs[lr] = train_limit(mup_limit, data_batches, lr, cfg.particles, seed)
                tr = runs[lr].trainer
                res.lr_val[lr] = (float("nan") if tr is None else
                                  float((tr.predict(X[val]).argmax(1) == y_all[val]).double().mean()))
                bar.update(1)
            ok = [lr for lr in cfg.lrs if res.lr_val[lr] == res.lr_val[lr]]
            res.lr = max(ok, key=res.lr_val.get)  # a tie goes to the smaller lr (the first)
            run = runs[res.lr]
            res.seconds["lr search"] = time.perf_counter() - t0 - run.seconds
        else:
            run = train_limit(mup_limit, data_batches, res.lr, cfg.particles, seed)
            bar.update(1)
        if run.trainer is None:
            res.accuracy["mup"].append(float("nan"))
        else:
            pred = run.trainer.predict(X[test]).argmax(1)
            res.accuracy["mup"].append(float((pred == y_all[test]).double().mean()))
        res.seconds["mup"] += run.seconds
        t0 = time.perf_counter()
        for w in cfg.finite_widths:
            fin = finite_width_run(factory, w, cfg.base_width, data_batches, X[test], lr=res.lr,
                                   loss="cross_entropy", seed=seed, readout_bias="2.bias")
            res.accuracy[f"finite {w}"].append(float((fin.outputs.argmax(1) == y_all[test]).double().mean()))
        res.seconds["finite"] += time.perf_counter() - t0
    bar.update(1)
    bar.close()
    res.transfer = transfer(data.d, X, y_all, P, kernels, res.lr, cfg, progress=progress)
    return res
