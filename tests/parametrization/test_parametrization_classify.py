"""tp.parametrization: named points and TP IV's stability / regime classification."""

from __future__ import annotations

import itertools
import random

import pytest

import tensorprograms.parametrization as P
from tensorprograms.parametrization import ABCParametrization, LayerScaling


def tp4_theorem(a: list[float], b: list[float], c: float) -> tuple[bool, bool, bool]:
    """TP IV Theorems 3.3-3.5 as printed (one c for all layers, SGD), written out
    independently of the library: returns (stable, nontrivial, feature_learning).

    a, b have L+1 entries (input, hidden..., output).
    """
    L = len(a) - 1
    r = (
        min(a[L] + b[L], 2 * a[L] + c)
        + c
        - 1
        + min(2 * a[l] + (1 if l == 0 else 0) for l in range(L))
    )
    stable = (
        a[0] + b[0] == 0
        and all(a[l] + b[l] == 0.5 for l in range(1, L))
        and a[L] + b[L] >= 0.5
        and r >= 0
        and 2 * a[L] + c >= 1
        and a[L] + b[L] + r >= 1
    )
    nontrivial = stable and (a[L] + b[L] + r == 1 or 2 * a[L] + c == 1)
    return stable, nontrivial, nontrivial and r == 0


HALVES = [-1.0, -0.5, 0.0, 0.5, 1.0, 1.5]


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_matches_tp4_theorem_on_a_grid(depth: int) -> None:
    # Sample abc points on the half-integer lattice; with one shared c and SGD the
    # per-layer classifier must reduce to TP IV's statement exactly.
    rng = random.Random(depth)
    pts = []
    # Bias the sample towards the stable set, where the interesting distinctions are.
    for _ in range(3000):
        a_in, a_h, a_out, c = (rng.choice(HALVES) for _ in range(4))
        b_in = -a_in if rng.random() < 0.7 else rng.choice(HALVES)
        b_h = 0.5 - a_h if rng.random() < 0.7 else rng.choice(HALVES)
        b_out = rng.choice(HALVES)
        pts.append((a_in, b_in, a_h, b_h, a_out, b_out, c))
    seen = set()
    for a_in, b_in, a_h, b_h, a_out, b_out, c in pts:
        p = ABCParametrization(
            LayerScaling(a_in, b_in, c), LayerScaling(a_h, b_h, c), LayerScaling(a_out, b_out, c)
        )
        a = [a_in] + [a_h] * (depth - 1) + [a_out]
        b = [b_in] + [b_h] * (depth - 1) + [b_out]
        want = tp4_theorem(a, b, c)
        got = P.classify(p, depth)
        assert (got.stable, got.nontrivial, got.feature_learning) == want, (p, got)
        seen.add(want)
    # The sample must cover every outcome, or the test would prove little.
    outcomes = {
        (False, False, False), (True, False, False), (True, True, False), (True, True, True)
    }
    assert outcomes <= seen


@pytest.mark.parametrize("opt", ["sgd", "adam"])
@pytest.mark.parametrize("depth", [1, 2, 4])
def test_named_points(opt: str, depth: int) -> None:
    assert P.classify(P.mup(opt), depth).regime == "feature learning"
    assert P.classify(P.meanfield(opt), depth).regime == "feature learning"
    ntk = P.classify(P.ntk(opt), depth)
    assert ntk.regime == "kernel" and ntk.r == 0.5
    sp = P.classify(P.standard(opt), depth)
    assert not sp.stable and sp.regime == "unstable"
    assert any("blows up" in s or "blow up" in s for s in sp.reasons)


def test_sp_with_lr_one_over_width_is_kernel() -> None:
    # TP IV: SP with learning rate Theta(1/n) is stable and in the kernel regime.
    sp = P.standard("sgd")
    shifted = ABCParametrization(
        LayerScaling(0, 0, 1), LayerScaling(0, 0.5, 1), LayerScaling(0, 0.5, 1)
    )
    assert sp.hidden.c == 0
    cl = P.classify(shifted, 3)
    assert cl.regime == "kernel" and cl.r == 0.5


def test_adam_sp_with_lr_one_over_width_is_unstable() -> None:
    # With Adam, 1/n for every layer still lets the old readout amplify feature updates.
    p = ABCParametrization(
        LayerScaling(0, 0, 1), LayerScaling(0, 0.5, 1), LayerScaling(0, 0.5, 1), "adam"
    )
    cl = P.classify(p, 2)
    assert not cl.stable
    assert any("feature updates move the output" in s and "blows up" in s for s in cl.reasons)


@pytest.mark.parametrize("opt", ["sgd", "adam"])
def test_symmetry_leaves_classification_unchanged(opt: str) -> None:
    for name, kind, theta in itertools.product(P.NAMES, P.KINDS, [-1.0, -0.5, 0.5, 2.0]):
        p = P.named(name, opt)
        q = p.shifted(kind, theta)
        assert q.layer(kind) != p.layer(kind)
        cp, cq = P.classify(p, 3), P.classify(q, 3)
        assert (cp.stable, cp.nontrivial, cp.regime) == (cq.stable, cq.nontrivial, cq.regime)
        assert cp.r == cq.r


def test_mup_matches_tp5_table() -> None:
    # TP V, Table 3 (multipliers on the readout only): init variance, multiplier and
    # learning rate per layer kind, in powers of the width n.
    sgd, adam = P.mup("sgd"), P.mup("adam")
    assert (sgd.input, sgd.hidden, sgd.output) == (
        LayerScaling(0, 0, -1), LayerScaling(0, 0.5, 0), LayerScaling(1, 0, -1)
    )
    assert (adam.input.c, adam.hidden.c, adam.output.c) == (0, 1, 0)


def test_str_explains() -> None:
    text = str(P.classify(P.mup(), 2))
    assert text.startswith("feature learning") and "r = 0" in text


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: P.named("bogus"), "unknown parametrization 'bogus'.*'mup'"),
        (lambda: P.named("mup", "rmsprop"), "optimizer='rmsprop' has no abc rule.*'sgd', 'adam'"),
        (lambda: P.classify(P.mup(), 0), "depth must be an integer >= 1"),
        (lambda: P.mup().layer("middle"), "unknown layer kind 'middle'"),
        (
            lambda: ABCParametrization(
                LayerScaling(0, 0, 0), LayerScaling(0, 0, 0), LayerScaling(0, 0, 0), "lion"
            ),
            "optimizer='lion' has no abc rule",
        ),
    ],
)
def test_bad_input(call, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call()
