"""A depth-3 ReLU MLP (d = 784) NNGP + NTK for N inputs via tp.kernel_matrix, to disk.

Run: ``.venv/bin/python benchmarks/kernel_matrix_scale.py --n 20000 --block 1000 --out out/km``.
Interrupt and rerun with the same arguments to resume. Prints the peak resident set size
(which includes the pages of the two memory-mapped result files written so far, 2 × 8·N²
bytes at the end) and the peak anonymous memory (the working memory: sampled from
/proc/self/status every 0.2 s).
"""

from __future__ import annotations

import argparse
import functools
import os
import resource
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

import tensorprograms as tp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from nt_models import MLP  # noqa: E402


def _anon_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--block", type=int, default=500)
    ap.add_argument("--out", default="out/kernel_matrix_scale")
    args = ap.parse_args()
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((args.n, 784)))
    limit = tp.infinite_width(functools.partial(MLP, d=784, depth=3, sw2=2.0, sb2=0.05), x[:2])
    peak = [0.0]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.2):
            peak[0] = max(peak[0], _anon_mb())

    threading.Thread(target=sample, daemon=True).start()
    t = time.perf_counter()
    K = tp.kernel_matrix(limit, x, block_size=args.block, out=args.out)
    done.set()
    print(f"N={args.n} block={args.block}: {time.perf_counter() - t:.1f} s, "
          f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB "
          f"(with the memory-mapped results), peak anonymous {peak[0]:.0f} MB, "
          f"load average {os.getloadavg()}, NTK[0, :3] = {np.asarray(K['ntk'][0, :3])}")


if __name__ == "__main__":
    main()
