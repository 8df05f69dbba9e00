"""The transfer task of the main job: pretrain on some classes, read out others linearly.

Pretraining: the MLP of :mod:`.feature_learning` with ``split_class`` outputs is trained
(SGD, cross-entropy) on examples of the classes ``< split_class`` only: its μP limit (the
particles) and a finite μP network. Readout: kernel ridge regression on one-hot targets of
the classes ``≥ split_class`` with a budget of a few labelled examples, using as kernel

* the μP limit's **learned** last-hidden-layer feature kernel ``E[x^L(x) x^L(x')]`` after
  pretraining (:meth:`MuPLimitTrainer.feature_kernel`);
* the finite μP network's feature kernel ``φ(h(x))·φ(h(x'))/n`` after the same pretraining;
* the NNGP and NTK kernels of the same MLP, whose features do not move with training (the
  NNGP is the last layer's feature kernel at init, up to a constant offset and scale).

A linear readout on features with kernel ``K`` is kernel ridge regression with ``K``, so
all four use the same readout, the same budget and a ridge chosen on the same validation
examples (new classes, disjoint from the readout and test examples).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from ..feature_learning import finite_width_run
from ..frontend import infinite_width
from .feature_learning import FLConfig, batches, mlp, ridge_select, train_limit


@dataclass
class TransferResult:
    """Test accuracy per (kernel, readout budget), one entry per seed; seconds per part."""

    split_class: int
    n_pretrain: int
    n_test: int
    accuracy: dict[tuple[str, int], list[float]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    steps: int = 0
    diverged: list[str] = field(default_factory=list)


def check_pool(y_pool: torch.Tensor, cfg: FLConfig) -> int:
    """Raise unless the pool has enough examples of the old and the new classes; returns the
    number of new-class examples a seed uses (validation + the largest readout budget)."""
    c = cfg.split_class
    old, new = int((y_pool < c).sum()), int((y_pool >= c).sum())
    need = cfg.readout_val + max(cfg.readout_budgets)
    if new < need or old < cfg.pretrain:
        raise ValueError(f"the pool has {old} examples of classes < {c} and {new} of the others; the "
                         f"transfer task needs {cfg.pretrain} and {need}: enlarge FLConfig.pool or lower "
                         "FLConfig.pretrain / readout_val / readout_budgets")
    return need


def transfer(d: int, X: torch.Tensor, y: torch.Tensor, pool: int, kernels: dict[str, torch.Tensor],
             lr: float, cfg: FLConfig, progress: bool = True) -> TransferResult:
    """Run the transfer task over ``cfg.seeds`` seeds.

    ``X [P + T, d]``, ``y [P + T]``: the pool (first ``pool`` rows) then the test examples;
    ``kernels``: ``{"nngp", "ntk"}`` limit kernels on all of ``X`` (per output unit, so the
    same for any number of outputs); ``lr``: the μP learning rate (chosen on the main task's
    validation set)."""
    c = cfg.split_class
    classes = int(y.max()) + 1
    new = classes - c
    old_idx = (y[:pool] < c).nonzero().flatten()
    new_idx = (y[:pool] >= c).nonzero().flatten()
    test = pool + (y[pool:] >= c).nonzero().flatten()
    need = check_pool(y[:pool], cfg)
    factory = mlp(d, c)
    limit = infinite_width(factory, X[:2], parametrization="mup", base_width=cfg.base_width)
    width = max(cfg.finite_widths)
    res = TransferResult(c, cfg.pretrain, len(test))
    names = ["nngp", "ntk", "mup", f"finite {width}"]
    res.accuracy = {(k, b): [] for k in names for b in cfg.readout_budgets}
    res.seconds = {"mup": 0.0, "finite": 0.0}
    for seed in tqdm(range(cfg.seeds), desc="  transfer", leave=False, disable=not progress):
        gen = torch.Generator().manual_seed(2000 + seed)
        pre = old_idx[torch.randperm(len(old_idx), generator=gen)[: cfg.pretrain]]
        cand = new_idx[torch.randperm(len(new_idx), generator=gen)[:need]]
        pts = torch.cat([cand, test])  # validation, readout candidates, test: local kernel order
        y_loc = y[pts] - c
        val = torch.arange(cfg.readout_val)
        loc_test = torch.arange(need, len(pts))
        data_batches = batches(X[pre], y[pre], cfg.epochs, cfg.batch, seed)
        res.steps = len(data_batches)
        run = train_limit(limit, data_batches, lr, cfg.particles, seed)
        res.seconds["mup"] += run.seconds
        local = {k: K[pts][:, pts] for k, K in kernels.items()}
        if run.trainer is None:
            res.diverged.append(run.diverged or "")
        else:
            local["mup"] = run.trainer.feature_kernel(X[pts])
        t0 = time.perf_counter()
        fin = finite_width_run(factory, width, cfg.base_width, data_batches, X[pts], lr=lr,
                               loss="cross_entropy", seed=seed, readout_bias="2.bias", features_of="2")
        local[f"finite {width}"] = fin.features @ fin.features.T / width
        res.seconds["finite"] += time.perf_counter() - t0
        for b in cfg.readout_budgets:
            train = torch.arange(cfg.readout_val, cfg.readout_val + b)
            for k in names:
                acc = (ridge_select(local[k], y_loc, train, val, loc_test, new, cfg.ridges)[0]
                       if k in local else float("nan"))
                res.accuracy[(k, b)].append(acc)
    return res
