"""``tp.master_theorem``: the infinite-width limit of every variable of a program
(Netsor directly; Netsor⊤ through TP IV's rule, see transpose.py)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ProgramError
from ..program import functions as F
from ..program import languages
from ..program.calling import call_full
from ..program.instructions import Moment, Nonlin
from ..program.program import Program
from ..program.variables import Scalar, Var, Vector
from . import liveness, rules
from .expectations import Estimate, Expectations, _all_zero
from .factors import Factor, FactorBuilder
from .gaussian import GaussianBasis
from .transpose import to_netsor


@dataclass
class Record:
    """How one expectation was computed (for ``limit.report()``)."""

    quantity: str
    backend: str
    dim: int
    max_stderr: float | None


class ProgramLimit:
    """The n → ∞ limit of a program (TP I's Master Theorem), computed lazily and cached.

    For vectors ``x, y`` of finite shapes ``F_x, F_y`` and scalars ``θ``:

    - ``second_moment(x, y)``: ``E[Z^x ⊗ Z^y]``, shape ``[*F_x, *F_y]``, the limit of
      ``(1/n) Σ_α x_α ⊗ y_α``;
    - ``cov(x, y)``: ``second_moment - mean ⊗ mean`` (for G-vars the same thing);
    - ``mean(x)``: ``E[Z^x]``, shape ``[*F_x]``;
    - ``value(θ)`` or ``limit[θ]``: the deterministic limit of a scalar, shape ``[*F_θ]``;
    - ``sample(x, num)``: draws of ``Z^x``, shape ``[num, *F_x]``;
    - ``stderr(...)``: the Monte Carlo standard error of an entry computed by Monte Carlo
      (zeros where a closed form or quadrature was used). Errors are not propagated
      through later layers; ``report()`` lists which backend produced what.
    """

    def __init__(self, program: Program, expectations: Expectations):
        self.program = program
        self.source: Program | None = None  # a Netsor⊤ program this one was derived from
        self.varmap: dict[Var, Var] = {}
        self._ex = expectations
        self._basis = GaussianBasis(self.second_moment, self.value)
        self._ex.cov = self._basis.cov
        self._basis.on_computed = lambda g, h: self._computed(liveness.key(g, h))
        self._builder = FactorBuilder(self.value)
        self._moments: dict[tuple[Vector, Vector], Estimate] = {}
        self._means: dict[Vector, Estimate] = {}
        self._scalars: dict[Scalar, Estimate] = {}
        self._flat: dict[object, Factor | None] = {}
        self._joint: dict[object, Factor] = {}
        self.records: list[Record] = []
        # liveness.plan's reader counts and read sets, when the caller declared its queries
        self._readers: dict[liveness.Key, int] | None = None
        self._reads: dict[liveness.Key, set[liveness.Key]] = {}

    # ---------------------------------------------------------------- checks
    def _map(self, v):
        """Variables of the source Netsor⊤ program stand for their Netsor counterparts."""
        if isinstance(v, Var) and self.source is not None and v.program is self.source:
            return self.varmap[v]
        return v

    def _own(self, v: Var, kind: type, what: str) -> None:
        if not isinstance(v, Var) or v.program is not self.program:
            raise ProgramError(f"{v!r} is not a variable of this program.")
        if not isinstance(v, kind):
            raise ProgramError(f"{v.name} is a {type(v).__name__}, not a {what}.")

    def _record(self, quantity: str, est: Estimate) -> Estimate:
        se = None if est.stderr is None else float(est.stderr.detach().max())
        self.records.append(Record(quantity, est.backend, est.dim, se))
        return est

    def _factor(self, target) -> Factor:
        if target not in self._flat:
            self._flat[target] = self._builder.flat(target)
        flat = self._flat[target]
        return flat if flat is not None else self._joint_factor(target)

    def _joint_factor(self, target) -> Factor:
        if target not in self._joint:
            self._joint[target] = self._builder.joint(target)
        return self._joint[target]

    # ---------------------------------------------------------------- vectors
    def _second(self, x: Vector, y: Vector) -> Estimate:
        if (x, y) in self._moments:
            return self._moments[(x, y)]
        if (y, x) in self._moments:
            e = self._moments[(y, x)]
            nx = len(y.shape)
            perm = list(range(nx, e.value.ndim)) + list(range(nx))
            se = None if e.stderr is None else e.stderr.permute(tuple(perm))
            return Estimate(e.value.permute(tuple(perm)), se, e.backend, e.dim)
        key = f"E[{x.name}⊗{y.name}]"
        if x.is_gaussian and y.is_gaussian:
            est = Estimate(self._basis.cov(x, y), None, "gaussian", 0)
        elif _linear_nonlin(x) is not None or _linear_nonlin(y) is not None:
            est = self._through_linear(x, y)
        elif (factored := self._independent_product(x, y)) is not None:
            est = factored
        elif self._independent_of_gaussian(x, y):
            est = Estimate(torch.zeros(x.shape + y.shape, dtype=torch.float64), None, "independent", 0)
        else:
            fx, fy = self._factor(x), self._factor(y)
            if fx.flat != fy.flat:
                fx, fy = self._joint_factor(x), self._joint_factor(y)
            est = self._record(key, self._ex.cross(fx, fy, key))
        self._moments[(x, y)] = est
        if not (x.is_gaussian and y.is_gaussian):  # Gaussian pairs: counted by the basis
            self._computed(liveness.key(x, y))
        return est

    # ---------------------------------------------------------------- liveness
    def plan(self, queries) -> None:
        """Declare the pairs ``(x, y)`` whose second moments (or covariances) the caller will
        read: from now on a cached moment is freed once everything that reads it has been
        computed and the caller has released (:meth:`release`) the queries that need it (see
        liveness.py). Keeps kernels of many inputs from holding every intermediate N × N
        matrix at once; values are unchanged (an entry freed too early is recomputed)."""
        pairs = [(self._map(x), self._map(y)) for x, y in queries]
        self._readers, self._reads = liveness.plan(pairs)

    def release(self, x: Vector, y: Vector | None = None) -> None:
        """The caller is done with ``E[x ⊗ y]`` (a pair given to :meth:`plan`)."""
        x, y = self._map(x), self._map(y)
        self._drop(liveness.key(x, x if y is None else y))

    def _computed(self, k) -> None:
        """``k`` is now cached: what it read has one reader fewer still to come."""
        if self._readers is not None:
            for r in self._reads.get(k, ()):
                self._drop(r)

    def _drop(self, k) -> None:
        if self._readers is None or k not in self._readers:
            return
        self._readers[k] -= 1
        if self._readers[k] <= 0:
            x, y = k
            for pair in ((x, y), (y, x)):
                self._moments.pop(pair, None)
                self._basis._cov.pop(pair, None)

    def _leaves(self, v: Vector) -> list[Vector]:
        return self._joint_factor(v).leaves if not v.is_gaussian else [v]

    def _independent_product(self, x: Vector, y: Vector) -> Estimate | None:
        """E[(u v) ⊗ (u' v')] = E[u ⊗ u'] ⊙ E[v ⊗ v'] for products whose u-parts and v-parts
        are independent (e.g. φ'(h) ⊙ dx in a backward pass, TP II)."""
        px, py = _product_nonlin(x), _product_nonlin(y)
        if px is None or py is None:
            return None
        (u1, v1), (u2, v2) = px.xs, py.xs
        if not (u1.shape == v1.shape == x.shape and u2.shape == v2.shape == y.shape):
            return None
        left = self._leaves(u1) + self._leaves(u2)
        right = self._leaves(v1) + self._leaves(v2)
        for a in left:
            for b in right:
                if a is b or (self._basis.may_correlate(a, b) and not _all_zero(self._basis.cov(a, b))):
                    return None
        eu, ev = self._second(u1, u2), self._second(v1, v2)
        se = None
        if eu.stderr is not None or ev.stderr is not None:
            su = eu.stderr if eu.stderr is not None else torch.zeros_like(eu.value)
            sv = ev.stderr if ev.stderr is not None else torch.zeros_like(ev.value)
            se = su * ev.value.abs() + sv * eu.value.abs()
        return Estimate(eu.value * ev.value, se, f"product({eu.backend}, {ev.backend})",
                        max(eu.dim, ev.dim))

    def _independent_of_gaussian(self, x: Vector, y: Vector) -> bool:
        """E[Z^g ⊗ φ(Z…)] = E[Z^g] ⊗ E[φ] = 0 for a G-var g uncorrelated with (so, jointly
        Gaussian, independent of) every input of the H-var φ (e.g. a fixed positional
        encoding added to a Gaussian embedding)."""
        if x.is_gaussian == y.is_gaussian:
            return False
        g, h = (x, y) if x.is_gaussian else (y, x)
        for leaf in self._leaves(h):
            if leaf is g or (self._basis.may_correlate(g, leaf) and self._basis.cov(g, leaf).abs().max() > 0):
                return False
        return True

    def _through_linear(self, x: Vector, y: Vector) -> Estimate:
        """E[L(u) ⊗ y] = L applied to E[u ⊗ y] for a linear Nonlin x = L(u) (gathers,
        pooling, means over finite indices): exact, and keeps u's cheaper expectations."""
        ins = _linear_nonlin(x)
        if ins is None:  # y is the linear one: transpose the problem
            e = self._through_linear(y, x)
            ny = len(y.shape)
            perm = list(range(ny, e.value.ndim)) + list(range(ny))
            se = None if e.stderr is None else e.stderr.permute(tuple(perm))
            return Estimate(e.value.permute(tuple(perm)), se, e.backend, e.dim)
        shapes = [u.shape for u in ins.xs]
        value, se, backends, dim = 0, None, [], 0
        for i, u in enumerate(ins.xs):  # L(u_1, …, u_k) = Σ_i L(0, …, u_i, …, 0)
            inner = self._second(u, y)

            def apply(t: torch.Tensor, _i=i, _u=u) -> torch.Tensor:
                # [*F_u, *F_y] -> [*F_y, *F_u] -> fn over F_u with F_y as batch -> [*F_x, *F_y]
                t = t.reshape(_u.numel, y.numel).T.reshape(y.numel, *_u.shape)
                args = [t if j == _i else t.new_zeros(y.numel, *s) for j, s in enumerate(shapes)]
                out = call_full(ins.fn, args, shapes, [], 1).reshape(y.numel, x.numel)
                return out.T.reshape(x.shape + y.shape)

            value = value + apply(inner.value)
            if inner.stderr is not None:
                part = apply(inner.stderr).abs()
                se = part if se is None else se + part
            backends.append(inner.backend)
            dim = max(dim, inner.dim)
        return Estimate(value, se, f"linear({', '.join(dict.fromkeys(backends))})", dim)

    def second_moment(self, x: Vector, y: Vector | None = None) -> torch.Tensor:
        """``E[Z^x ⊗ Z^y]``, shape ``[*F_x, *F_y]`` (y defaults to x)."""
        x, y = self._map(x), self._map(y)
        y = x if y is None else y
        self._own(x, Vector, "vector")
        self._own(y, Vector, "vector")
        return self._second(x, y).value

    def coefficients(self, g: Vector) -> dict[Vector, torch.Tensor]:
        """A Gaussian vector as ``Σ_a M_a Z^a`` over its atoms (initial vectors and MatMul
        outputs): ``{atom: M_a}`` with ``M_a`` of shape ``[|F_g|, |F_a|]``."""
        g = self._map(g)
        self._own(g, Vector, "vector")
        if not g.is_gaussian:
            raise ProgramError(f"{g.name} is not a G-var or initial vector; it has no atom coefficients.")
        return dict(self._basis.coefficients(g))

    def mean(self, x: Vector) -> torch.Tensor:
        """``E[Z^x]``, shape ``[*F_x]`` (zero for G-vars)."""
        x = self._map(x)
        self._own(x, Vector, "vector")
        if x.is_gaussian:
            return torch.zeros(x.shape, dtype=torch.float64)
        lin = _linear_nonlin(x)
        if lin is not None and x not in self._means:
            m = self.mean(lin.xs[0]).reshape(1, *lin.xs[0].shape)
            value = call_full(lin.fn, [m], [lin.xs[0].shape], [], 1).reshape(x.shape)
            self._means[x] = Estimate(value, None, "linear", 0)
        if x not in self._means:
            key = f"E[{x.name}]"
            self._means[x] = self._record(key, self._ex.mean(self._factor(x), key))
        return self._means[x].value

    def cov(self, x: Vector, y: Vector | None = None) -> torch.Tensor:
        """``Cov(Z^x, Z^y)``, shape ``[*F_x, *F_y]``."""
        x, y = self._map(x), self._map(y)
        y = x if y is None else y
        m = self.second_moment(x, y)
        if x.is_gaussian or y.is_gaussian:
            return m
        return m - torch.einsum("a,b->ab", self.mean(x).reshape(-1), self.mean(y).reshape(-1)).reshape(
            m.shape
        )

    def stderr(self, x: Var, y: Vector | None = None) -> torch.Tensor:
        """Monte Carlo standard error of ``second_moment(x, y)`` or of ``value(x)`` for a scalar."""
        x, y = self._map(x), self._map(y)
        if isinstance(x, Scalar):
            self.value(x)
            e = self._scalars[x]
        else:
            y = x if y is None else y
            self.second_moment(x, y)
            e = self._second(x, y)
        return torch.zeros_like(e.value) if e.stderr is None else e.stderr

    # ---------------------------------------------------------------- scalars
    def value(self, theta: Scalar) -> torch.Tensor:
        """The deterministic limit of a scalar (Moment output), shape ``[*F_θ]``."""
        theta = self._map(theta)
        self._own(theta, Scalar, "scalar")
        if theta not in self._scalars:
            ins = theta.instruction
            assert isinstance(ins, Moment)
            key = f"{theta.name}"
            if isinstance(ins.fn, F.Outer) and len(ins.xs) == 2 and not ins.params:
                # (1/n) Σ_α x_α ⊗ y_α → E[Z^x ⊗ Z^y]: the second moment (exact for G-vars)
                e = self._second(*ins.xs)
                se = None if e.stderr is None else e.stderr.reshape(theta.shape)
                self._scalars[theta] = Estimate(e.value.reshape(theta.shape), se, e.backend, e.dim)
            else:
                self._scalars[theta] = self._record(key, self._ex.mean(self._factor(ins), key))
        return self._scalars[theta].value

    def __getitem__(self, v: Var) -> torch.Tensor:
        v = self._map(v)
        if isinstance(v, Scalar):
            return self.value(v)
        if isinstance(v, Vector):
            return self.second_moment(v)
        raise ProgramError(f"{v!r}: only vectors and scalars have limits to show")

    # ---------------------------------------------------------------- samples
    def sample(self, x: Vector, num_samples: int = 1000, seed: int = 0) -> torch.Tensor:
        """Draws of ``Z^x``: shape ``[num_samples, *F_x]``."""
        x = self._map(x)
        self._own(x, Vector, "vector")
        if num_samples < 1:
            raise ValueError(f"num_samples must be positive, got {num_samples}")
        f = self._joint_factor(x)
        sizes = [v.numel for v in f.leaves]
        joint = torch.cat(
            [torch.cat([self._basis.cov(a, b).reshape(a.numel, b.numel) for b in f.leaves], 1)
             for a in f.leaves], 0,
        )
        root = rules.psd_sqrt(joint)
        gen = torch.Generator().manual_seed(seed)
        z = torch.randn(num_samples, sum(sizes), generator=gen, dtype=torch.float64) @ root.T
        parts = torch.split(z, sizes, dim=1)
        return f.run([p.reshape(-1, *v.shape) for v, p in zip(f.leaves, parts, strict=False)])

    # ---------------------------------------------------------------- reports
    def report(self) -> str:
        """A table of every expectation computed so far and its backend."""
        lines = [f"{'quantity':<28} {'backend':<34} {'dim':>3} {'max stderr':>11}"]
        for r in self.records:
            se = "" if r.max_stderr is None else f"{r.max_stderr:.2e}"
            lines.append(f"{r.quantity:<28} {r.backend:<34} {r.dim:>3} {se:>11}")
        return "\n".join(lines)

    def summary(self) -> str:
        """Every scalar's limit and every vector's limiting second-moment matrix, as text."""
        out = []
        torch.set_printoptions(precision=6, sci_mode=False)
        for v in self.program.variables:
            if isinstance(v, Scalar):
                out.append(f"{v.name} → {self.value(v).tolist()}")
            elif isinstance(v, Vector):
                out.append(f"E[Z^{v.name} Z^{v.name}ᵀ] =\n{self.second_moment(v)}")
        return "\n".join(out)


def _product_nonlin(v: Vector) -> Nonlin | None:
    ins = v.instruction
    if isinstance(ins, Nonlin) and ins.fn is F.product and len(ins.xs) == 2 and not ins.params:
        return ins
    return None


def _linear_nonlin(v: Vector) -> Nonlin | None:
    ins = v.instruction
    return ins if isinstance(ins, Nonlin) and ins.linear else None


def master_theorem(
    program: Program,
    backend: str = "auto",
    quadrature_orders: dict[int, int] | None = None,
    max_quadrature_dim: int = 3,
    mc_samples: int = 2**16,
    seed: int = 0,
) -> ProgramLimit:
    """The infinite-width limit of a program (TP I's Master Theorem; TP IV's for Netsor⊤).

    Args:
        program: a :class:`tp.Program`; with transposed matrices it is handled by TP IV's
            rule ``Z^{Wx} = Ẑ^{Wx} + Ż^{Wx}`` (no gradient-independence assumption).
        backend: ``"auto"`` (closed form, else quadrature up to ``max_quadrature_dim``
            Gaussian dimensions, else Monte Carlo), or force ``"closed_form"``,
            ``"quadrature"`` or ``"monte_carlo"`` for every expectation.
        quadrature_orders: Gauss–Hermite order per dimension, e.g. ``{1: 200, 2: 80}``.
        mc_samples, seed: Monte Carlo sample count and seed (results are reproducible).

    Returns:
        A :class:`ProgramLimit`; nothing is computed until asked for.
    """
    if not isinstance(program, Program):
        raise TypeError(f"master_theorem takes a tp.Program, got {type(program).__name__}")
    program.validate()
    ex = Expectations(
        cov=lambda a, b: None,  # replaced by the limit's Gaussian basis
        backend=backend,
        quadrature_orders=quadrature_orders,
        max_quadrature_dim=max_quadrature_dim,
        mc_samples=mc_samples,
        seed=seed,
    )
    if languages.infer(program) == "netsor":
        return ProgramLimit(program, ex)
    # Netsor⊤: the equivalent Netsor program with TP IV's Ż corrections (see transpose.py)
    Q, varmap, limit = to_netsor(program, lambda q: ProgramLimit(q, ex))
    limit.source, limit.varmap = program, varmap
    return limit
