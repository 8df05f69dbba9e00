"""The main job: finite-width networks trained by SGD vs their NNGP/NTK limits on real
data, and the finite-width kernels' convergence; writes a Markdown report with PNG plots.

``run(config)`` does everything for a list of (dataset, model) pairs; ``tensorprograms
report`` (cli.py) and ``python -m tensorprograms.demo`` call it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .data import Dataset
from .pieces import (
    Convergence,
    Factory,
    LimitResult,
    TrainConfig,
    build_limit,
    kernel_convergence,
    limit_accuracy,
    train_finite,
)

# Test accuracies reported in the MNIST-1D paper (Greydanus 2020, Table 1).
PAPER_MNIST1D = {"logistic regression": 0.32, "MLP": 0.68, "CNN": 0.94, "GRU": 0.91}


@dataclass
class ModelSpec:
    """One model on one data set: its factory, finite widths, and the subsample sizes."""

    name: str
    factory: Factory
    widths: Sequence[int]
    n_train: int
    n_test: int
    convergence_widths: Sequence[int] = ()
    ntk_sizes: tuple[int, int] | None = None  # (train, test) for the NTK; None: as the NNGP; (0, 0): skip


@dataclass
class Row:
    dataset: str
    model: str
    n_train: int
    n_test: int
    finite: dict[int, float] = field(default_factory=dict)
    limit: LimitResult | None = None
    paper: float | None = None
    convergence: Convergence | str | None = None
    seconds: float = 0.0
    cpu_seconds: float = 0.0


def _pct(a: float | None) -> str:
    return "—" if a is None else f"{100 * a:.1f}%"


def logistic_baseline(data: Dataset) -> float:
    """Multinomial logistic regression (scikit-learn, default settings) test accuracy."""
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(max_iter=2000).fit(data.x_train.numpy(), data.y_train.numpy())
    return float(clf.score(data.x_test.numpy(), data.y_test.numpy()))


def evaluate(data: Dataset, spec: ModelSpec, train: TrainConfig, noise: float,
             convergence_inputs: int, progress: bool = True) -> Row:
    """One table row: SGD at each width, the limits, and (optionally) kernel convergence."""
    start, cpu = time.perf_counter(), time.process_time()
    sub = data.subsample(spec.n_train, spec.n_test)
    row = Row(data.name, spec.name, spec.n_train, spec.n_test,
              paper=PAPER_MNIST1D.get(spec.name) if data.name == "MNIST-1D" else None)
    for w in spec.widths:
        row.finite[w] = train_finite(spec.factory, w, sub, train, progress=progress)
    ntk_sub = sub if spec.ntk_sizes is None else sub.subsample(*spec.ntk_sizes)
    lim, reason = build_limit(spec.factory, sub.x_train)
    if lim is None:
        row.limit = LimitResult(reason=reason, n_train=spec.n_train, n_test=spec.n_test)
        row.convergence = reason if spec.convergence_widths else None
    else:
        row.limit = limit_accuracy(spec.factory, sub, noise=noise, ntk_data=ntk_sub, limit=lim,
                                   progress=progress)
        if spec.convergence_widths:
            row.convergence = kernel_convergence(spec.factory, sub.x_test[:convergence_inputs],
                                                 spec.convergence_widths, progress=progress, limit=lim)
    row.seconds, row.cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
    return row


def table(rows: Sequence[Row], baselines: dict[str, tuple[int, int, float]]) -> str:
    """The Markdown accuracy table (also printed)."""
    lines = ["| data | model | train / test | finite width: test accuracy (SGD) | NNGP limit | NTK limit "
             "| MNIST-1D paper |", "|---|---|---|---|---|---|---|"]
    for name, (ntr, nte, acc) in baselines.items():
        paper = _pct(PAPER_MNIST1D["logistic regression"]) if name == "MNIST-1D" else "—"
        lines.append(f"| {name} | logistic regression | {ntr} / {nte} | {_pct(acc)} (no width) | — | — "
                     f"| {paper} |")
    for r in rows:
        finite = ", ".join(f"{w}: {_pct(a)}" for w, a in r.finite.items())
        lim = r.limit
        if lim is not None and lim.reason is not None:
            nngp = ntk = f"unsupported ({lim.reason})"
        else:
            nngp, ntk = _pct(lim.nngp if lim else None), _pct(lim.ntk if lim else None)
            if lim is not None and (lim.ntk_n_train, lim.ntk_n_test) != (lim.n_train, lim.n_test):
                ntk = (f"{ntk} ({lim.ntk_n_train} / {lim.ntk_n_test})" if lim.ntk_n_train
                       else "not computed (cost)")
        lines.append(f"| {r.dataset} | {r.model} | {r.n_train} / {r.n_test} | {finite} | {nngp} | {ntk} "
                     f"| {_pct(r.paper)} |")
    return "\n".join(lines)


def _plots(rows: Sequence[Row], out: Path) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - optional extra
        return []
    files = []
    datasets = list(dict.fromkeys(r.dataset for r in rows))
    fig, axes = plt.subplots(1, len(datasets), figsize=(5.5 * len(datasets), 4), squeeze=False)
    for ax, ds in zip(axes[0], datasets):
        for i, r in enumerate(x for x in rows if x.dataset == ds):
            color = f"C{i}"
            ws = list(r.finite)
            ax.plot(ws, [100 * r.finite[w] for w in ws], "o-", color=color, label=f"{r.model} (SGD)")
            if r.limit is not None and r.limit.reason is None:
                ax.axhline(100 * r.limit.nngp, color=color, ls="--", lw=1, label=f"{r.model} NNGP")
                if r.limit.ntk is not None:
                    own = (r.limit.ntk_n_train, r.limit.ntk_n_test) != (r.limit.n_train, r.limit.n_test)
                    size = f" ({r.limit.ntk_n_train}/{r.limit.ntk_n_test})" if own else ""
                    ax.axhline(100 * r.limit.ntk, color=color, ls=":", lw=1.5, label=f"{r.model} NTK{size}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("width")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"{ds}: finite width vs limits")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "accuracy.png", dpi=120)
    plt.close(fig)
    files.append("accuracy.png")
    conv = [r for r in rows if isinstance(r.convergence, Convergence)]
    if conv:
        fig, ax = plt.subplots(figsize=(6, 4))
        for i, r in enumerate(conv):
            c = r.convergence
            ax.loglog(c.widths, c.ntk, "o-", color=f"C{i}", label=f"{r.dataset} {r.model}: NTK")
            ax.loglog(c.widths, c.nngp, "s--", color=f"C{i}", label=f"{r.dataset} {r.model}: NNGP (MC)")
        w = conv[0].convergence.widths
        ref = conv[0].convergence.ntk[0]
        ax.loglog(w, [ref * math.sqrt(w[0] / x) for x in w], "k:", label="∝ width^-1/2")
        ax.set_xlabel("width")
        ax.set_ylabel("‖K_width − K_∞‖ / ‖K_∞‖")
        ax.set_title("finite-width kernels → limit")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "convergence.png", dpi=120)
        plt.close(fig)
        files.append("convergence.png")
    return files


def write_report(rows: Sequence[Row], baselines, out: Path, train: TrainConfig, noise: float,
                 seconds: float, notes: Sequence[str] = (),
                 extra: Sequence[tuple[str, str, float, float]] = ()) -> str:
    """Write ``out/report.md`` (+ PNGs); returns the table. ``extra``: further sections
    ``(title, markdown, wall seconds, CPU seconds)``, placed before the timings."""
    out.mkdir(parents=True, exist_ok=True)
    tab = table(rows, baselines)
    plots = _plots(rows, out)
    md = ["# Finite width vs the infinite-width limits", "",
          f"Total time {seconds:.0f} s wall, {time.process_time():.0f} s CPU in this process "
          f"(torch threads: {torch.get_num_threads()}).", "",
          "Finite networks: minibatch SGD on cross-entropy (momentum "
          f"{train.momentum}, lr {train.lr}, batch {train.batch_size}, {train.epochs} epochs, "
          "one seed; PyTorch's default initialization except the GRU's, stated in "
          "`tensorprograms/job/models.py`). Limits: one-hot regression on the same training subsample "
          "— the NNGP's GP posterior mean and the NTK's gradient flow to convergence (t = ∞, i.e. NTK "
          f"kernel regression), noise/ridge {noise} — predicting the argmax. `train / test` are the "
          "subsample sizes (kernel costs grow with the number of input pairs, and for CNNs with position "
          "pairs).", "", tab, ""]
    md += [f"- {n}" for n in notes]
    if any(r.limit is not None and r.limit.reason for r in rows):
        md += ["- A limit marked *unsupported* is one the frontend cannot build yet "
               "(`tp.UnsupportedOperation` names the op).", ""]
    if "accuracy.png" in plots:
        md += ["", "![accuracy vs width](accuracy.png)", ""]
    conv = [r for r in rows if r.convergence is not None]
    if conv:
        md += ["## Finite-width kernels vs the limit", "",
               "Relative Frobenius distance on test inputs: NTK = mean empirical NTK (NTK parametrization) "
               "of a few networks, which approaches the limit like width^-1/2; NNGP = Monte Carlo mean "
               "over initializations (its error also contains the Monte Carlo error).", "",
               "| data | model | width | NNGP rel. error | NTK rel. error |", "|---|---|---|---|---|"]
        for r in conv:
            if isinstance(r.convergence, str):
                md.append(f"| {r.dataset} | {r.model} | — | unsupported ({r.convergence}) | |")
                continue
            c = r.convergence
            for w, a, b in zip(c.widths, c.nngp, c.ntk):
                md.append(f"| {r.dataset} | {r.model} | {w} | {a:.4f} ({c.samples_nngp} inits) "
                          f"| {b:.4f} ({c.samples_ntk} nets) |")
        if "convergence.png" in plots:
            md += ["", "![kernel convergence](convergence.png)"]
    for _, text, _, _ in extra:
        md += ["", text]
    md += ["", "## Time per row", "", "CPU seconds count all threads; on a shared machine wall time "
           "also includes waiting for cores.", "", "| data | model | wall s | CPU s |", "|---|---|---|---|"]
    md += [f"| {r.dataset} | {r.model} | {r.seconds:.0f} | {r.cpu_seconds:.0f} |" for r in rows]
    md += [f"| {title} | | {sec:.0f} | {cpu:.0f} |" for title, _, sec, cpu in extra]
    (out / "report.md").write_text("\n".join(md) + "\n")
    return tab


def run(jobs: Sequence[tuple[Dataset, Sequence[ModelSpec]]], out: str | Path,
        train: TrainConfig | None = None,
        noise: float = 1e-6, convergence_inputs: int = 8, progress: bool = True,
        baseline: bool = True, notes: Sequence[str] = (),
        sections: Sequence[tuple[str, Callable[[Path, bool], str]]] = ()) -> tuple[list[Row], str]:
    """Evaluate every (data set, model) pair, write the report to ``out``, print the table.

    ``sections``: ``(title, fn)`` pairs run after the rows; ``fn(out, progress)`` returns a
    Markdown section for the report (it may write plots into ``out``)."""
    train = train or TrainConfig()
    start = time.perf_counter()
    rows, baselines = [], {}
    total = sum(len(specs) for _, specs in jobs)
    bar = tqdm(total=total, desc="main job", disable=not progress)
    for data, specs in jobs:
        if baseline and specs:
            sub = data.subsample(specs[0].n_train, specs[0].n_test)
            baselines[data.name] = (specs[0].n_train, specs[0].n_test, logistic_baseline(sub))
        for spec in specs:
            bar.set_postfix_str(f"{data.name} {spec.name}")
            rows.append(evaluate(data, spec, train, noise, convergence_inputs, progress))
            bar.update(1)
    bar.close()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    extra = []
    for title, fn in sections:
        t0, c0 = time.perf_counter(), time.process_time()
        text = fn(out, progress)
        extra.append((title, text, time.perf_counter() - t0, time.process_time() - c0))
    tab = write_report(rows, baselines, out, train, noise, time.perf_counter() - start, notes, extra)
    print(tab)
    print(f"\nreport: {out / 'report.md'}")
    return rows, tab
