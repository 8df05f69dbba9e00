"""The main job (``make demo`` = ``python -m tensorprograms.demo``): on MNIST-1D and
scikit-learn's digits, an MLP, a 1-D CNN and a GRU (ordinary PyTorch modules) trained by
SGD at several widths vs their NNGP and NTK limits, and the finite-width kernels'
convergence to the limit; then the μP (feature-learning) limit of an MLP vs its NNGP and
NTK limits and finite μP nets, with a transfer task (job/feature_learning.py). Writes
``out/report/report.md`` with PNG plots and prints the tables. Sizes are chosen so the
whole job takes a few minutes on 2 cores (220 s on the idle development machine)."""

from __future__ import annotations

import argparse

import torch

from .job.data import digits, mnist1d
from .job.feature_learning import FLConfig
from .job.fl_report import report_section
from .job.models import factory
from .job.pieces import TrainConfig
from .job.report import ModelSpec, run

# (train, test) subsample sizes: SGD and the NNGP use SIZES, the NTK NTK_SIZES ((0, 0):
# not computed). Limit kernels cost O((N_train + N_test)²) pairs. The CNN's kernels go
# through the batched recursion over position pairs (kernels/recursion.py): NNGP+NTK of
# 700 inputs in 1.5–3 s on the idle machine. The GRU (4 steps) is a Monte Carlo expectation
# per pair: its NNGP took 13 s for 40 inputs and its NTK 49 s for 20 (idle).
SIZES = {"MLP": (2000, 1000), "CNN": (1000, 500), "GRU": (80, 40)}
NTK_SIZES = {
    "MNIST-1D": {"MLP": (1000, 500), "CNN": (1000, 500), "GRU": (0, 0)},
    "digits": {"MLP": (1000, 500), "CNN": (1000, 500), "GRU": (0, 0)},
}
WIDTHS = {"MLP": (32, 128, 512), "CNN": (16, 64, 256), "GRU": (16, 64, 128)}
CONVERGENCE_WIDTHS = (64, 256, 1024)


def specs(dataset: str, d: int, classes: int, convergence: bool) -> list[ModelSpec]:
    out = []
    for name in ("MLP", "CNN", "GRU"):
        n_train, n_test = SIZES[name]
        out.append(ModelSpec(name, factory(name, d, classes), WIDTHS[name], n_train, n_test,
                             CONVERGENCE_WIDTHS if convergence and name == "MLP" else (),
                             ntk_sizes=NTK_SIZES[dataset][name]))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tensorprograms.demo", description=__doc__)
    parser.add_argument("--out", default="out/report", help="output folder (default out/report)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--fl-seeds", type=int, default=FLConfig.seeds,
                        help=f"seeds of the feature-learning section (default {FLConfig.seeds}; 0 skips it)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    m1d, dig = mnist1d(), digits()
    sections = []
    if args.fl_seeds > 0:
        sections.append(("feature learning (μP limit, transfer)",
                         report_section([m1d, dig], FLConfig(seeds=args.fl_seeds))))
    run([(m1d, specs("MNIST-1D", m1d.d, m1d.classes, convergence=True)),
         (dig, specs("digits", dig.d, dig.classes, convergence=False))], args.out,
        train=TrainConfig(), sections=sections, notes=[
            "MNIST-1D: `mnist1d.data.make_dataset` with its default arguments (seed 42; 4000 train / 1000 "
            "test examples of length 40), subsampled as stated; digits: scikit-learn's `load_digits` "
            "(8×8 images scaled to [0, 1]), seeded 70/30 split, subsampled as stated.",
            "The paper's numbers train on all 4000 MNIST-1D examples; the rows here use the stated "
            "subsamples, so they are lower.",
        ])


if __name__ == "__main__":
    main()
