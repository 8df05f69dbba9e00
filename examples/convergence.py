"""Convergence of finite networks' NNGP kernels to the infinite-width limit.

    PYTHONPATH=src python examples/convergence.py --out out/convergence
    PYTHONPATH=src python examples/convergence.py --models rnn gru --widths 64 128 256 512 1024 2048 --seeds 8

For each model in ``MODELS`` and each width, builds ``--seeds`` independently initialized
networks. One network's NNGP kernel is its features' kernel seen by the readout,
``K_n = σ_w²·φ φᵀ/fan_in + σ_b²`` (φ: [N, fan_in], the input of the readout layer
``model.out`` on a fixed batch; σ_w² = Var(W_ij)·fan_in and σ_b² read from the code by
``tp.frontend.read_initialization``): the output kernel averaged over the readout's
initialization, whose randomness is not a width effect. It is compared with the limit
``K = tp.infinite_width(...).nngp(x)`` by the relative Frobenius distance
``‖K_n − K‖_F / ‖K‖_F``. Writes one log-log PNG per model (mean over seeds ± one
standard deviation, with a fitted ``c·width^(-1/2)`` line) and prints the fitted slope
of log(distance) against log(width): −1/2 is the Tensor Programs rate of a single
network's fluctuations.

Add a model by adding an entry ``name: (factory, inputs)`` to ``MODELS``; ``factory(width)``
returns a plain ``nn.Module`` (hidden sizes proportional to ``width``) whose readout is an
``nn.Linear`` attribute named ``out``.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

import tensorprograms as tp
from tensorprograms.attention_models import transformer_block
from tensorprograms.factory import build, eval_mode
from tensorprograms.frontend import read_initialization

D, T, N, K_OUT = 3, 5, 4, 16  # input features, time steps, batch, readout units


class Recurrent(nn.Module):
    """``nn.RNN`` (tanh) or ``nn.GRU`` over the sequence, read out from the last state."""

    def __init__(self, width: int, kind: str) -> None:
        super().__init__()
        self.rnn = {"rnn": nn.RNN, "gru": nn.GRU}[kind](D, width, batch_first=True)
        self.out = nn.Linear(width, K_OUT)
        tp.init.normal_(self, 1.5, 0.1)  # weights N(0, 1.5/fan_in), biases N(0, 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.rnn(x)[0][:, -1])


def _sequences() -> torch.Tensor:
    return torch.randn(N, T, D, generator=torch.Generator().manual_seed(0))


def _positions() -> torch.Tensor:
    return torch.randn(4, 5, 3, generator=torch.Generator().manual_seed(0))


MODELS: dict[str, tuple[Callable[[int], nn.Module], Callable[[], torch.Tensor]]] = {
    "rnn": (lambda n: Recurrent(n, "rnn"), _sequences),
    "gru": (lambda n: Recurrent(n, "gru"), _sequences),
    # a pre-norm 1/d-attention block (tensorprograms.attention_models)
    "transformer": (transformer_block, _positions),
}


def distances(factory: Callable[[int], nn.Module], x: torch.Tensor, widths: list[int],
              seeds: int) -> tuple[torch.Tensor, np.ndarray]:
    """The limit kernel and ``[len(widths), seeds]`` relative Frobenius distances to it."""
    limit = tp.infinite_width(factory, x).nngp(x)
    out = np.zeros((len(widths), seeds))
    xd = x.double() if x.is_floating_point() else x
    with torch.no_grad(), tqdm(total=len(widths) * seeds, desc="networks", leave=False) as bar:
        for i, w in enumerate(widths):
            inits = read_initialization(factory, (w, 2 * w))
            for s in range(seeds):
                model = eval_mode(build(factory, w, s)).double()
                feats = []
                hook = model.out.register_forward_hook(lambda m, a, o, _f=feats: _f.append(a[0]))
                model(xd)
                hook.remove()
                phi = feats[0]
                fan_in = phi.shape[1]
                sw2 = float(inits["out.weight"].variances[0]) * fan_in
                sb2 = float(inits["out.bias"].variances[0]) if "out.bias" in inits else 0.0
                Kn = sw2 * phi @ phi.T / fan_in + sb2
                out[i, s] = float(torch.linalg.norm(Kn - limit) / torch.linalg.norm(limit))
                bar.update(1)
    return limit, out


def slope(widths: list[int], dist: np.ndarray) -> float:
    """Least-squares slope of log(mean distance) against log(width)."""
    return float(np.polyfit(np.log(widths), np.log(dist.mean(1)), 1)[0])


def plot(name: str, widths: list[int], dist: np.ndarray, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    w = np.array(widths, dtype=float)
    mean, std = dist.mean(1), dist.std(1)
    c = np.exp(np.mean(np.log(mean) + 0.5 * np.log(w)))  # best c in log space for c·w^-1/2
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.errorbar(w, mean, yerr=std, fmt="o-", capsize=3, label=f"{name} (slope {slope(widths, dist):.2f})")
    ax.plot(w, c / np.sqrt(w), "k--", label=r"$c\cdot\mathrm{width}^{-1/2}$")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("width")
    ax.set_ylabel(r"$\|K_n - K_\infty\|_F / \|K_\infty\|_F$")
    ax.set_title(f"{name}: one network's NNGP vs the limit")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--widths", nargs="+", type=int, default=[64, 128, 256, 512, 1024, 2048])
    parser.add_argument("--seeds", type=int, default=8, help="networks per width")
    parser.add_argument("--out", default="out/convergence", help="folder for the PNGs")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    for name in args.models:
        factory, inputs = MODELS[name]
        _, dist = distances(factory, inputs(), args.widths, args.seeds)
        path = os.path.join(args.out, f"{name}.png")
        plot(name, args.widths, dist, path)
        table = "  ".join(f"{w}: {m:.4f}" for w, m in zip(args.widths, dist.mean(1)))
        print(f"{name}: slope {slope(args.widths, dist):+.3f} (expected -0.5); mean distance {table}; {path}")


if __name__ == "__main__":
    main()
