"""Stability, nontriviality and regime of an abc-parametrization (TP IV, Thms 3.3-3.5).

The scaling argument, for an MLP with L nonlinear layers (weights W^1 input, W^2..W^L
hidden, W^{L+1} readout) and one step of training from initialisation:

* At init, preactivations are Theta(1) iff a_1 + b_1 = 0 and a_l + b_l = 1/2 for hidden
  layers, and the output is O(1) iff a_{L+1} + b_{L+1} >= 1/2.
* The update of layer l moves the next preactivation by n^(-r_l) per coordinate, with
  - SGD:  r_l = g + 2 a_l + c_l - 1 + [l = 1],  g = min(a_{L+1} + b_{L+1}, 2 a_{L+1} + c_{L+1})
    (g is the size exponent of the backpropagated gradient, set by the readout);
  - Adam: r_l = a_l + c_l - 1 + [l = 1]  (the update is entrywise Theta(n^(-a-c)),
    whatever the gradient's size).
  r = min_l r_l. With one c for every layer and SGD this is TP IV's r.
* The output moves by the readout update, exponent 1 - 2a_{L+1} - c_{L+1} (SGD) or
  1 - a_{L+1} - c_{L+1} (Adam), and by the old readout reading the new features,
  exponent 1 - (a_{L+1} + b_{L+1}) - r.

Stable: init conditions hold, r >= 0 and both output exponents <= 0. Nontrivial: one of
the output exponents is exactly 0. A stable nontrivial parametrization learns features
(r = 0) or is in the kernel regime (r > 0), never both (TP IV's dynamical dichotomy).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tensorprograms.parametrization.abc import ABCParametrization

_TOL = 1e-12


@dataclass(frozen=True)
class Classification:
    """Result of :func:`classify`.

    ``regime`` is one of ``"unstable"``, ``"trivial"``, ``"kernel"``,
    ``"feature learning"``. ``r`` is TP IV's feature-update exponent (features move by
    n^-r). ``reasons`` explains every condition, one sentence each.
    """

    stable: bool
    nontrivial: bool
    regime: str
    r: float
    reasons: list[str] = field(default_factory=list)

    @property
    def feature_learning(self) -> bool:
        return self.regime == "feature learning"

    @property
    def kernel(self) -> bool:
        return self.regime == "kernel"

    def __str__(self) -> str:
        head = f"{self.regime} (stable={self.stable}, nontrivial={self.nontrivial}, r={self.r:g})"
        return "\n".join([head, *("  - " + s for s in self.reasons)])


def feature_exponents(p: ABCParametrization, depth: int = 2) -> list[float]:
    """The exponents r_l (l = 1..depth) by which each layer's update moves features."""
    _check_depth(depth)
    out = p.output
    g = min(out.a + out.b, 2 * out.a + out.c)
    rs = []
    for layer in range(1, depth + 1):
        s = p.input if layer == 1 else p.hidden
        first = 1.0 if layer == 1 else 0.0
        if p.optimizer == "sgd":
            rs.append(g + 2 * s.a + s.c - 1 + first)
        else:
            rs.append(s.a + s.c - 1 + first)
    return rs


def classify(p: ABCParametrization, depth: int = 2) -> Classification:
    """Classify ``p`` for an MLP with ``depth`` nonlinear layers (TP IV's L >= 1).

    ``depth=1`` has no hidden n x n weight, so the hidden exponents are ignored.
    """
    _check_depth(depth)
    reasons: list[str] = []
    stable = True
    inp, hid, out = p.input, p.hidden, p.output

    def check(ok: bool, good: str, bad: str) -> bool:
        reasons.append(good if ok else bad)
        return ok

    s = inp.a + inp.b
    stable &= check(
        abs(s) < _TOL,
        f"input layer a+b = {s:g} = 0: first preactivations are Theta(1) at init",
        f"input layer a+b = {s:g} != 0: first preactivations "
        + ("blow up" if s < 0 else "vanish")
        + " at init (need a+b = 0)",
    )
    if depth >= 2:
        s = hid.a + hid.b
        stable &= check(
            abs(s - 0.5) < _TOL,
            f"hidden layers a+b = {s:g} = 1/2: hidden preactivations are Theta(1) at init",
            f"hidden layers a+b = {s:g} != 1/2: hidden preactivations "
            + ("blow up" if s < 0.5 else "vanish")
            + " at init (need a+b = 1/2)",
        )
    s_out = out.a + out.b
    stable &= check(
        s_out >= 0.5 - _TOL,
        f"readout a+b = {s_out:g} >= 1/2: output is O(1) at init",
        f"readout a+b = {s_out:g} < 1/2: output blows up like n^{0.5 - s_out:g} at init",
    )
    r = min(feature_exponents(p, depth))
    stable &= check(
        r >= -_TOL,
        f"r = {r:g} >= 0: feature updates stay O(1)",
        f"r = {r:g} < 0: feature updates blow up like n^{-r:g}",
    )
    if p.optimizer == "sgd":
        e_read = 1 - 2 * out.a - out.c
    else:
        e_read = 1 - out.a - out.c
    e_feat = 1 - s_out - r
    stable &= check(
        e_read <= _TOL,
        f"readout update moves the output by n^{e_read:g} (O(1))",
        f"readout update moves the output by n^{e_read:g}: output blows up in training",
    )
    stable &= check(
        e_feat <= _TOL,
        f"feature updates move the output by n^{e_feat:g} (O(1))",
        f"feature updates move the output by n^{e_feat:g}: output blows up in training",
    )
    nontrivial = abs(e_read) < _TOL or abs(e_feat) < _TOL
    if not stable:
        regime = "unstable"
    elif not nontrivial:
        regime = "trivial"
        reasons.append("the output does not move in the limit (both update exponents < 0)")
    elif abs(r) < _TOL:
        regime = "feature learning"
        reasons.append("r = 0: every layer's features move by Theta(1) (feature learning)")
    else:
        regime = "kernel"
        reasons.append(
            f"r = {r:g} > 0: features freeze in the limit; training is a kernel method"
        )
    return Classification(bool(stable), bool(nontrivial and stable), regime, float(r), reasons)


def _check_depth(depth: int) -> None:
    if not isinstance(depth, int) or depth < 1:
        raise ValueError(f"depth must be an integer >= 1 (TP IV's L), got {depth!r}")
