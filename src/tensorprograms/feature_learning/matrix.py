"""One width × width weight matrix ``W_t = W_0 - (η/n) Σ_s dh_s x_sᵀ`` in the limit.

TP IV's Netsor⊤ rule for the initial matrix ``W_0`` (entries ``N(0, σ²/n)``):
``Z^{W_0 x} = Ẑ^{W_0 x} + Ż^{W_0 x}``. The Ẑ's of forward uses are jointly Gaussian with
``Cov = σ² E[x x']``, independent of everything else, and those of transposed uses
likewise with ``E[u u']``; ``Ż^{W_0 x} = σ² Σ_u Z^u E[∂Z^x / ∂Ẑ^{W_0ᵀ u}]`` over the
transposed uses ``u`` so far, and symmetrically for ``Ż^{W_0ᵀ u}``.

Representation. The vectors ever multiplied forward span a space with an orthonormal
basis ``q_1…q_K`` (in ``E[· ·]``, built by Gram–Schmidt as they arrive); ``Ẑ^{W_0 q_j} =
σ g_j`` with ``g_j`` independent standard Gaussians. By linearity of ``x ↦ Ẑ^{W_0 x}``,
``Ẑ^{W_0 x} = σ Σ_j E[x q_j] g_j + σ |x_⊥| g_new``, which has exactly the covariance
above, and the new direction joins the basis. The same for transposed uses with
``p_j, g'_j``. In this basis ``Ż^{W_0 x} = σ Σ_j p_j E[∂Z^x/∂g'_j] = σ Σ_j p_j E[g'_j Z^x]``
(Stein's lemma: ``g'_j`` is standard normal and independent of every other random
variable, so the identity is exact; with particles the average is the estimate).

The SGD updates are kept as a history ``X = Q R`` (inputs ``x^{l-1}_s``) and ``D = P R'``
(``η`` times the scaled backward vectors ``n·dh_s``), so that
``(W_t - W_0) y = -D E[X y]`` and ``(W_t - W_0)ᵀ u = -X E[D u]``, with ``s < t``.
"""

from __future__ import annotations

import torch

from .space import DT

_TOL = 1e-10  # a residual below this fraction of the vector's norm adds no new direction


def _gram_schmidt(space, Q: torch.Tensor, X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Coefficients of ``X [D, B]`` on ``Q`` extended by new orthonormal directions.

    Returns ``(C [K + J, B], Qn [D, J])`` with ``X = [Q, Qn] C`` (to rounding/tolerance).
    Two passes of classical Gram–Schmidt (CGS2) for orthogonality to working precision."""
    C = space.dot(Q, X)
    R = X - Q @ C
    C2 = space.dot(Q, R)
    R = R - Q @ C2
    C = C + C2
    B = X.shape[1]
    news: list[torch.Tensor] = []
    rows = torch.zeros(B, B, dtype=DT)
    norms = torch.diagonal(space.dot(X, X)).clamp_min(0).sqrt()
    for j in range(B):
        r = R[:, j]
        if news:
            Qn = torch.stack(news, 1)
            for _ in range(2):
                a = space.dot(Qn, r[:, None])[:, 0]
                r = r - Qn @ a
                rows[: len(news), j] += a
        nrm = float(space.dot(r[:, None], r[:, None])) ** 0.5
        if nrm > _TOL * float(norms[j]) and nrm > 0:
            rows[len(news), j] = nrm
            news.append(r / nrm)
    J = len(news)
    Qn = torch.stack(news, 1) if news else X.new_zeros(X.shape[0], 0)
    return torch.cat([C, rows[:J]], 0), Qn


class HiddenMatrix:
    """State of one hidden weight matrix (see module docstring). ``sigma2`` is σ²."""

    def __init__(self, space, sigma2: float):
        D = space.size
        self.space = space
        self.sigma = float(sigma2) ** 0.5
        self.Q = torch.zeros(D, 0, dtype=DT)  # forward basis
        self.G = torch.zeros(D, 0, dtype=DT)  # its Gaussians / σ
        self.P = torch.zeros(D, 0, dtype=DT)  # transposed-use basis
        self.Gp = torch.zeros(D, 0, dtype=DT)
        self.R = torch.zeros(0, 0, dtype=DT)  # X = Q R (history inputs), one column per example
        self.Rp = torch.zeros(0, 0, dtype=DT)  # D = P R' (η · backward vectors)
        self.pairs = 0  # columns of R, R' from finished steps

    # state as named tensors (for checkpoints and exact-space growth)
    FIELDS = ("Q", "G", "P", "Gp", "R", "Rp")

    def _apply(self, X, basis, gauss, other_basis, other_gauss, hist_other, hist_self, gen):
        space = self.space
        K = basis.shape[1]
        C, Qn = _gram_schmidt(space, basis, X)
        Gn = space.fresh(Qn.shape[1], gen)
        zhat = self.sigma * (torch.cat([gauss, Gn], 1) @ C)
        zdot = self.sigma * (other_basis @ space.dot(other_gauss, X))
        S = self.pairs
        # (ΔW) X: -D E[X_hist X] with E[X_hist X] = R[:, :S]ᵀ C_old (orthonormal basis)
        upd = other_basis @ (hist_other[:, :S] @ (hist_self[:, :S].T @ C[:K]))
        return zhat + zdot - upd, C, Qn, Gn

    def forward(self, X: torch.Tensor, commit: bool, gen=None) -> torch.Tensor:
        """``Z^{W_t x}`` for the columns of ``X [D, B]``; ``commit`` records them as this
        step's inputs (training), else the new directions are temporary (prediction)."""
        Z, C, Qn, Gn = self._apply(X, self.Q, self.G, self.P, self.Gp, self.Rp, self.R, gen)
        if commit:
            self.Q = torch.cat([self.Q, Qn], 1)
            self.G = torch.cat([self.G, Gn], 1)
            self.R = torch.cat([torch.cat([self.R, self.R.new_zeros(Qn.shape[1], self.R.shape[1])], 0), C], 1)
        return Z

    def backward(self, U: torch.Tensor, lr: float) -> torch.Tensor:
        """``Z^{W_tᵀ u}`` for the columns of ``U [D, B]`` (the scaled gradients ``n·dh``);
        records ``lr · U`` as this step's update."""
        Z, C, Pn, Gn = self._apply(U, self.P, self.Gp, self.Q, self.G, self.R, self.Rp, None)
        self.P = torch.cat([self.P, Pn], 1)
        self.Gp = torch.cat([self.Gp, Gn], 1)
        self.Rp = torch.cat([torch.cat([self.Rp, self.Rp.new_zeros(Pn.shape[1], self.Rp.shape[1])], 0),
                             lr * C], 1)
        return Z

    def finish_step(self) -> None:
        self.pairs = self.R.shape[1]
        if self.Rp.shape[1] != self.pairs:
            raise AssertionError("forward and backward histories out of step")
