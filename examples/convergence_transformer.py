"""Convergence of a transformer block's kernel to its infinite-width limit.

    PYTHONPATH=src python examples/convergence_transformer.py [--out convergence_transformer.png]

For each width n, builds ``tensorprograms.attention_models.transformer_block(n)`` (single-head
1/d attention with shared queries/keys, LayerNorm, ReLU feed-forward, residuals, mean over
positions) with several seeds, and measures the relative Frobenius distance between one
network's feature kernel ``(1/n) Σ_α h_α(x) h_α(x')`` (the input of the readout, whose
limit is the NNGP since the readout has σ² = 1) and ``tp.infinite_width(...).nngp(x)``.
Plots it against width on log-log axes with a width^(-1/2) reference line (TP I's
fluctuations are O(n^(-1/2))).
"""

from __future__ import annotations

import argparse

import torch
from tqdm import tqdm

import tensorprograms as tp
from tensorprograms.attention_models import transformer_block
from tensorprograms.factory import build


def feature_kernel(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``(1/n) H Hᵀ`` for the readout's input features H ``[N, n]``."""
    seen = {}
    handle = model.out.register_forward_hook(lambda m, inp, out: seen.setdefault("h", inp[0]))
    with torch.no_grad():
        model(x)
    handle.remove()
    h = seen["h"]
    return h @ h.T / h.shape[1]


def distances(factory, x, widths, seeds) -> dict[int, list[float]]:
    K = tp.infinite_width(factory, x).nngp(x)
    out = {}
    for w in tqdm(widths, desc="widths"):
        out[w] = []
        for s in range(seeds):
            model = build(factory, w, s).double().eval()
            Kn = feature_kernel(model, x.double())
            out[w].append(float(torch.linalg.norm(Kn - K) / torch.linalg.norm(K)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="convergence_transformer.png")
    parser.add_argument("--widths", type=int, nargs="+", default=[64, 128, 256, 512, 1024, 2048])
    parser.add_argument("--seeds", type=int, default=8)
    args = parser.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 5, 3, generator=gen, dtype=torch.float64)
    d = distances(transformer_block, x, args.widths, args.seeds)
    widths = sorted(d)
    mean = [sum(d[w]) / len(d[w]) for w in widths]
    for w, m in zip(widths, mean):
        print(f"width {w:>6}: relative Frobenius distance {m:.4f}")
    lw, lm = torch.tensor(widths, dtype=torch.float64).log(), torch.tensor(mean).log()
    slope = float(((lw - lw.mean()) * (lm - lm.mean())).sum() / ((lw - lw.mean()) ** 2).sum())
    print(f"fitted log-log slope {slope:.3f} (theory: -0.5)")
    fig, ax = plt.subplots(figsize=(5, 4))
    for w in widths:
        ax.scatter([w] * len(d[w]), d[w], color="C0", alpha=0.3, s=10)
    ax.plot(widths, mean, "o-", color="C0", label=f"transformer block (mean over seeds), slope {slope:.2f}")
    ref = [mean[0] * (w / widths[0]) ** -0.5 for w in widths]
    ax.plot(widths, ref, "--", color="gray", label="width$^{-1/2}$")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("width")
    ax.set_ylabel("‖K_n − K_∞‖_F / ‖K_∞‖_F")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
