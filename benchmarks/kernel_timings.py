"""Wall-clock time of limit kernels on this machine; prints a table.

Run: ``.venv/bin/python benchmarks/kernel_timings.py`` (about a minute).
"""

from __future__ import annotations

import time

import torch

import tensorprograms as tp
from tensorprograms.examples import mlp


class TanhMLP(torch.nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.l1, self.l2, self.l3 = (torch.nn.Linear(8, width), torch.nn.Linear(width, width),
                                     torch.nn.Linear(width, 16))

    def forward(self, x):
        return self.l3(torch.tanh(self.l2(torch.relu(self.l1(x)))))


def timed(fn, *args) -> float:
    t = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t


def program_nngp(P, out):
    return tp.master_theorem(P).cov(out)


def module_nngp(x):
    return tp.infinite_width(TanhMLP, x).nngp(x)


def main() -> None:
    torch.manual_seed(0)
    rows = []
    for act, name, sizes in ((torch.relu, "relu (closed forms)", (100, 500, 1000)),
                             (torch.tanh, "tanh (polar quadrature)", (50, 100, 200))):
        for n in sizes:
            x = torch.randn(n, 10, dtype=torch.float64)
            P, out = mlp(x, depth=3, activation=act, bias_variance=0.1)
            rows.append((f"NNGP, 3-layer {name} MLP program", n, timed(program_nngp, P, out)))
    for n in (16, 64):
        x = torch.randn(n, 8, dtype=torch.float64)
        rows.append(("infinite_width + nngp, PyTorch relu/tanh MLP", n, timed(module_nngp, x)))
        limit = tp.infinite_width(TanhMLP, x)
        rows.append(("limit.kernels (NNGP + NTK), same module", n, timed(limit.kernels, x)))
    print(f"{'case':<48} {'N':>6} {'seconds':>9}")
    for case, n, t in rows:
        print(f"{case:<48} {n:>6} {t:>9.2f}")


if __name__ == "__main__":
    main()
