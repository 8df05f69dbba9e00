"""The basics (``tensorprograms basics``): limits of a small program, of a 3-layer MLP
program and of an ordinary PyTorch module, each checked against finite width."""

from __future__ import annotations

import math
import time

import torch

import tensorprograms as tp
from tensorprograms import functions as F
from tensorprograms.examples import mlp


def _heading(text: str, first: bool = False) -> None:
    if not first:
        print()
    print("=" * 72)
    print(text)
    print("=" * 72)


def small_program() -> None:
    _heading("1. A hand-written Tensor Program", first=True)
    P = tp.Program()
    x = P.vector("x", shape=(2,), cov=torch.tensor([[1.0, 0.5], [0.5, 2.0]]))
    W = P.matrix("W", variance=1.5)
    h = W @ P.nonlin(torch.tanh, x, name="y")
    gate = P.nonlin(lambda a, b: a * torch.sigmoid(b), h, x, name="gate")
    theta = P.moment(lambda u: u**2, gate, name="theta")
    z = P.nonlin(lambda u, t: u / torch.sqrt(t), gate, params=(theta,), name="z")
    print(P)
    limit = tp.master_theorem(P)
    print("\nlimit of Cov(Z^h)        :", limit.cov(h).numpy().round(6).tolist())
    print("limit of theta           :", limit.value(theta).numpy().round(6).tolist())
    print("limit of E[Z^z Z^zᵀ]     :", limit.second_moment(z).numpy().round(6).tolist())
    print("\nhow each expectation was computed:")
    print(limit.report())
    print("\nfinite width n vs limit (RMS error of theta over 32 seeds):")
    print(f"  {'width':>6} {'RMS error':>10} {'× sqrt(n)':>10}")
    for n in (256, 1024, 4096):
        runs = torch.stack([tp.simulate(P, n, seed=s)[theta] for s in range(32)])
        err = ((runs - limit.value(theta)) ** 2).mean().sqrt().item()
        print(f"  {n:>6} {err:>10.5f} {err * math.sqrt(n):>10.3f}")


def mlp_kernel() -> None:
    _heading("2. NNGP kernel of a 3-layer ReLU MLP (weights N(0, 2/fan_in), biases N(0, 0.1))")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 8, generator=gen, dtype=torch.float64)
    x = x * torch.linspace(0.5, 2.0, 5, dtype=torch.float64)[:, None]
    P, out = mlp(x, depth=3, activation=F.relu, weight_variance=2.0, bias_variance=0.1)
    print(P)
    t = time.perf_counter()
    K = tp.master_theorem(P).cov(out)
    print(f"\nNNGP kernel [5, 5] (computed in {1e3 * (time.perf_counter() - t):.1f} ms):")
    print(K.numpy().round(6))
    print("\nfinite-width Monte Carlo of the same program (relative RMS error over 24 seeds):")
    print(f"  {'width':>6} {'RMS error':>10} {'× sqrt(n)':>10}")
    scale = K.diagonal().sqrt()
    scale = scale[:, None] * scale[None, :]
    for n in (256, 1024, 4096):
        err = torch.stack(
            [(((tp.simulate(P, n, seed=s).second_moment(out) - K) / scale) ** 2).mean()
             for s in range(24)]
        ).mean().sqrt().item()
        print(f"  {n:>6} {err:>10.5f} {err * math.sqrt(n):>10.3f}")
    print("  (a constant last column is the n^-1/2 law of the Master Theorem's fluctuations)")


class TanhMLP(torch.nn.Module):
    """An ordinary PyTorch model (PyTorch's default initialization)."""

    def __init__(self, width: int):
        super().__init__()
        self.l1 = torch.nn.Linear(8, width)
        self.l2 = torch.nn.Linear(width, width)
        self.l3 = torch.nn.Linear(width, 16)

    def forward(self, x):
        return self.l3(torch.tanh(self.l2(torch.relu(self.l1(x)))))


def pytorch_model() -> None:
    _heading("3. An ordinary PyTorch module: tp.infinite_width vs the real module at finite width")
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(6, 8, generator=gen, dtype=torch.float64)
    t = time.perf_counter()
    limit = tp.infinite_width(TanhMLP, x)
    K = limit.nngp(x)
    print(limit.program)
    print(f"\nNNGP kernel (captured, lowered and computed in {time.perf_counter() - t:.1f} s):")
    print(K.numpy().round(6))
    print("\nMonte Carlo NNGP of the PyTorch module itself (tp.empirical.nngp, 200 inits):")
    print(f"  {'width':>6} {'max |MC - limit| / SE':>22} {'max rel. error':>15}")
    for width in (64, 256, 1024):
        emp = tp.empirical.nngp(TanhMLP, width, x, samples=200, seed=0)
        z = ((emp.mean - K).abs() / emp.stderr).max().item()
        rel = ((emp.mean - K).abs() / K.diagonal().max()).max().item()
        print(f"  {width:>6} {z:>22.2f} {rel:>15.4f}")
    print("  (PyTorch's default biases add a 1/(3·width) term at finite width that vanishes"
          " in the limit: visible at width 64, gone by 1024)")
    t = time.perf_counter()
    _, theta = limit.kernels(x)
    print(f"\nNTK (NTK parametrization, TP II's backward program; {time.perf_counter() - t:.1f} s):")
    print(theta.numpy().round(6))
    emp = tp.empirical.ntk_mean(TanhMLP, 1024, x, samples=16, parametrization="ntk")
    z = ((emp.mean - theta).abs() / emp.stderr).max().item()
    print(f"mean empirical NTK of 16 width-1024 modules (torch.func): max |MC - limit| / SE = {z:.2f}")
    print("  (the default readout bias still adds 1/(3·1024) ≈ 3e-4 at this width; it vanishes"
          " in the limit)")


def main() -> None:
    torch.set_printoptions(precision=6)
    small_program()
    mlp_kernel()
    pytorch_model()


if __name__ == "__main__":
    main()
