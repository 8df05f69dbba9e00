"""The Gaussian part of the limit: G-vars as linear maps of atoms, and their covariances.

Every G-var is ``Σ_a M_a Z^a`` where an atom ``a`` is an initial vector or a MatMul
output and ``M_a`` a linear map over finite indices (built from LinComb functions).
Atoms from different matrices or different initial vectors are independent; two
MatMul atoms of the same matrix W have ``Cov(Z^{Wx}, Z^{Wy}) = σ_W² E[Z^x Z^y]``
(TP I). Covariances are computed on demand and cached, and always for all finite
indices at once: ``cov(g, h)`` has shape ``[*F_g, *F_h]``.

Each ``M_a`` is kept in one of two forms. Small ones (``|F_g|·|F_a| ≤ DENSE_LIMIT``) are
dense matrices ``[|F_g|, |F_a|]``: an atom reached along several paths of LinCombs (as in
the Netsor⊤ rewrite, where each ``Ż`` adds earlier vectors back) is then one matrix, not
one term per path, so the cost stays linear in the program's length. Large ones (kernels
of many inputs, feature maps with many positions) stay functions applied to covariance
blocks, which costs what the LinComb's own function costs (a convolution's shifts, a
broadcast) instead of a dense matrix product.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..program.calling import call_full, pad_finite
from ..program.instructions import InitVector, LinComb, MatMul
from ..program.variables import Scalar, Vector

LinearMap = Callable[[torch.Tensor], torch.Tensor]  # [B, *F_atom] -> [B, *F_g]
Term = torch.Tensor | LinearMap  # dense [|F_g|, |F_a|] or a map
DENSE_LIMIT = 1 << 16


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def _as_map(term: Term, atom: Vector, g: Vector) -> LinearMap:
    if not isinstance(term, torch.Tensor):
        return term

    def dense(t: torch.Tensor, _m=term, _a=atom.numel, _g=g.shape) -> torch.Tensor:
        return (t.reshape(t.shape[0], _a) @ _m.T).reshape(t.shape[0], *_g)

    return dense


def _sum_maps(f: LinearMap, h: LinearMap) -> LinearMap:
    def both(t: torch.Tensor) -> torch.Tensor:
        return f(t) + h(t)

    return both


def _plain_sum(g: Vector) -> bool:
    """A ``Program.lincomb`` ``Σ_k c_k x_k`` (fixed coefficients, finite shapes broadcast)."""
    ins = g.instruction
    return isinstance(ins, LinComb) and not ins.params and getattr(ins.fn, "coefficients", None) is not None


class GaussianBasis:
    """Atoms and covariances of a program's Gaussian vectors.

    Args:
        second_moment: callback ``(x, y) -> E[Z^x ⊗ Z^y]`` for the MatMul rule.
        scalar_value: callback ``θ -> limit of θ`` for LinCombs whose coefficients depend
            on Scalars (NETSOR+): the map is taken at the Scalars' limits.
    """

    def __init__(self, second_moment: Callable[[Vector, Vector], torch.Tensor],
                 scalar_value: Callable[[Scalar], torch.Tensor] | None = None):
        self._second_moment = second_moment
        self._scalar_value = scalar_value
        self._terms: dict[Vector, dict[Vector, Term]] = {}
        self._cov: dict[tuple[Vector, Vector], torch.Tensor] = {}
        # called with (g, h) after Cov(g, h) is newly cached (the limit's liveness bookkeeping)
        self.on_computed: Callable[[Vector, Vector], None] | None = None

    def terms(self, g: Vector) -> dict[Vector, Term]:
        """``{atom: M_{g,atom}}``, each a dense matrix or a map (see the module docstring)."""
        if g in self._terms:
            return self._terms[g]
        ins = g.instruction
        result: dict[Vector, Term] = {}
        if isinstance(ins, (InitVector, MatMul)):
            small = g.numel * g.numel <= DENSE_LIMIT
            result[g] = torch.eye(g.numel, dtype=torch.float64) if small else _identity
        elif isinstance(ins, LinComb):
            shapes = [x.shape for x in ins.xs]
            params = [self._scalar_value(p) if isinstance(p, Scalar) else p for p in ins.params]
            for k, x in enumerate(ins.xs):
                for atom, inner in self.terms(x).items():
                    if isinstance(inner, torch.Tensor) and g.numel * atom.numel <= DENSE_LIMIT:
                        # the columns of the matrix pushed through the k-th slot of the map
                        cols = inner.T.reshape(atom.numel, *x.shape)
                        args = [cols if i == k else torch.zeros(atom.numel, *s, dtype=torch.float64)
                                for i, s in enumerate(shapes)]
                        term = call_full(ins.fn, args, shapes, params, 1).reshape(atom.numel, g.numel).T
                    else:
                        term = self._through(ins.fn, shapes, k, _as_map(inner, atom, x), g.shape, params)
                    if atom in result:
                        old = result[atom]
                        if isinstance(old, torch.Tensor) and isinstance(term, torch.Tensor):
                            term = old + term
                        else:
                            term = _sum_maps(_as_map(old, atom, g), _as_map(term, atom, g))
                    result[atom] = term
        else:
            raise TypeError(f"{g.name} is not a Gaussian vector")
        self._terms[g] = result
        return result

    def coefficients(self, g: Vector) -> dict[Vector, torch.Tensor]:
        """``{atom: M_{g,atom}}`` as dense matrices ``[|F_g|, |F_atom|]``, in atom order
        (maps are materialized: meant for programs with small finite shapes)."""
        out = {}
        for atom, term in self.terms(g).items():
            if isinstance(term, torch.Tensor):
                out[atom] = term
            else:
                eye = torch.eye(atom.numel, dtype=torch.float64).reshape(atom.numel, *atom.shape)
                out[atom] = term(eye).reshape(atom.numel, g.numel).T
        return out

    @staticmethod
    def _through(fn, shapes, k: int, inner: LinearMap, out_shape: tuple[int, ...],
                 params=()) -> LinearMap:
        coefficients = getattr(fn, "coefficients", None)  # Σ_i c_i x_i (Program.lincomb)
        if coefficients is not None and not params:
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
            return call_full(fn, args, shapes, list(params), 1)

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
        for a in self.terms(g):
            for b in self.terms(h):
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
        if _plain_sum(g) or _plain_sum(h):
            return self._store(key, self._cov_of_sum(g, h))
        total = None  # the first term itself, not zeros + … (a full-size pass at large N)
        for a, ta in self.terms(g).items():
            for b, tb in self.terms(h).items():
                c = self._atom_cov(a, b)
                if c is None:
                    continue
                if isinstance(ta, torch.Tensor) and isinstance(tb, torch.Tensor):
                    term = ta @ c.reshape(a.numel, b.numel) @ tb.T
                    total = term if total is None else total + term
                    continue
                la, lb = _as_map(ta, a, g), _as_map(tb, b, h)
                c = c.reshape(a.numel, *b.shape)
                c = lb(c).reshape(a.numel, h.numel)  # map the second group: [|F_a|, |F_h|]
                c = c.T.reshape(h.numel, *a.shape)
                c = la(c).reshape(h.numel, g.numel)  # map the first group: [|F_h|, |F_g|]
                total = c.T if total is None else total + c.T
        if total is None:
            total = torch.zeros(g.numel, h.numel, dtype=torch.float64)
        return self._store(key, total.reshape(g.shape + h.shape))

    def _store(self, key: tuple[Vector, Vector], result: torch.Tensor) -> torch.Tensor:
        self._cov[key] = result
        if self.on_computed is not None:
            self.on_computed(*key)
        return result

    def _cov_of_sum(self, g: Vector, h: Vector) -> torch.Tensor:
        """Cov(Σ_k c_k x_k, h) = Σ_k c_k Cov(x_k, h) (broadcast to F_g) for a plain
        ``Program.lincomb`` g (or h): reuses the operands' cached covariances, e.g. a layer's
        Cov(Wx + b) from Cov(Wx) instead of mapping the atoms again (for an input layer that
        is a second Gram matrix of the data)."""
        if not _plain_sum(g):
            return self._transpose(self._cov_of_sum(h, g), h.shape, g.shape)
        ins = g.instruction
        total = None
        for c, x in zip(ins.fn.coefficients, ins.xs):
            if c == 0.0 or not self.may_correlate(x, h):
                continue
            part = pad_finite(self.cov(x, h), 0, x.shape + h.shape, len(g.shape) + len(h.shape))
            part = part.expand(g.shape + h.shape)
            part = part if c == 1.0 else c * part
            total = part if total is None else total + part
        if total is None:
            return torch.zeros(g.shape + h.shape, dtype=torch.float64)
        return total

    @staticmethod
    def _transpose(c: torch.Tensor, shape_a, shape_b) -> torch.Tensor:
        na = len(shape_a)
        perm = list(range(na, c.ndim)) + list(range(na))
        return c.permute(tuple(perm))

    def joint_cov(self, gs: list[Vector]) -> torch.Tensor:
        """The covariance of the concatenated flattened vectors ``gs``: ``[D, D]``."""
        blocks = [[self.cov(g, h).reshape(g.numel, h.numel) for h in gs] for g in gs]
        return torch.cat([torch.cat(row, dim=1) for row in blocks], dim=0)
