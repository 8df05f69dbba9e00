"""Finite-width Jacobian spectra of the real PyTorch model, to compare with the limit law.

For each width n and seed s the model is ``factory(n)`` built under
``torch.manual_seed(seed + s)`` (the user's own initialization), run in float64 on the one
input x. The hidden-to-hidden Jacobian ``∂x_end/∂x_start`` (n × n) is computed exactly with
``torch.func.jacfwd``: the exported graph is interpreted with a perturbation δ added to the
start layer's output, and differentiated at δ = 0. Its squared singular values are the
spectrum; moments ``(1/n) tr (JᵀJ)^k`` are averaged over seeds with their standard error
(across seeds: eigenvalues of one matrix are dependent).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import fx
from tqdm.auto import tqdm

from ..factory import build
from ..frontend.capture import _export
from .jacobian import JacobianLaw, _one_input, jacobian_spectrum
from .laws import SpectralLaw

_ROUNDING = 64 * float(np.finfo(np.float64).eps)


@dataclass
class EmpiricalSpectrum:
    """Squared singular values of finite-width Jacobians at one width.

    Attributes:
        width: n.
        eigenvalues: ``[seeds, n]`` float64 numpy array, one row per network.
    """

    width: int
    eigenvalues: np.ndarray

    @property
    def floor(self) -> float:
        """The rounding level of the eigenvalues, ``64·eps·n·λ_max``: below it an
        eigenvalue of JJᵀ is not resolved (ReLU's exact zeros come out ~1e-15, and laws
        with mass near 0, e.g. erf at large σ_w², have eigenvalues ~1e-20)."""
        return _ROUNDING * self.width * float(self.eigenvalues.max())

    @property
    def seeds(self) -> int:
        return self.eigenvalues.shape[0]

    def moment(self, k: int) -> tuple[float, float]:
        """``(mean, stderr)`` over seeds of ``(1/n) Σ λ^k``."""
        per_seed = (self.eigenvalues**k).mean(axis=1)
        se = per_seed.std(ddof=1) / np.sqrt(self.seeds) if self.seeds > 1 else float("nan")
        return float(per_seed.mean()), float(se)

    def ks(self, law: SpectralLaw) -> float:
        """Kolmogorov–Smirnov distance between the pooled eigenvalues and ``law``, censored
        at :attr:`floor`: eigenvalues below it count as "≤ floor", and both CDFs are
        compared at the floor and above (the law's own atom at 0 included in F(floor))."""
        floor = self.floor
        lam = np.sort(np.maximum(self.eigenvalues.reshape(-1), floor))
        m = len(lam)
        F = law.cdf(lam)  # F(λ), the atom included where λ is at it
        F_left = F - law.atom[1] * (lam == law.atom[0])  # F(λ⁻)
        F_left = np.where(lam == floor, 0.0, F_left)  # the censored block starts at 0
        upper = np.searchsorted(lam, lam, side="right") / m  # F_n(λ), ties counted
        lower = np.searchsorted(lam, lam, side="left") / m  # F_n(λ⁻)
        return float(max(np.abs(upper - F).max(), np.abs(lower - F_left).max()))


class _Perturbed(fx.Interpreter):
    def __init__(self, gm, start: str, end: str, delta: torch.Tensor):
        super().__init__(gm)
        self.start, self.end, self.delta = start, end, delta
        self.captured = None

    def run_node(self, n):
        out = super().run_node(n)
        if n.name == self.start:
            out = out + self.delta
        if n.name == self.end:
            self.captured = out
        return out


def _jacobian(gm: fx.GraphModule, x: torch.Tensor, start: str, end: str) -> torch.Tensor:
    def f(delta):
        interp = _Perturbed(gm, start, end, delta)
        interp.run(x)
        return interp.captured

    start_shape = _value_shape(gm, x, start)
    n_in = int(np.prod(start_shape))
    J = torch.func.jacfwd(f)(torch.zeros(start_shape, dtype=torch.float64))
    return J.reshape(-1, n_in)


def _value_shape(gm, x, name: str) -> tuple[int, ...]:
    class Probe(fx.Interpreter):
        value = None

        def run_node(self, n):
            out = super().run_node(n)
            if n.name == name:
                Probe.value = out
            return out

    with torch.no_grad():
        Probe(gm).run(x)
    return tuple(Probe.value.shape)


@dataclass
class MomentLimit:
    """The n → ∞ limit of a finite-width moment, from :func:`extrapolate_moment`.

    Attributes:
        k: the moment's order.
        limit, stderr: the fitted ``a`` of ``m_k(n) = a + b/n`` and its standard error.
        slope: the fitted ``b`` (the O(1/n) bias at width n is ``b/n``).
        chi2, dof: goodness of fit, ``Σ_n (m̂_n − a − b/n)²/se_n²`` on ``#widths − 2`` degrees.
        stderr_dof: the Welch–Satterthwaite degrees of freedom of ``stderr`` (each width's
            standard error is estimated from its seeds): compare ``(limit − m_k)/stderr`` with
            Student's t on that many degrees, not a normal.
    """

    k: int
    limit: float
    stderr: float
    slope: float
    chi2: float
    dof: int
    stderr_dof: float


def extrapolate_moment(spectra: Sequence[EmpiricalSpectrum], k: int) -> MomentLimit:
    """``m_k(n) = a + b/n`` fitted by weighted least squares (weights ``1/se_n²``) to the
    seed-averaged moments at three or more widths.

    A finite-width moment ``(1/n) tr (JᵀJ)^k`` has an O(1/n) bias, while its standard error
    over s seeds falls only like ``1/√(n s)`` (roughly: the D's are n samples of φ'(h)), so a
    comparison at one width is off by ~√(s/n) standard errors, more with more seeds. The
    intercept ``a`` has no O(1/n) bias, and its standard error comes from the widths'."""
    if len(spectra) < 3:
        raise ValueError(f"extrapolate_moment needs at least 3 widths (2 parameters and a check), "
                         f"got {len(spectra)}")
    if any(sp.seeds < 2 for sp in spectra):
        raise ValueError("extrapolate_moment needs at least 2 seeds per width for standard errors")
    n = np.array([sp.width for sp in spectra], dtype=float)
    m, se = np.array([sp.moment(k) for sp in spectra]).T
    X = np.stack([np.ones_like(n), 1.0 / n], 1)
    w = 1.0 / se**2
    cov = np.linalg.inv(X.T @ (w[:, None] * X))
    coef = cov @ X.T @ (w * m)
    c = (cov @ X.T * w)[0]  # a = Σ_n c_n m̂_n
    parts = (c * se) ** 2
    dof_n = np.array([sp.seeds - 1 for sp in spectra], dtype=float)
    chi2 = float(np.sum(w * (m - X @ coef) ** 2))
    return MomentLimit(k, float(coef[0]), float(np.sqrt(cov[0, 0])), float(coef[1]), chi2, len(n) - 2,
                       float(parts.sum() ** 2 / np.sum(parts**2 / dof_n)))


def empirical(
    factory: Callable[[int], torch.nn.Module],
    x: torch.Tensor,
    widths: Sequence[int],
    seeds: int | Sequence[int] = 8,
    start: int = 0,
    end: int | None = None,
    law: JacobianLaw | None = None,
    seed: int = 0,
    progress: bool = True,
) -> list[EmpiricalSpectrum]:
    """Squared singular values of the finite-width Jacobians ``∂x_end/∂x_start`` at input x.

    Args:
        factory, x, start, end: as for :func:`jacobian_spectrum` (layers are located in the
            same lowered program, so the limit and the finite-width spectra are of the same
            matrix).
        widths: the widths n; seeds: networks per width (built with seeds seed … seed+seeds−1),
            one number for all widths or one per width (more at small widths is cheap).
        law: a law already computed for this factory/x/start/end (saves a capture).

    Returns:
        One :class:`EmpiricalSpectrum` per width.
    """
    x = _one_input(x)
    if not widths or any((not isinstance(n, int)) or n < 2 for n in widths):
        raise ValueError(f"widths must be a non-empty list of integers >= 2, got {widths!r}")
    per_width = [seeds] * len(widths) if isinstance(seeds, int) else list(seeds)
    if len(per_width) != len(widths) or any((not isinstance(s, int)) or s < 1 for s in per_width):
        raise ValueError(f"seeds must be a positive integer or one per width ({len(widths)}), got {seeds!r}")
    law = law if law is not None else jacobian_spectrum(factory, x, start, end)
    out = []
    bar = tqdm(total=sum(per_width), desc="Jacobian spectra", disable=not progress)
    for n, seeds in zip(widths, per_width, strict=True):
        model = build(factory, n, seed).to(torch.float64).eval()
        gm = _export(model, (x,)).module()  # core ATen, as the frontend lowered it (same node names)
        start_name, end_name = law.node_names
        rows = []
        for s in range(seeds):
            m = build(factory, n, seed + s).to(torch.float64)
            gm.load_state_dict(m.state_dict(), strict=False)
            J = _jacobian(gm, x, start_name, end_name)
            J = J.detach()
            # eigenvalues of JJᵀ (a symmetric eigenproblem: several times faster than an SVD;
            # absolute error ~n·eps·‖J‖²)
            rows.append(torch.linalg.eigvalsh(J @ J.T).clamp_min(0.0).numpy())
            bar.update()
        out.append(EmpiricalSpectrum(n, np.stack(rows)))
    bar.close()
    return out


def plot_spectrum(law: SpectralLaw, spectra: Sequence[EmpiricalSpectrum], path: str | None = None,
                  bins: int = 60, title: str | None = None, log: bool = True):
    """The limit density over the finite-width histograms (one panel per width).

    ``log=True`` (default; Jacobian laws spread over decades) shows the density of
    ``log10 λ``, ``ln(10)·λ·ρ(λ)``, over histograms of ``log10 λ``; ``log=False`` shows ρ(λ).
    An atom (ReLU's mass at 0) is left out of both: histograms count the eigenvalues above
    the rounding floor and are scaled to the fraction of all eigenvalues they hold. Needs
    matplotlib (the optional extra ``plot``). Returns the figure; saved to ``path`` if given."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("plot_spectrum needs matplotlib: pip install 'tensorprograms[plot]'") from exc
    fig, axes = plt.subplots(1, len(spectra), figsize=(4 * len(spectra), 3.4), squeeze=False)
    lo, hi = law.support()
    for ax, sp in zip(axes[0], spectra):
        lam = sp.eigenvalues.reshape(-1)
        keep = lam[lam > max(sp.floor, 1e-300)]
        if log:
            values = np.log10(keep)
            grid_u = np.linspace(max(values.min(), np.log10(hi) - 16), np.log10(hi), 600)[:-1]
            grid_x = 10**grid_u
            curve = np.log(10) * grid_x * law.density(grid_x)
            label_x = "log10 squared singular value"
        else:
            values = keep
            grid_u = grid_x = np.linspace(lo, hi, 600)[1:-1]
            curve = law.density(grid_x)
            label_x = "squared singular value"
        counts, edges = np.histogram(values, bins=bins)
        widths = np.diff(edges)
        heights = counts / (len(lam) * widths)
        ax.bar(edges[:-1], heights, width=widths, align="edge", alpha=0.45,
               label=f"n = {sp.width}, {sp.seeds} nets")
        ax.plot(grid_u, curve, "k", lw=1.5, label="limit")
        ax.set_xlabel(label_x)
        ax.set_ylim(0, 1.15 * max(curve.max(), heights.max()))
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("density")
    fig.suptitle(title or law.name)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=130)
    return fig
