"""The Gaussian part of the limit: G-vars as linear maps of atoms, and their covariances.

Every G-var is ``Σ_a M_a Z^a`` where an atom ``a`` is an initial vector or a MatMul
output and ``M_a`` a matrix over finite indices (built from LinComb functions).
Atoms from different matrices or different initial vectors are independent; two
MatMul atoms of the same matrix W have ``Cov(Z^{Wx}, Z^{Wy}) = σ_W² E[Z^x Z^y]``
(TP I). Covariances are computed on demand and cached, and always for all finite
indices at once: ``cov(g, h)`` has shape ``[*F_g, *F_h]``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..program.calling import call_full
from ..program.instructions import InitVector, LinComb, MatMul
from ..program.variables import Vector


class GaussianBasis:
    """Atoms and covariances of a program's Gaussian vectors.

    Each G-var ``g`` is kept as one coefficient matrix per atom, ``Z^g = Σ_a M_{g,a} Z^a``
    with ``M_{g,a}`` of shape ``[|F_g|, |F_a|]``: an atom reached along several paths of
    LinCombs (as in the Netsor⊤ rewrite, where each ``Ż`` adds earlier vectors back) is
    one matrix, not one term per path, so the cost stays linear in the program's length.

    Args:
        second_moment: callback ``(x, y) -> E[Z^x ⊗ Z^y]`` for the MatMul rule.
    """

    def __init__(self, second_moment: Callable[[Vector, Vector], torch.Tensor]):
        self._second_moment = second_moment
        self._coef: dict[Vector, dict[Vector, torch.Tensor]] = {}
        self._cov: dict[tuple[Vector, Vector], torch.Tensor] = {}

    def coefficients(self, g: Vector) -> dict[Vector, torch.Tensor]:
        """``{atom: M_{g,atom}}`` with ``M`` of shape ``[|F_g|, |F_atom|]``, in atom order."""
        if g in self._coef:
            return self._coef[g]
        ins = g.instruction
        if isinstance(ins, (InitVector, MatMul)):
            result = {g: torch.eye(g.numel, dtype=torch.float64)}
        elif isinstance(ins, LinComb):
            result: dict[Vector, torch.Tensor] = {}
            shapes = [x.shape for x in ins.xs]
            for k, x in enumerate(ins.xs):
                for atom, m in self.coefficients(x).items():
                    # the columns of m pushed through the k-th slot of the linear map
                    cols = m.T.reshape(atom.numel, *x.shape)
                    args = [cols if i == k else torch.zeros(atom.numel, *s, dtype=torch.float64)
                            for i, s in enumerate(shapes)]
                    mk = call_full(ins.fn, args, shapes, [], 1).reshape(atom.numel, g.numel).T
                    result[atom] = result[atom] + mk if atom in result else mk
        else:
            raise TypeError(f"{g.name} is not a Gaussian vector")
        self._coef[g] = result
        return result

    def _atom_cov(self, a: Vector, b: Vector) -> torch.Tensor | None:
        """Cov(Z^a, Z^b) ``[*F_a, *F_b]``, or None when independent."""
        ia, ib = a.instruction, b.instruction
        if isinstance(ia, InitVector):
            return ia.cov if a is b else None
        if isinstance(ia, MatMul) and isinstance(ib, MatMul):
            if ia.matrix is ib.matrix and ia.transpose == ib.transpose and not ia.transpose:
                return ia.matrix.variance * self._second_moment(ia.x, ib.x)
        return None

    def cov(self, g: Vector, h: Vector) -> torch.Tensor:
        """Cov(Z^g, Z^h) with shape ``[*F_g, *F_h]`` (both Gaussian, zero mean)."""
        key = (g, h)
        if key in self._cov:
            return self._cov[key]
        if (h, g) in self._cov:
            return self._transpose(self._cov[(h, g)], h.shape, g.shape)
        total = torch.zeros(g.numel, h.numel, dtype=torch.float64)
        for a, ma in self.coefficients(g).items():
            for b, mb in self.coefficients(h).items():
                c = self._atom_cov(a, b)
                if c is not None:
                    total = total + ma @ c.reshape(a.numel, b.numel) @ mb.T
        result = total.reshape(g.shape + h.shape)
        self._cov[key] = result
        return result

    @staticmethod
    def _transpose(c: torch.Tensor, shape_a, shape_b) -> torch.Tensor:
        na = len(shape_a)
        perm = list(range(na, c.ndim)) + list(range(na))
        return c.permute(tuple(perm))

    def joint_cov(self, gs: list[Vector]) -> torch.Tensor:
        """The covariance of the concatenated flattened vectors ``gs``: ``[D, D]``."""
        blocks = [[self.cov(g, h).reshape(g.numel, h.numel) for h in gs] for g in gs]
        return torch.cat([torch.cat(row, dim=1) for row in blocks], dim=0)
