"""The main job's feature-learning section alone (μP limit vs NNGP/NTK limits, finite μP
nets, transfer task), with every size an option.

    PYTHONPATH=src python examples/feature_learning_job.py --out out/feature_learning_job

Writes ``report.md``, ``feature_learning.json`` and ``feature_learning.png`` into ``--out``;
the defaults are those of ``make demo`` (``tensorprograms.job.feature_learning.FLConfig``).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import fields
from pathlib import Path

import torch

from tensorprograms.job.data import digits, mnist1d
from tensorprograms.job.feature_learning import FLConfig
from tensorprograms.job.fl_report import report_section


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", nargs="+", default=["mnist1d", "digits"], choices=["mnist1d", "digits"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("out/feature_learning_job"))
    for f in fields(FLConfig):
        default = getattr(FLConfig, f.name)
        if isinstance(default, tuple):
            ap.add_argument("--" + f.name.replace("_", "-"), type=type(default[0]), nargs="+",
                            default=default)
        else:
            ap.add_argument("--" + f.name.replace("_", "-"), type=type(default), default=default)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    cfg = FLConfig(**{f.name: (tuple(v) if isinstance(v := getattr(a, f.name), list) else v)
                      for f in fields(FLConfig)})
    data = [{"mnist1d": mnist1d, "digits": digits}[name]() for name in a.data]
    a.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    text = report_section(data, cfg)(a.out, True)
    (a.out / "report.md").write_text(f"{text}\nTotal {time.perf_counter() - start:.0f} s wall.\n")


if __name__ == "__main__":
    main()
