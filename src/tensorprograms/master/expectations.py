"""Gaussian expectations of factors, dispatched to closed forms, quadrature or Monte Carlo.

``mean(f)`` is ``E[f(Z)]`` with shape ``[*F]``; ``cross(f, g)`` is ``E[f(Z) ⊗ g(Z)]`` with
shape ``[*F_f, *F_g]``. The backend is chosen per call: a closed form when both sides
have one, Gauss–Hermite quadrature when the Gaussian dimension is at most
``max_quadrature_dim``, Monte Carlo (seeded, with a standard error) otherwise.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..errors import ExpectationError
from ..program.variables import Vector
from . import closed_form, rules
from .factors import Factor

BACKENDS = ("auto", "closed_form", "quadrature", "monte_carlo")


@dataclass
class Estimate:
    """An expectation's value, its Monte Carlo standard error (None if deterministic),
    the backend that produced it and the Gaussian dimension it integrated over."""

    value: torch.Tensor
    stderr: torch.Tensor | None
    backend: str
    dim: int


def _is_identity(index: torch.Tensor, size: int) -> bool:
    return index.numel() == size and bool((index == torch.arange(size)).all())


def _all_zero(t: torch.Tensor) -> bool:
    """Whether every entry is 0; a nonzero first entry answers without a full pass."""
    return t.numel() == 0 or (not bool(t.reshape(-1)[0] != 0) and not bool(t.any()))


class Expectations:
    def __init__(
        self,
        cov: Callable[[Vector, Vector], torch.Tensor],
        backend: str = "auto",
        quadrature_orders: dict[int, int] | None = None,
        max_quadrature_dim: int = 3,
        mc_samples: int = 2**16,
        seed: int = 0,
        memory_budget: int = 2**23,
    ):
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
        if mc_samples < 2:
            raise ValueError(f"mc_samples must be at least 2, got {mc_samples}")
        self.cov = cov
        self.backend = backend
        self.orders = dict(rules.DEFAULT_ORDERS)
        if quadrature_orders:
            self.orders.update(quadrature_orders)
        self.max_quadrature_dim = max_quadrature_dim
        self.mc_samples = mc_samples
        self.seed = seed
        self.memory_budget = memory_budget
        self._structure = None  # polynomial structure of the program's vectors (polynomial.py)

    # ---------------------------------------------------------------- rule choice
    def _rule(
        self, dim: int, key: str, closed_ok: bool, variance: torch.Tensor | None = None
    ) -> tuple[str, dict]:
        """The backend for a ``dim``-dimensional Gaussian expectation and its settings.

        ``variance``: the variances involved; quadrature orders grow with the largest
        standard deviation beyond 1.5, because integrands such as exp(z) or sin(z) vary
        on the scale 1 in z, i.e. faster on the standard-normal grid as the variance grows
        (benchmarks/quadrature_accuracy.py).
        """
        b = self.backend
        if b == "closed_form":
            if closed_ok:
                return "closed_form", {}
            raise ExpectationError(
                f"no closed form for {key}: closed forms exist for a single G-var under "
                "id/relu/leaky_relu/abs/step/erf/sin/cos/exp (see tp.functions). Use "
                "backend='auto'."
            )
        if closed_ok and b == "auto":
            return "closed_form", {}
        if b == "quadrature" or (b == "auto" and dim <= self.max_quadrature_dim):
            if dim > 6:
                raise ExpectationError(
                    f"{key} needs a {dim}-dimensional Gaussian integral; a tensor-product "
                    "quadrature grid is too large. Use backend='auto' or 'monte_carlo'."
                )
            order = self.orders.get(dim, 8)
            if variance is not None and variance.numel() and dim <= 2:
                stretch = min(4.0, max(1.0, float(variance.detach().max().clamp_min(0).sqrt()) / 1.5))
                order = int(round(order * stretch))
            return "quadrature", {"order": order}
        seed = (self.seed * 1_000_003 + zlib.crc32(key.encode())) % (2**63)
        return "monte_carlo", {"samples": self.mc_samples, "seed": seed}

    @staticmethod
    def _size(dim: int, settings: dict, rows: int = 2) -> int:
        """Nodes of the rule for ``dim`` independent normals (``rows`` coordinates: the polar
        rule has two sectors per coordinate)."""
        if "samples" in settings:
            return settings["samples"]
        order = settings["order"]
        if dim == 2:
            return order * 2 * max(2, rows) * max(8, order // 2)
        return 2 * order if dim == 1 else order**dim

    @staticmethod
    def _root(sigma: torch.Tensor) -> torch.Tensor:
        """``L`` with ``L Lᵀ = sigma`` (``[..., k, k]``), without the columns of exactly dependent
        coordinates (``[..., k, r]``, r = the rank shared by every batch entry)."""
        k = sigma.shape[-1]
        return rules.drop_null_columns(rules.psd_cholesky(sigma) if k <= 6 else rules.psd_sqrt(sigma, 1e-13))

    # ---------------------------------------------------------------- covariance blocks
    def _flat_block(self, f: Factor, g: Factor, i: int, j: int, paired: bool) -> torch.Tensor:
        """Cov of leaf i of f (at index a) and leaf j of g (at index b or a)."""
        c = self.cov(f.leaves[i], g.leaves[j]).reshape(f.leaves[i].numel, g.leaves[j].numel)
        mi, mj = f.maps[i], g.maps[j]
        if _is_identity(mi, c.shape[0]) and _is_identity(mj, c.shape[1]):
            return c.diagonal() if paired else c  # views: no full-size gather (e.g. an MLP's leaves)
        if paired:
            return c[mi, mj]
        return c[mi[:, None], mj[None, :]]

    # ---------------------------------------------------------------- means
    def mean(self, f: Factor, key: str) -> Estimate:
        if f.flat:
            k = len(f.leaves)
            sigma = torch.stack(
                [torch.stack([self._flat_block(f, f, i, j, True) for j in range(k)], -1)
                 for i in range(k)], -2,
            )  # [K, k, k]
            closed = f.terms is not None and closed_form.mean(f.terms, sigma[:, 0, 0]) is not None
            L, rank = None, k
            if not (closed and self.backend in ("auto", "closed_form")):
                L = self._root(sigma)  # the rule is chosen for sigma's rank, not the leaf count
                rank = L.shape[-1]
            backend, settings = self._rule(rank, key, closed, sigma.diagonal(dim1=-2, dim2=-1))
            if backend == "closed_form":
                val = closed_form.mean(f.terms, sigma[:, 0, 0])
                return Estimate(val.reshape(f.shape), None, backend, k)
            out, out2 = [], []
            rows = max(1, self.memory_budget // max(1, self._size(rank, settings, k) * k))
            for start in range(0, f.numel, rows):
                sl = slice(start, start + rows)
                z, reduce = rules.points(L[sl], backend, **settings)
                lead = (1,) * (z[0].ndim - 1)
                y = f.run(z, lambda t, sl=sl, lead=lead: t[sl].reshape(-1, *lead))
                y = torch.broadcast_to(y, z[0].shape)
                out.append(reduce(y))
                out2.append(reduce(y * y) if backend == "monte_carlo" else out[-1])
            return self._finish(torch.cat(out), torch.cat(out2), settings, backend, f.shape, k)
        return self._joint([f], key)

    # ---------------------------------------------------------------- cross moments
    def cross(self, f: Factor, g: Factor, key: str) -> Estimate:
        if f.flat and g.flat:
            return self._flat_cross(f, g, key)
        return self._joint([f, g], key)

    def _flat_cross(self, f: Factor, g: Factor, key: str) -> Estimate:
        kf, kg = len(f.leaves), len(g.leaves)
        k = kf + kg
        ff = [[self._flat_block(f, f, i, j, True) for j in range(kf)] for i in range(kf)]
        gg = [[self._flat_block(g, g, i, j, True) for j in range(kg)] for i in range(kg)]
        fg = [[self._flat_block(f, g, i, j, False) for j in range(kg)] for i in range(kf)]
        shape = (*f.shape, *g.shape)
        if all(_all_zero(b) for row in fg for b in row):
            mf, mg = self.mean(f, key + "[left]"), self.mean(g, key + "[right]")
            val = torch.einsum("a,b->ab", mf.value.reshape(-1), mg.value.reshape(-1))
            se = None
            if mf.stderr is not None or mg.stderr is not None:
                sf = mf.stderr.reshape(-1) if mf.stderr is not None else torch.zeros(f.numel)
                sg = mg.stderr.reshape(-1) if mg.stderr is not None else torch.zeros(g.numel)
                se = (torch.outer(sf, mg.value.reshape(-1).abs())
                      + torch.outer(mf.value.reshape(-1).abs(), sg)).reshape(shape)
            backend = f"independent({mf.backend}×{mg.backend})"
            return Estimate(val.reshape(shape), se, backend, max(mf.dim, mg.dim))
        closed = False
        if f.terms is not None and g.terms is not None:
            test = closed_form.cross(f.terms, g.terms, ff[0][0][:1], gg[0][0][:1], fg[0][0][:1, :1])
            closed = test is not None
        diag = torch.cat([ff[i][i] for i in range(kf)] + [gg[j][j] for j in range(kg)])
        backend, settings = self._rule(k, key, closed, diag)
        if backend == "closed_form":
            val = closed_form.cross(
                f.terms, g.terms, ff[0][0][:, None], gg[0][0][None, :], fg[0][0]
            )
            return Estimate(val.reshape(shape), None, backend, k)
        nf, ng = f.numel, g.numel
        q = self._size(k, settings, k)
        mc = backend == "monte_carlo"
        # A second moment of a vector with itself is symmetric: compute tiles on and above
        # the diagonal only.
        symmetric = f is g
        tile = max(1, int((self.memory_budget / max(1, q * k)) ** 0.5))
        m1 = torch.zeros(nf, ng, dtype=torch.float64)
        m2 = torch.zeros(nf, ng, dtype=torch.float64) if mc else m1
        used_mc = False
        for r0 in range(0, nf, tile):
            rows = slice(r0, min(nf, r0 + tile))
            for c0 in range(r0 if symmetric else 0, ng, tile):
                cols = slice(c0, min(ng, c0 + tile))
                r, c = rows.stop - rows.start, cols.stop - cols.start
                sigma = torch.zeros(r, c, k, k, dtype=torch.float64)
                for i in range(kf):
                    for j in range(kf):
                        sigma[..., i, j] = ff[i][j][rows][:, None]
                    for j in range(kg):
                        sigma[..., i, kf + j] = fg[i][j][rows, cols]
                        sigma[..., kf + j, i] = fg[i][j][rows, cols]
                for i in range(kg):
                    for j in range(kg):
                        sigma[..., kf + i, kf + j] = gg[i][j][cols][None, :]
                L = self._root(sigma)
                tile_backend, tile_settings = backend, settings
                # exactly dependent leaves (a vector paired with c·itself): the true dimension's rule
                if L.shape[-1] < k and self.backend != "monte_carlo":
                    tile_backend, tile_settings = self._rule(L.shape[-1], key, False, diag)
                used_mc |= tile_backend == "monte_carlo"
                z, reduce = rules.points(L, tile_backend, **tile_settings)  # k tensors [r, c, *Q]
                lead = (1,) * (z[0].ndim - 2)
                yf = f.run(z[:kf], lambda t, rows=rows, lead=lead: t[rows].reshape(-1, 1, *lead))
                yg = g.run(z[kf:], lambda t, cols=cols, lead=lead: t[cols].reshape(1, -1, *lead))
                prod = torch.broadcast_to(yf * yg, z[0].shape)
                block = reduce(prod)
                m1[rows, cols] = block
                if symmetric:
                    m1[cols, rows] = block.T
                if mc:
                    block2 = reduce(prod * prod) if tile_backend == "monte_carlo" else block * block
                    m2[rows, cols] = block2
                    if symmetric:
                        m2[cols, rows] = block2.T
        if mc and not used_mc:  # every tile was of lower rank: all quadrature
            backend = "quadrature"
        return self._finish(m1, m2, settings, backend, shape, k)

    # ---------------------------------------------------------------- joint mode
    def _joint(self, fs: list[Factor], key: str) -> Estimate:
        leaves: list[Vector] = []
        for f in fs:
            for v in f.leaves:
                if v not in leaves:
                    leaves.append(v)
        sizes = [v.numel for v in leaves]
        dim = sum(sizes)
        joint = torch.cat(
            [torch.cat([self.cov(a, b).reshape(a.numel, b.numel) for b in leaves], 1)
             for a in leaves], 0,
        )
        if self.backend in ("auto", "quadrature"):
            from . import polynomial  # (it builds on this module)

            if self._structure is None:
                self._structure = polynomial.Structure()
            est = polynomial.integrate(self, self._structure, fs, key, leaves, joint)
            if est is not None:
                return est
        root = self._root(joint)
        backend, settings = self._rule(root.shape[-1], key, False, joint.diagonal())
        z_all, w_all = rules.flat_points(root, backend, **settings)  # [Q, D], [Q]
        q = z_all.shape[0]
        per = max(1, self.memory_budget // max(1, sum(f.numel for f in fs) + dim))
        acc = acc2 = None
        for start in range(0, q, per):
            z = z_all[start:start + per]
            parts = torch.split(z, sizes, dim=1)
            vals_by_leaf = {v: p.reshape(-1, *v.shape) for v, p in zip(leaves, parts, strict=False)}
            ys = [f.run([vals_by_leaf[v] for v in f.leaves]).reshape(z.shape[0], -1) for f in fs]
            w = w_all[start:start + per]
            if len(ys) == 1:
                term, term2 = w @ ys[0], w @ ys[0] ** 2
            else:
                term = (ys[0] * w[:, None]).T @ ys[1]
                term2 = (ys[0] ** 2 * w[:, None]).T @ ys[1] ** 2
            acc = term if acc is None else acc + term
            acc2 = term2 if acc2 is None else acc2 + term2
        shape = tuple(s for f in fs for s in f.shape)
        return self._finish(acc, acc2, settings, backend, shape, dim)

    @staticmethod
    def _finish(m, m2, settings, backend, shape, dim) -> Estimate:
        se = None
        if backend == "monte_carlo":
            s = settings["samples"]
            se = ((m2 - m * m).clamp_min(0) / (s - 1)).sqrt().reshape(shape)
        return Estimate(m.reshape(shape), se, backend, dim)
