"""``tp.infinite_width``: the infinite-width limit of a PyTorch model."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ..errors import UnsupportedOperation
from ..kernels import NotApplicable, kernels_by_recursion
from ..master import master_theorem, over_seeds
from ..parametrization.abc import ABCParametrization
from ..program.program import Program
from .capture import Captured, capture
from .init_reader import read_initialization
from .lower import Lowering
from .ntk import ntk_of
from .values import Vec

PARAMETRIZATIONS = ("ntk", "standard", "mup")


def _as_tuple(inputs) -> tuple[torch.Tensor, ...]:
    if isinstance(inputs, torch.Tensor):
        return (inputs,)
    if isinstance(inputs, (list, tuple)) and all(isinstance(x, torch.Tensor) for x in inputs):
        return tuple(inputs)
    raise TypeError("example_inputs must be a tensor or a tuple of tensors (batch on dim 0)")


def _check_finite(xs: Sequence[torch.Tensor], what: str) -> None:
    for i, x in enumerate(xs):
        if not _finite(x):
            raise ValueError(f"{what}[{i}] contains NaN or Inf; clean the inputs first.")


def _finite(x: torch.Tensor) -> bool:
    """Whether every entry is finite. CPU float32/64 by numpy: one pass that allocates
    nothing large, where torch's isfinite + all took 100+ ms for 4000 × 784 inputs on the
    loaded 2-core machine (its 2-thread reduction waits for a descheduled thread)."""
    if x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64):
        a = x.detach().numpy()
        return bool(np.isfinite(a.min(initial=0.0)) and np.isfinite(a.max(initial=0.0)))
    return bool(torch.isfinite(x).all())


DEFAULT_SEEDS = 8  # Monte Carlo seeds of the engine behind ``stderr=True``


def _seed_count(stderr: bool, seeds: int | None) -> int:
    """The number of engine seeds behind ``stderr=True`` (``seeds`` alone is an error)."""
    if seeds is not None and not stderr:
        raise ValueError(
            f"seeds={seeds!r} only applies with stderr=True (the kernel is then the mean over that "
            "many Monte Carlo seeds of the engine, with its standard error); pass stderr=True, or "
            "drop seeds= for one deterministic run"
        )
    return DEFAULT_SEEDS if seeds is None else seeds


class InfiniteWidthLimit:
    """The n → ∞ limit of ``factory(width)`` (see :func:`infinite_width`)."""

    def __init__(
        self,
        factory: Callable[[int], torch.nn.Module],
        example_inputs: tuple[torch.Tensor, ...],
        parametrization: str | ABCParametrization,
        widths: tuple[int, int],
        variances: Mapping[str, Any] | None,
        nominal_width: int | None = None,
        base_width: int | None = None,
    ):
        self.factory = factory
        self.base_width = base_width
        self.variances = variances
        self._mlp = None
        self.example_inputs = example_inputs
        self.parametrization = parametrization
        self.nominal_width = nominal_width
        self.widths = widths
        self.variances = dict(variances) if variances is not None else None
        self.inits = read_initialization(factory, widths, variances=variances)
        self.hyperparameters = self._default_hyperparameters()
        self._captured: dict[tuple, Captured] = {}
        self._programs: dict[tuple, tuple[Program, Vec]] = {}
        self._owners: dict = {}  # the NTK's batch owners per program structure (ntk_of)
        if parametrization == "mup":
            # μP's limit at init is degenerate (the output is 0); what it has is training.
            self.program, self.output = None, None
        else:
            self.program, self.output = self._lower(example_inputs)

    def trainer(self, optimizer: str = "sgd", *, lr: float, loss: str = "mse", method: str = "auto",
                particles: int = 2**14, seed: int = 0, betas: tuple[float, float] = (0.9, 0.999),
                eps: float = 1e-8):
        """A trainer of the μP limit (``parametrization="mup"`` only): see
        :func:`tensorprograms.feature_learning.make_trainer` for the arguments."""
        if self.parametrization != "mup":
            raise ValueError(
                f"limit.trainer needs parametrization='mup' (this limit is {self.parametrization!r}, "
                "whose training limit is kernel regression with the NTK)"
            )
        from ..feature_learning.build import check_arguments, make_trainer, read_mlp

        check_arguments(optimizer, lr, loss, method, self.base_width, particles, betas, eps)
        if self._mlp is None:  # the captured MLP and its init laws, read once per limit
            self._mlp = read_mlp(self.factory, self.example_inputs[0], self.base_width, self.variances)
        return make_trainer(self.factory, self.example_inputs[0], self.base_width, optimizer=optimizer,
                            lr=lr, loss=loss, method=method, particles=particles, seed=seed,
                            variances=self.variances, model=self._mlp, betas=betas, eps=eps)

    def __reduce__(self):
        """Pickles as its recipe (factory, inputs, settings, current σ² values) and is rebuilt
        on unpickling, e.g. on Dask workers: captured graphs are not portable. The factory
        must itself pickle (a module-level class or function, or a functools.partial)."""
        hyper = {k: v.detach().clone() for k, v in self.hyperparameters.items()}
        # settings added to the constructor later travel by keyword when present
        extra = {k: getattr(self, k) for k in ("nominal_width",) if hasattr(self, k)}
        return (_rebuild, (self.factory, self.example_inputs, self.parametrization, self.widths,
                           self.variances, hyper, extra))

    def _default_hyperparameters(self) -> dict[str, torch.Tensor]:
        """σ² per parameter: per-entry variance × fan-in (weights), the variance (biases).

        Read from the code at the smaller width. Replace or set ``requires_grad`` on these
        0-d float64 tensors to differentiate the kernels (e.g. a GP marginal likelihood)."""
        out = {}
        for name, init in self.inits.items():
            shape = init.shapes[0]
            fan_in = math.prod(shape[1:]) if len(shape) >= 2 else 1
            out[name] = torch.tensor(float(init.variances[0]) * fan_in, dtype=torch.float64)
        return out

    def _capture(self, inputs: tuple[torch.Tensor, ...]) -> Captured:
        key = tuple(tuple(x.shape) for x in inputs)
        if key not in self._captured:
            self._captured[key] = capture(self.factory, inputs, self.widths)
        return self._captured[key]

    def _lower(self, inputs: tuple[torch.Tensor, ...]) -> tuple[Program, Vec]:
        inputs = tuple(x.to(torch.float64) if x.is_floating_point() else x for x in inputs)
        captured = self._capture(tuple(x.detach() for x in inputs))
        low = Lowering(captured, inputs, self.inits, self.hyperparameters)
        out = low.run()
        self._lowering = low
        if not isinstance(out, Vec) or not out.iid_outputs:
            raise ValueError(
                "the model's output is not a readout of width-sized features (e.g. a final "
                "nn.Linear(width, k)); the infinite-width limit is defined per output unit."
            )
        return low.program, out

    def _inputs(self, x1, x2) -> tuple[tuple[torch.Tensor, ...], int]:
        xs1 = _as_tuple(x1)
        xs2 = _as_tuple(x2) if x2 is not None else None
        for xs, name in ((xs1, "x1"), (xs2, "x2")):
            if xs is None:
                continue
            _check_finite(xs, name)
            if len(xs) != len(self.example_inputs) or any(
                a.shape[1:] != b.shape[1:] for a, b in zip(xs, self.example_inputs)
            ):
                got = [tuple(a.shape) for a in xs]
                want = [("N", *b.shape[1:]) for b in self.example_inputs]
                raise ValueError(f"{name} has shapes {got}; the model takes {want} (batch first).")
        if xs2 is None:
            return xs1, xs1[0].shape[0]
        return tuple(torch.cat([a, b]) for a, b in zip(xs1, xs2)), xs1[0].shape[0]

    def _no_kernels_for_mup(self) -> None:
        if self.parametrization == "mup":
            raise ValueError(
                "a μP limit has no NNGP/NTK to report (its output at init is 0 and its features move); "
                "use limit.trainer(...), or parametrization='ntk' for the kernels"
            )

    def ntk(self, x1, x2=None, *, stderr: bool = False, seeds: int | None = None):
        """The NTK ``[N1, N2]`` (float64, per output unit) in this limit's parametrization.

        Built by TP II's construction: the backward pass appended to the forward program,
        Θ = Σ over parameters and pairs of their uses of E[dh dh'] ⊙ Cov(h, h'), each
        parameter weighted as its parametrization trains it (see docs/frontend.md, "NTK").
        With ``stderr=True``: ``(ntk, standard error)`` as for :meth:`nngp`.
        """
        _seed_count(stderr, seeds)
        if stderr:
            (_, theta), (_, se) = self.kernels(x1, x2, stderr=True, seeds=seeds)
            return theta, se
        return self.kernels(x1, x2)[1]

    def kernels(self, x1, x2=None, *, stderr: bool = False, seeds: int | None = None):
        """``(nngp, ntk)``, each ``[N1, N2]``, from one program (the NTK's forward part is the
        NNGP's program, so the work is shared). With ``stderr=True``:
        ``((nngp, ntk), (nngp_stderr, ntk_stderr))`` over ``seeds`` Monte Carlo seeds (see
        :meth:`nngp`)."""
        k = _seed_count(stderr, seeds)
        if stderr:
            return over_seeds(lambda engine: self._kernels(x1, x2, engine), k)
        return self._kernels(x1, x2, master_theorem)

    def _kernels(self, x1, x2, engine) -> tuple[torch.Tensor, torch.Tensor]:
        self._no_kernels_for_mup()
        if self.parametrization == "standard" and self.nominal_width is None:
            raise ValueError(
                "the standard parametrization's NTK grows linearly with the width (hidden "
                "weights' gradients add up over fan-in n); pass nominal_width=n to "
                "tp.infinite_width to get the NTK at the width you train (the convention of "
                "Sohl-Dickstein et al. 2020 and neural-tangents), or use parametrization='ntk'."
            )
        xs, n1 = self._inputs(x1, x2)
        program, out = self._lower(xs)
        batch = xs[0].shape[0]
        if out.var.shape != (batch,):
            raise ValueError("the NTK needs a [batch, k] output (per-output kernel)")
        low = self._lowering
        model = self._capture(xs).modules[0]
        grads = {name: p.requires_grad for name, p in model.named_parameters()}
        if not any(grads.values()):
            raise ValueError(
                "the model has no trainable parameters (every requires_grad is False): its NTK "
                "is zero. Unfreeze the parameters you train."
            )
        _check_no_trained_ties(low, grads)
        if self.parametrization != "ntk":
            _check_no_split_ghosts(low, grads)
        fast = self._by_recursion(program, out.var, batch, n1 if x2 is not None else None, grads)
        if fast is not None:
            return fast
        contributions, limit = ntk_of(program, out.var, batch, engine,
                                      trainable=lambda v: grads.get(low.param_of.get(v), False),
                                      ghosts=low.ghosts, owner_cache=self._owners)
        ghosts = set(low._ghost_prims.values())
        if isinstance(self.parametrization, ABCParametrization):
            for prim in contributions:  # first the forward pass, then the training scalings
                if prim not in ghosts:
                    self._check_realizes(low.param_of[prim], low)
        theta = torch.zeros(batch, batch, dtype=torch.float64)
        first = True  # start from the first term, not zeros + … (full-size passes count at large N)
        for prim, th in contributions.items():
            weight = self._ntk_weight(low.param_of[prim], prim in ghosts, low)
            if isinstance(weight, float) and weight == 0.0:
                continue
            term = th if isinstance(weight, float) and weight == 1.0 else weight * th
            theta = term if first else theta + term
            first = False
        K = _per_example(limit.second_moment(out.var), batch)
        if x2 is None:
            return K, theta
        return K[:n1, n1:], theta[:n1, n1:]

    def _by_recursion(self, program: Program, output, batch: int, n1: int | None,
                      grads: dict[str, bool] | None):
        """The kernels by the batched recursion over example pairs (kernels/recursion.py; dense
        tiles for programs without positions, kernels/dense.py) when the program is within
        its scope, else None (the engine's path). ``grads`` None: the NNGP alone."""
        low = self._lowering
        if self.parametrization not in ("ntk", "standard"):
            return None
        if torch.is_grad_enabled() and any(h.requires_grad for h in self.hyperparameters.values()):
            return None  # differentiable kernels go through the engine
        weight = None
        if grads is not None:
            def weight(prim):
                name = low.param_of.get(prim)
                if name is None or not grads.get(name, False):
                    return 0.0
                return float(self._ntk_weight(name, prim in ghosts, low))
        ghosts = set(low._ghost_prims.values())
        try:
            return kernels_by_recursion(program, output, batch, weight, n1, ghosts=low.ghosts)
        except NotApplicable:
            return None

    def _ntk_weight(self, name: str, ghost: bool, low: Lowering):
        """The factor of a parameter's contribution Θ_p (its NTK-parametrization term, or
        for a constant-initialized parameter its unit-learning-rate term).

        With per-entry variance v(n) = κ·n^(-k) (k = 1 for fan-in ∝ width, 0 otherwise):
        NTK parametrization 1 (constant-initialized: 0); standard at nominal width n₀
        1/v(n₀) (constant-initialized: 1); an abc-parametrization n^(k−c−2a)/κ, which must
        not grow with n and keeps only the terms with k − c − 2a = 0.
        """
        par = self.parametrization
        if par == "ntk":
            return 0.0 if ghost else 1.0
        if ghost:
            k, v_small = 0, 1.0
        else:
            k, v_small = self._variance_scaling(name, low)
        w1 = self.widths[0]
        if par == "standard":
            return (self.nominal_width / w1) ** k / v_small
        kind = self._kind(name, low)
        s = par.layer(kind)
        e = k - s.c - 2 * s.a
        if e > 1e-9:
            raise ValueError(
                f"the NTK diverges in the {par.name} parametrization: parameter {name!r} "
                f"({kind}) contributes ∝ width^{e:g} (k − c − 2a with k = {k:g}, a = {s.a:g}, "
                f"c = {s.c:g}). Scale its learning rate down (c ≥ {k - 2 * s.a:g}), use "
                "parametrization='ntk', or parametrization='standard' with nominal_width=n."
            )
        if e < -1e-9:
            return 0.0
        return 1.0 / (v_small * w1**k)

    def _check_realizes(self, name: str, low: Lowering) -> None:
        """The code's variance exponent must be the abc point's 2(a+b) for the layer kind."""
        k, _ = self._variance_scaling(name, low)
        kind = self._kind(name, low)
        s = self.parametrization.layer(kind)
        if not math.isclose(k, 2 * (s.a + s.b), abs_tol=1e-9):
            raise ValueError(
                f"parameter {name!r} ({kind} weight) has per-entry variance ∝ width^-{k:g} in "
                f"the code, but the {self.parametrization.name} parametrization's {kind} layers "
                f"have 2(a+b) = {2 * (s.a + s.b):g}: the code does not realize its forward pass. "
                "Kernel limits exist for 2(a+b) = 0 (input) and 1 (hidden, output); write the "
                "model in this parametrization's initialization (tp.mup for μP) or choose another."
            )

    def _variance_scaling(self, name: str, low: Lowering):
        """``(k, v)``: per-entry variance ∝ width^-k, ``v`` at the smaller capture width (from
        the hyperparameters, so gradients flow)."""
        p = low.params[name]
        v1, v2 = (float(v) for v in self.inits[name].variances[:2])
        k = round(math.log(v1 / v2) / math.log(self.widths[1] / self.widths[0]))
        return k, low.v(p)

    @staticmethod
    def _kind(name: str, low: Lowering) -> str:
        """TP IV's layer kinds: fan-in finite → input (biases and gains too); fan-in and
        fan-out ∝ width → hidden; fan-in ∝ width, finite fan-out → output."""
        axes = low.params[name].width_axes
        if len(low.params[name].shape) < 2 or 1 not in axes:
            return "input"
        return "hidden" if 0 in axes else "output"

    def nngp(self, x1, x2=None, *, stderr: bool = False, seeds: int | None = None):
        """The NNGP kernel ``[N1, N2]`` (float64): ``E[f(x1) f(x2)]`` of one output unit.

        With ``stderr=True`` returns ``(nngp, standard error)``: the kernel is computed with
        ``seeds`` (default 8) independent Monte Carlo seeds of the engine and the result is their mean,
        with standard error the spread over √seeds (:func:`tp.master.over_seeds`). Unlike the
        engine's per-expectation errors this includes the Monte Carlo error of every layer
        below (GRU/LSTM gates, batch norm, max-pool). A limit without Monte Carlo
        expectations is computed once and has a zero standard error; otherwise the mean
        over seeds is detached (no gradients to ``hyperparameters``).
        """
        k = _seed_count(stderr, seeds)
        if stderr:
            return over_seeds(lambda engine: self._nngp(x1, x2, engine), k)
        return self._nngp(x1, x2, master_theorem)

    def _nngp(self, x1, x2, engine) -> torch.Tensor:
        self._no_kernels_for_mup()
        xs, n1 = self._inputs(x1, x2)
        program, out = self._lower(xs)
        batch = xs[0].shape[0]
        if out.var.shape == (batch,):
            fast = self._by_recursion(program, out.var, batch, n1 if x2 is not None else None, None)
            if fast is not None:
                return fast[0]
        K = _per_example(engine(program).second_moment(out.var), batch)
        return K if x2 is None else K[:n1, n1:]


def _check_no_trained_ties(low: Lowering, grads: dict[str, bool]) -> None:
    """Deep copies equal at initialization share one matrix in the program (frontend/tied.py):
    right for the forward pass, but trained separately their NTK has no cross terms between
    the copies, which a shared matrix would add."""
    for copy, original in low.tied.items():
        if grads.get(copy, False) or grads.get(original, False):
            raise UnsupportedOperation(
                f"parameters {original!r} and {copy!r} are equal at initialization (deep copies, as "
                "nn.TransformerEncoder and nn.TransformerDecoder make of their layer). The NNGP "
                "treats them as one shared weight, which is what they are at initialization, but the "
                "NTK of separately trained copies is not implemented. Build the layers separately "
                "(e.g. nn.Sequential(*[nn.TransformerEncoderLayer(...) for _ in range(L)])) or "
                "re-initialize the copies (tp.init / nn.init) so that they are independent."
            )


def _check_no_split_ghosts(low: Lowering, grads: dict[str, bool]) -> None:
    """A constant-initialized parameter (an in-projection bias) added to a vector that is split
    into heads of fixed size: its stand-in sits on the unsplit vector, which the backward pass
    does not reach, so its NTK term (counted outside the NTK parametrization) would be lost."""
    for prim, _, target, _ in low.ghosts:
        name = low.param_of.get(prim)
        if target in low.split_sources and grads.get(name, False):
            raise UnsupportedOperation(
                f"the NTK term of {name!r} (initialized to a constant, added to a projection split "
                "into heads of fixed size) is not implemented outside parametrization='ntk'. Use "
                "parametrization='ntk' or freeze it (requires_grad_(False))."
            )


def _rebuild(factory, example_inputs, parametrization, widths, variances, hyper, extra) -> InfiniteWidthLimit:
    limit = InfiniteWidthLimit(factory, example_inputs, parametrization, widths, variances, **extra)
    limit.hyperparameters = hyper
    return limit


def _per_example(K: torch.Tensor, batch: int) -> torch.Tensor:
    """Reduce ``[N, *rest, N, *rest]`` to ``[N, N]`` when the output has extra finite dims
    (e.g. positions): they must be singletons here."""
    rest = K.numel() // (batch * batch)
    if rest != 1:
        raise ValueError(
            "the model's output has finite dimensions besides the batch and the output units; "
            "return a [batch, k] tensor."
        )
    return K.reshape(batch, batch)


def infinite_width(
    factory: Callable[[int], torch.nn.Module],
    example_inputs,
    parametrization: str = "ntk",
    widths: tuple[int, int] = (64, 128),
    variances: Mapping[str, Any] | None = None,
    nominal_width: int | None = None,
    base_width: int | None = None,
) -> InfiniteWidthLimit:
    """The infinite-width limit of the PyTorch model ``factory(width)``.

    Args:
        factory: ``width -> nn.Module``; hidden sizes must be proportional to ``width``.
        example_inputs: a tensor or tuple of tensors, batch on dim 0 (sets input shapes).
        parametrization: how training scales with width, which sets the NTK (the NNGP is
            the same for all): ``"ntk"`` (NTP: each parameter ``σ·ω``, gradients w.r.t.
            ω), ``"standard"`` (the code as written, gradients w.r.t. the parameters,
            evaluated at ``nominal_width``), or a
            :class:`tp.parametrization.ABCParametrization` (TP IV's abc exponents; an error
            if its NTK diverges or the code's initialization does not realize it), or
            ``"mup"``: the maximal-update limit, trained with ``limit.trainer(...)`` (MLPs
            with SGD; see docs/feature-learning.md).
        widths: the two widths at which the model is captured to infer what grows.
        variances: per-parameter overrides of the initial variances read from the code.
        nominal_width: for ``"standard"``: the width ``n`` at which hidden fan-ins enter the
            NTK (it grows ∝ n).
        base_width: ``"mup"`` only: the width at which the model is the user's own and its
            hyperparameters are tuned (``tp.mup.parametrize``'s ``base_width``); default
            ``widths[0]``.
    """
    if not callable(factory):
        raise TypeError("factory must be a callable width -> nn.Module")
    if not isinstance(parametrization, (str, ABCParametrization)):
        raise TypeError(
            "parametrization must be 'ntk', 'standard' or a tp.parametrization.ABCParametrization, "
            f"got {type(parametrization).__name__}"
        )
    if isinstance(parametrization, str) and parametrization not in PARAMETRIZATIONS:
        raise ValueError(
            f"parametrization {parametrization!r} is not supported yet; choose one of "
            f"{PARAMETRIZATIONS} (mean field is not supported yet)."
        )
    if base_width is not None and parametrization != "mup":
        raise ValueError("base_width applies to parametrization='mup' only")
    inputs = _as_tuple(example_inputs)
    _check_finite(inputs, "example_inputs")
    w1, w2 = widths
    if not (isinstance(w1, int) and isinstance(w2, int) and 0 < w1 < w2):
        raise ValueError(f"widths must be two increasing positive integers, got {widths}")
    if nominal_width is not None:
        if parametrization != "standard":
            raise ValueError("nominal_width applies to parametrization='standard' only")
        if not isinstance(nominal_width, int) or nominal_width <= 0:
            raise ValueError(f"nominal_width must be a positive integer, got {nominal_width!r}")
    if parametrization == "mup":
        base_width = w1 if base_width is None else base_width
        if isinstance(base_width, bool) or not isinstance(base_width, int) or base_width < 1:
            raise ValueError(f"base_width must be a positive integer, got {base_width!r}")
    return InfiniteWidthLimit(factory, inputs, parametrization, (w1, w2), variances, nominal_width,
                              base_width)
