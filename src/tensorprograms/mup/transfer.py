"""Hyperparameter transfer (TP V, Figure 1): learning-rate sweeps across widths.

An MLP (input 40 -> width -> width -> 10 classes, ReLU, PyTorch's default init) is
trained on MNIST-1D at several widths and learning rates, in SP (the code as written)
and in μP (``tp.mup.parametrize`` with ``base_width`` the smallest width). In μP the
best learning rate should not move with width; in SP it does.

MNIST-1D is generated locally by the ``mnist1d`` package (``make_dataset``, fixed seed);
nothing is downloaded.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from tensorprograms.mup.errors import MupError
from tensorprograms.mup.optim import SGD, Adam
from tensorprograms.mup.parametrize import parametrize
from tensorprograms.mup.shapes import infer


def mnist1d(num_samples: int = 5000, seed: int = 42) -> dict[str, torch.Tensor]:
    """MNIST-1D as float32/int64 tensors: ``x`` [N, 40], ``y`` [N], ``x_test``, ``y_test``.

    Uses ``mnist1d.data.make_dataset`` (which reseeds numpy's and Python's global RNGs;
    their states are restored here). Requires ``pip install mnist1d``.
    """
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise MupError(
            "the transfer experiment needs the 'mnist1d' package: pip install mnist1d"
        ) from e
    import random

    state_np, state_py = np.random.get_state(), random.getstate()  # noqa: NPY002
    try:
        args = get_dataset_args()
        args.num_samples = num_samples
        args.seed = seed
        d = make_dataset(args)
    finally:
        np.random.set_state(state_np)  # noqa: NPY002
        random.setstate(state_py)
    return {
        "x": torch.tensor(d["x"], dtype=torch.float32),
        "y": torch.tensor(d["y"], dtype=torch.int64),
        "x_test": torch.tensor(d["x_test"], dtype=torch.float32),
        "y_test": torch.tensor(d["y_test"], dtype=torch.int64),
    }


def mlp(width: int, d_in: int = 40, classes: int = 10) -> nn.Module:
    """The experiment's model: two hidden ReLU layers of ``width``, default init."""
    return nn.Sequential(
        nn.Linear(d_in, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
        nn.Linear(width, classes),
    )


@dataclass
class TransferResult:
    """``loss[p][i, j]``: final training loss (mean over the last epoch and over seeds;
    ``inf`` if training diverged) of parametrization ``p`` at ``widths[i]`` and
    ``lrs[j]``."""

    widths: list[int]
    lrs: list[float]
    optimizer: str
    loss: dict[str, np.ndarray] = field(default_factory=dict)

    def best_lr(self, parametrization: str) -> list[float]:
        """Best learning rate per width."""
        return [self.lrs[int(np.argmin(row))] for row in self.loss[parametrization]]

    def shift(self, parametrization: str) -> float:
        """log2 of (best lr at the largest width / best lr at the smallest width)."""
        b = self.best_lr(parametrization)
        return math.log2(b[-1] / b[0])

    def summary(self) -> str:
        lines = [f"optimizer {self.optimizer}; lr grid {self.lrs[0]:g}..{self.lrs[-1]:g}"]
        for p in self.loss:
            pairs = zip(self.widths, self.best_lr(p), strict=True)
            best = ", ".join(f"{w}: 2^{math.log2(b):g}" for w, b in pairs)
            lines.append(f"{p:9s} best lr per width: {best}; shift {self.shift(p):+g} octaves")
        return "\n".join(lines)

    def plot(self, path: str) -> None:
        """Save the TP V-style figure (loss against log2 lr, one curve per width)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, len(self.loss), figsize=(5.5 * len(self.loss), 4), sharey=True)
        axes = np.atleast_1d(axes)
        cmap = plt.get_cmap("viridis")
        for ax, (p, arr) in zip(axes, self.loss.items(), strict=True):
            for i, w in enumerate(self.widths):
                color = cmap(i / max(1, len(self.widths) - 1))
                ax.plot(np.log2(self.lrs), arr[i], marker="o", ms=3, color=color, label=f"{w}")
                j = int(np.argmin(arr[i]))
                ax.plot(math.log2(self.lrs[j]), arr[i, j], marker="*", ms=10, color=color)
            ax.set_title({"standard": "SP", "mup": "μP"}.get(p, p) + f" ({self.optimizer})")
            ax.set_xlabel("log2 learning rate")
        axes[0].set_ylabel("training loss (last epoch)")
        finite = np.concatenate([a[np.isfinite(a)] for a in self.loss.values()])
        if finite.size:
            axes[0].set_ylim(max(0.0, finite.min() - 0.05), min(finite.max(), 2.5) + 0.05)
        axes[-1].legend(title="width", fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)


def train_loss(
    model: nn.Module,
    data: dict[str, torch.Tensor],
    optimizer: str,
    lr: float,
    epochs: int,
    batch_size: int,
    seed: int,
) -> float:
    """Train ``model`` (built by ``parametrize``) and return the mean training loss over
    its last epoch (``inf`` if it diverged)."""
    make = {"sgd": SGD, "adam": Adam}[optimizer]
    opt = make(model, lr=lr)
    x, y = data["x"], data["y"]
    g = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        losses = []
        for i in range(0, len(x) - batch_size + 1, batch_size):
            idx = perm[i : i + batch_size]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            if not torch.isfinite(loss):
                return math.inf
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    out = float(np.mean(losses))
    return out if math.isfinite(out) else math.inf


def sweep(
    widths: Sequence[int] = (64, 128, 256, 512, 1024, 2048),
    log2_lrs: Sequence[float] = tuple(range(-14, -2)),
    optimizer: str = "adam",
    parametrizations: Sequence[str] = ("standard", "mup"),
    epochs: int = 10,
    batch_size: int = 128,
    seeds: int = 1,
    data: dict[str, torch.Tensor] | None = None,
    progress: bool = True,
) -> TransferResult:
    """Run the sweep; ``base_width = min(widths)``. Every (width, lr, seed) starts from
    the same RNG seed in SP and μP, so the two differ only by the parametrization."""
    if optimizer not in ("sgd", "adam"):
        raise MupError(f"optimizer must be 'sgd' or 'adam', got {optimizer!r}")
    widths = sorted(int(w) for w in widths)
    lrs = [2.0**k for k in log2_lrs]
    data = mnist1d() if data is None else data
    base = widths[0]
    infos = infer(mlp, base)
    res = TransferResult(widths, lrs, optimizer)
    jobs = [(p, i, j, s) for p in parametrizations for i in range(len(widths))
            for j in range(len(lrs)) for s in range(seeds)]
    acc = {p: np.zeros((len(widths), len(lrs))) for p in parametrizations}
    for p, i, j, s in tqdm(jobs, desc="transfer sweep", disable=not progress):
        torch.manual_seed(1000 * s + 17)
        model = parametrize(mlp, widths[i], base, p, shapes_info=infos)
        acc[p][i, j] += train_loss(model, data, optimizer, lrs[j], epochs, batch_size, s) / seeds
    res.loss = acc
    return res
