"""Markdown and plot for the main job's feature-learning part (:mod:`.feature_learning`)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import torch

from .data import Dataset
from .feature_learning import FLConfig, FLResult, compare, mean_se


def _ms(values: Sequence[float]) -> str:
    if any(v != v for v in values):
        return f"diverged in {sum(v != v for v in values)} of {len(values)} seeds"
    m, se = mean_se(values)
    return f"{100 * m:.1f} ± {100 * se:.1f}%"


def _cells(columns: Sequence[Sequence[float]], compare: int = 3) -> str:
    """Table cells ``mean ± s.e.``; the best mean among the first ``compare`` columns (the
    three limits) in bold."""
    means = [mean_se(v)[0] for v in columns[:compare]]
    best = max(range(len(means)), key=lambda i: means[i] if means[i] == means[i] else -1.0)
    return " | ".join(f"**{_ms(v)}**" if i == best else _ms(v) for i, v in enumerate(columns))


def paired(a: Sequence[float], b: Sequence[float]) -> str:
    """``a − b`` per seed (same subsample, batches and test set), mean ± s.e., in points."""
    m, se = mean_se([x - y for x, y in zip(a, b)])
    return f"{100 * m:+.1f} ± {100 * se:.1f}"


def _plot(results: Sequence[FLResult], out: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - optional extra
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, what in zip(axes, ("main", "transfer")):
        for i, r in enumerate(results):
            if what == "main":
                items = list(r.accuracy.items())
                labels = [k for k, _ in items]
            else:
                b = max(r.config.readout_budgets)
                items = [(k, v) for (k, bb), v in r.transfer.accuracy.items() if bb == b]
                labels = [k for k, _ in items]
            ms = [mean_se(v) for _, v in items]
            xs = [j + 0.38 * i for j in range(len(items))]
            ax.bar(xs, [100 * m for m, _ in ms], width=0.36, yerr=[100 * s for _, s in ms], capsize=3,
                   label=r.dataset, color=f"C{i}")
            ax.set_xticks([j + 0.19 for j in range(len(items))], labels, fontsize=8)
        lo = min(100 * mean_se(v)[0] for r in results for v in
                 (r.accuracy.values() if what == "main" else r.transfer.accuracy.values()))
        ax.set_ylim(max(0.0, lo - 10), 100)
        ax.set_ylabel("test accuracy (%), mean ± s.e. over seeds")
        ax.set_title("μP limit vs kernel limits" if what == "main" else
                     "transfer: readout on new classes (largest budget)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "feature_learning.png", dpi=120)
    plt.close(fig)
    return "feature_learning.png"


def section(results: Sequence[FLResult], out: Path) -> str:
    """The report's Markdown section (writes ``feature_learning.png`` into ``out``)."""
    cfg = results[0].config
    widths = ", ".join(str(w) for w in cfg.finite_widths)
    md = ["## Feature learning: the μP limit vs the NNGP and NTK limits", "",
          f"MLP `d → n → classes`, one hidden ReLU layer, PyTorch's default init. Per seed ({cfg.seeds} "
          f"seeds): {cfg.n_train} training and {cfg.n_val} validation examples drawn from a fixed pool of "
          f"{cfg.pool} training examples (raw inputs, as above); the same test examples for every seed "
          "and method. **NNGP / NTK**: kernel ridge regression on one-hot targets (GP posterior mean; NTK "
          "gradient flow to t = ∞), ridge (× mean diag K) chosen on the validation set from "
          f"{list(cfg.ridges)}. "
          f"**μP limit**: the infinite-width limit of the μP network (base width {cfg.base_width}) trained "
          f"by plain SGD on cross-entropy, {cfg.epochs} epochs of batches of {cfg.batch}, "
          f"M = {cfg.particles} particles (`limit.trainer(method='particles')`), the learning rate "
          f"chosen on seed 0's validation set from {list(cfg.lrs)} and kept for all seeds. "
          "**finite μP n**: `tp.mup.parametrize` + "
          f"`tp.mup.SGD` at widths {widths}, same lr, batches and epochs, seed = the seed, readout bias "
          "zeroed (as the limit). Accuracies are mean ± standard error over the seeds; the seeds vary the "
          "training subsample, the batch order, the particles and the finite nets' init. Bold: the best "
          "of the three limits.", "",
          "| data | train / val / test | seeds | NNGP limit | NTK limit | μP limit | "
          + " | ".join(f"finite μP {w}" for w in cfg.finite_widths) + " | μP lr (val acc per lr) |",
          "|---|---|---|---|---|---|" + "---|" * len(cfg.finite_widths) + "---|"]
    for r in results:
        lrs = ", ".join(f"{lr:g}: {'diverged' if v != v else f'{100 * v:.1f}%'}"
                        for lr, v in r.lr_val.items())
        md.append(f"| {r.dataset} | {r.n_train} / {r.n_val} / {r.n_test} | {cfg.seeds} "
                  "| " + _cells([r.accuracy[k] for k in ("nngp", "ntk", "mup")]
                                + [r.accuracy[f"finite {w}"] for w in cfg.finite_widths])
                  + f" | {r.lr:g} ({lrs}) |")
    md += ["", "Paired differences, μP limit − kernel, per seed then mean ± s.e. (points): " + "; ".join(
        f"{r.dataset}: − NNGP {paired(r.accuracy['mup'], r.accuracy['nngp'])}, − NTK "
        f"{paired(r.accuracy['mup'], r.accuracy['ntk'])}" for r in results) + "."]
    md += ["", "Cost (wall seconds on the job's machine, all seeds together):", "",
           "| data | limit kernels (NNGP+NTK, once on pool ∪ test) | μP limit: M, steps per run, s per run "
           "| lr search (other lrs) | finite μP nets (all widths) |", "|---|---|---|---|---|"]
    for r in results:
        s = r.seconds
        md.append(f"| {r.dataset} | {s['kernels']:.0f} s ({r.kernel_points} points) | M = {cfg.particles}, "
                  f"{r.steps} steps, {s['mup'] / cfg.seeds:.1f} s | {s.get('lr search', 0):.0f} s "
                  f"| {s['finite']:.0f} s |")
    b_all = cfg.readout_budgets
    width = max(cfg.finite_widths)
    md += ["", f"### Transfer: pretrain on classes 0–{cfg.split_class - 1}, linear readout on the others",
           "",
        f"Pretraining (per seed): {cfg.pretrain} pool examples of classes < {cfg.split_class}, the MLP with "
        f"{cfg.split_class} outputs, its μP limit and a finite μP net of width {width} trained as above "
        "(same lr). Readout: kernel ridge regression on one-hot targets of the new classes (= a linear "
        "readout on the features) with the stated number of labelled examples of the new classes, ridge "
        f"chosen on {cfg.readout_val} other new-class examples; test: the test examples of the new "
        "classes. "
        "Kernels: the μP limit's last-hidden-layer feature kernel E[x(ξ)x(ξ')] after pretraining "
        "(particles), the finite net's φ(h)·φ(h')/n after pretraining, and the NNGP and NTK of the same MLP "
        "(features that do not move; the NNGP is the feature kernel at init up to a constant).", "",
        "| data | readout examples | test | NNGP limit | NTK limit | μP limit features "
        f"| finite μP {width} features |", "|---|---|---|---|---|---|---|"]
    for r in results:
        t = r.transfer
        for b in b_all:
            cols = [t.accuracy[(k, b)] for k in ("nngp", "ntk", "mup", f"finite {width}")]
            md.append(f"| {r.dataset} | {b} | {t.n_test} | " + _cells(cols) + " |")
    tr = [(r.dataset, b, r.transfer.accuracy) for r in results for b in b_all]
    md += ["", "Paired differences, μP limit features − kernel (points): " + "; ".join(
        f"{ds}, {b} examples: − NNGP {paired(acc[('mup', b)], acc[('nngp', b)])}, "
        f"− NTK {paired(acc[('mup', b)], acc[('ntk', b)])}" for ds, b, acc in tr) + "."]
    md += ["", "Transfer cost: " + "; ".join(
        f"{r.dataset}: μP limit pretraining {r.transfer.seconds['mup'] / cfg.seeds:.1f} s per seed "
        f"(M = {cfg.particles}, {r.transfer.steps} steps), finite net {r.transfer.seconds['finite']:.0f} s "
        "in all" for r in results) + " (kernels reused from above).", ""]
    md += ["Reproduce a row alone: `python examples/feature_learning_job.py` (same code, "
           "`--seeds`, `--particles` and the other sizes as options); method and caveats in "
           "docs/feature-learning.md.", ""]
    plot = _plot(results, out)
    if plot:
        md += [f"![feature learning]({plot})", ""]
    if any(math.isnan(v) for r in results for v in r.accuracy["mup"]):
        md += ["Some μP limit runs diverged (TrainingDiverged) and count as failures above.", ""]
    return "\n".join(md)


def to_json(results: Sequence[FLResult]) -> list[dict]:
    """Plain-data form of the results (per-seed accuracies, choices, seconds)."""
    out = []
    for r in results:
        t = r.transfer
        out.append({
            "dataset": r.dataset, "config": asdict(r.config), "n_train": r.n_train, "n_val": r.n_val,
            "n_test": r.n_test, "accuracy": r.accuracy, "ridges": r.ridges, "lr": r.lr,
            "lr_val": {str(k): v for k, v in r.lr_val.items()}, "steps": r.steps, "seconds": r.seconds,
            "transfer": {"accuracy": {f"{k} / {b} examples": v for (k, b), v in t.accuracy.items()},
                         "n_test": t.n_test, "steps": t.steps, "seconds": t.seconds, "diverged": t.diverged},
        })
    return out


def report_section(datasets: Sequence[Dataset], config: FLConfig | None = None):
    """A ``sections`` entry for :func:`.report.run`: runs :func:`.feature_learning.compare`
    on each data set, writes ``feature_learning.json`` and returns the Markdown."""

    def fn(out: Path, progress: bool) -> str:
        # One torch thread: the particle updates are small products (M × batch) that a second
        # thread hardly speeds up, and on a busy machine its waiting made the section several
        # times slower (measured on the shared 2-core machine at load ~7: with 2 threads, 7
        # CPU-minutes without finishing MNIST-1D; with 1 thread, both data sets in 2 CPU-minutes).
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            results = [compare(d, config, progress=progress) for d in datasets]
        finally:
            torch.set_num_threads(threads)
        (out / "feature_learning.json").write_text(json.dumps(to_json(results), indent=1))
        text = section(results, out)
        print(text)
        return text

    return fn
