"""The Gaussian part of the limit: G-vars as linear maps of atoms, and their covariances.

Every G-var is ``Σ_i L_i(atom_i)`` where an atom is an initial vector or a MatMul
output and ``L_i`` a linear map over finite indices (built from LinComb functions).
Atoms from different matrices or different initial vectors are independent; two
MatMul atoms of the same matrix W have ``Cov(Z^{Wx}, Z^{Wy}) = σ_W² E[Z^x Z^y]``
(TP I). Covariances are computed on demand and cached, and always for all finite
indices at once: ``cov(g, h)`` has shape ``[*F_g, *F_h]``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..program.calling import call_full, pad_finite
from ..program.instructions import InitVector, LinComb, MatMul
from ..program.variables import Vector

LinearMap = Callable[[torch.Tensor], torch.Tensor]  # [B, *F_atom] -> [B, *F_g]


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


class GaussianBasis:
    """Atoms and covariances of a program's Gaussian vectors.

    Args:
        second_moment: callback ``(x, y) -> E[Z^x ⊗ Z^y]`` for the MatMul rule.
    """

    def __init__(self, second_moment: Callable[[Vector, Vector], torch.Tensor]):
        self._second_moment = second_moment
        self._atoms: dict[Vector, list[tuple[Vector, LinearMap]]] = {}
        self._cov: dict[tuple[Vector, Vector], torch.Tensor] = {}

    def atoms(self, g: Vector) -> list[tuple[Vector, LinearMap]]:
        if g in self._atoms:
            return self._atoms[g]
        ins = g.instruction
        if isinstance(ins, (InitVector, MatMul)):
            result = [(g, _identity)]
        elif isinstance(ins, LinComb):
            result = []
            shapes = [x.shape for x in ins.xs]
            for k, x in enumerate(ins.xs):
                for atom, inner in self.atoms(x):
                    result.append((atom, self._through(ins.fn, shapes, k, inner, g.shape)))
        else:
            raise TypeError(f"{g.name} is not a Gaussian vector")
        self._atoms[g] = result
        return result

    @staticmethod
    def _through(fn, shapes, k: int, inner: LinearMap, out_shape: tuple[int, ...]) -> LinearMap:
        coefficients = getattr(fn, "coefficients", None)  # Σ_i c_i x_i (Program.lincomb)
        if coefficients is not None:
            c = coefficients[k]

            def term(t: torch.Tensor) -> torch.Tensor:
                # c_k·x_k broadcast to the output: the other terms would only add zeros
                u = pad_finite(inner(t), 1, shapes[k], len(out_shape))
                u = u.expand(u.shape[0], *out_shape)
                return u if c == 1.0 else c * u

            return term

        def mapped(t: torch.Tensor) -> torch.Tensor:
            u = inner(t)
            args = [
                u if i == k else torch.zeros(u.shape[0], *s, dtype=u.dtype)
                for i, s in enumerate(shapes)
            ]
            return call_full(fn, args, shapes, [], 1)

        return mapped

    def _atom_cov(self, a: Vector, b: Vector) -> torch.Tensor | None:
        """Cov(Z^a, Z^b) ``[*F_a, *F_b]``, or None when independent."""
        ia, ib = a.instruction, b.instruction
        if isinstance(ia, InitVector):
            return ia.cov if a is b else None
        if isinstance(ia, MatMul) and isinstance(ib, MatMul):
            if ia.matrix is ib.matrix and ia.transpose == ib.transpose and not ia.transpose:
                return ia.matrix.variance * self._second_moment(ia.x, ib.x)
        return None

    def may_correlate(self, g: Vector, h: Vector) -> bool:
        """False when no atom of g can covary with an atom of h (different initial vectors,
        different matrices): decided from the program alone, without computing anything."""
        for a, _ in self.atoms(g):
            for b, _ in self.atoms(h):
                ia, ib = a.instruction, b.instruction
                if isinstance(ia, InitVector) and a is b:
                    return True
                if (isinstance(ia, MatMul) and isinstance(ib, MatMul) and ia.matrix is ib.matrix
                        and ia.transpose == ib.transpose and not ia.transpose):
                    return True
        return False

    def cov(self, g: Vector, h: Vector) -> torch.Tensor:
        """Cov(Z^g, Z^h) with shape ``[*F_g, *F_h]`` (both Gaussian, zero mean)."""
        key = (g, h)
        if key in self._cov:
            return self._cov[key]
        if (h, g) in self._cov:
            return self._transpose(self._cov[(h, g)], h.shape, g.shape)
        total = torch.zeros(g.numel, h.numel, dtype=torch.float64)
        for a, la in self.atoms(g):
            for b, lb in self.atoms(h):
                c = self._atom_cov(a, b)
                if c is None:
                    continue
                c = c.reshape(a.numel, *b.shape)
                c = lb(c).reshape(a.numel, h.numel)  # map the second group: [|F_a|, |F_h|]
                c = c.T.reshape(h.numel, *a.shape)
                c = la(c).reshape(h.numel, g.numel)  # map the first group: [|F_h|, |F_g|]
                total = total + c.T
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
