"""Data sets of the main job (generated or shipped locally; nothing is downloaded) and the
``.npz`` format of the CLI."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")


@dataclass
class Dataset:
    """``x_*`` float64 ``[N, d]``, ``y_*`` int64 labels ``[N]`` in ``0..classes-1``."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    @property
    def classes(self) -> int:
        return int(max(self.y_train.max(), self.y_test.max())) + 1

    @property
    def d(self) -> int:
        return self.x_train.shape[1]

    def subsample(self, n_train: int, n_test: int, seed: int = 0) -> Dataset:
        """The first ``n_train``/``n_test`` examples of a seeded permutation of each split."""
        n_train, n_test = min(n_train, self.x_train.shape[0]), min(n_test, self.x_test.shape[0])
        gen = torch.Generator().manual_seed(seed)
        tr = torch.randperm(self.x_train.shape[0], generator=gen)[:n_train]
        te = torch.randperm(self.x_test.shape[0], generator=gen)[:n_test]
        return Dataset(self.name, self.x_train[tr], self.y_train[tr], self.x_test[te], self.y_test[te])


def mnist1d() -> Dataset:
    """MNIST-1D (Greydanus 2020) from ``mnist1d.data.make_dataset`` with its default
    arguments (5000 examples, seed 42, 4000 train / 1000 test, length 40)."""
    from ..mup.transfer import mnist1d as make

    d = make()  # the package defaults: num_samples=5000, seed=42
    return Dataset("MNIST-1D", d["x"].double(), d["y"], d["x_test"].double(), d["y_test"])


def digits(test_fraction: float = 0.3, seed: int = 0) -> Dataset:
    """scikit-learn's ``load_digits`` (1797 8×8 images, flattened to 64 values in [0, 1]),
    split by a seeded permutation (70% train / 30% test)."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    perm = np.random.default_rng(seed).permutation(len(y))
    n_test = int(round(test_fraction * len(y)))
    te, tr = perm[:n_test], perm[n_test:]
    X = torch.tensor(x / 16.0, dtype=torch.float64)
    Y = torch.tensor(y, dtype=torch.int64)
    return Dataset("digits", X[tr], Y[tr], X[te], Y[te])


def load_npz(path: str | Path) -> Dataset:
    """A user's data set: an ``.npz`` with ``x_train`` ``[N, ...]`` and ``x_test``
    ``[M, ...]`` (float), ``y_train`` ``[N]`` and ``y_test`` ``[M]`` (integer labels
    ``0..C-1``)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    with np.load(path) as f:
        missing = [k for k in NPZ_KEYS if k not in f]
        if missing:
            raise ValueError(f"{path} lacks the keys {missing}; it needs {list(NPZ_KEYS)} "
                             "(x_*: float inputs, batch first; y_*: integer labels)")
        arrays = {k: f[k] for k in NPZ_KEYS}
    for k in ("y_train", "y_test"):
        y = arrays[k]
        if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer) or (y.size and y.min() < 0):
            raise ValueError(f"{k} must be a 1-D array of integer labels >= 0; got dtype {y.dtype}, "
                             f"shape {y.shape}")
    for a, b in (("x_train", "y_train"), ("x_test", "y_test")):
        if arrays[a].shape[0] != arrays[b].shape[0]:
            raise ValueError(f"{a} has {arrays[a].shape[0]} rows but {b} has {arrays[b].shape[0]}")
    if arrays["x_train"].shape[1:] != arrays["x_test"].shape[1:]:
        raise ValueError(f"x_train and x_test have different input shapes: {arrays['x_train'].shape[1:]} "
                         f"vs {arrays['x_test'].shape[1:]}")
    return Dataset(path.stem, torch.tensor(arrays["x_train"], dtype=torch.float64),
                   torch.tensor(arrays["y_train"], dtype=torch.int64),
                   torch.tensor(arrays["x_test"], dtype=torch.float64),
                   torch.tensor(arrays["y_test"], dtype=torch.int64))
