"""Learning-rate transfer across widths on MNIST-1D, SP vs μP (TP V, Figure 1).

    PYTHONPATH=src python examples/mup_transfer.py --out out/mup_transfer

Writes ``transfer.png`` (the figure), ``transfer.json`` (all losses) and prints the best
learning rate per width. Needs ``pip install mnist1d`` (no download: data are generated
from a seed).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch

from tensorprograms.mup.transfer import sweep


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--widths", type=int, nargs="+", default=[64, 128, 256, 512, 1024, 2048])
    ap.add_argument("--log2-lr", type=float, nargs=2, default=[-14, -3], metavar=("MIN", "MAX"))
    ap.add_argument("--optimizer", choices=["adam", "sgd"], default="adam")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    ap.add_argument("--out", default="out/mup_transfer")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    lo, hi = a.log2_lr
    grid = list(np.arange(lo, hi + 0.5))
    t0 = time.time()
    res = sweep(a.widths, grid, a.optimizer, epochs=a.epochs, batch_size=a.batch_size,
                seeds=a.seeds)
    os.makedirs(a.out, exist_ok=True)
    res.plot(os.path.join(a.out, "transfer.png"))
    with open(os.path.join(a.out, "transfer.json"), "w") as f:
        json.dump({"widths": res.widths, "lrs": res.lrs, "optimizer": res.optimizer,
                   "args": vars(a), "seconds": time.time() - t0,
                   "loss": {p: v.tolist() for p, v in res.loss.items()},
                   "best_lr": {p: res.best_lr(p) for p in res.loss},
                   "shift_octaves": {p: res.shift(p) for p in res.loss}}, f, indent=1)
    print(res.summary())
    print(f"wrote {a.out}/transfer.png and transfer.json in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
