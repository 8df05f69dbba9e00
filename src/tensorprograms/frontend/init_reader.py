"""Read the initialization a user's factory actually uses, per parameter, at two widths.

Conventions
-----------
* Every number is **per entry**: ``variances`` is the variance of one entry of the
  parameter, ``means`` its mean. Initial distributions enter the infinite-width limit
  only through these two moments.
* ``factory(width)`` is called once per width under ``torch.manual_seed(seed)`` (inside
  ``torch.random.fork_rng``, so the caller's RNG state is untouched). While it runs,
  the public ``torch.nn.init`` initializers and the Tensor methods ``normal_``,
  ``uniform_``, ``fill_``, ``zero_`` and ``copy_`` are wrapped to record each call:
  which storage it wrote and the distribution its *arguments* define. Only the
  outermost call is recorded (``kaiming_uniform_`` calls ``Tensor.uniform_`` inside).
* Calls are attributed to parameters by storage identity, not tensor identity:
  ``p.data.normal_()`` writes through a different tensor object sharing ``p``'s storage.
  The last call covering a parameter wins.
* The recorded values are checked against the parameter's final values: a later
  ``w.data *= c`` (an affine map of the recorded sample) is read exactly as a rescaling;
  a partial overwrite (``Embedding(padding_idx=...)`` zeroes one row) is reported with a
  warning; anything else falls back to measuring.
* Fallback: sample variance and mean of the entries, with the standard error of the
  variance from the empirical fourth moment, and a ``warnings.warn`` giving the estimate,
  its standard error and the exact override (``variances={name: value}``).

The wrapping is process-global while the factory runs: do not construct models in other
threads meanwhile.
"""

from __future__ import annotations

import fnmatch
import inspect
import math
import sys
import threading
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from ..factory import build

__all__ = ["ParamInit", "fan_in_scaling", "read_initialization"]


@dataclass(frozen=True)
class ParamInit:
    """How one parameter is initialized, read at the two widths ``(w1, w2)``.

    Attributes:
        name: qualified parameter name, as in ``module.named_parameters()``.
        shapes: the parameter's shape at each width.
        variances: per-entry variance at each width.
        means: per-entry mean at each width (1.0 for a LayerNorm weight).
        distribution: ``"normal"``, ``"uniform"``, ``"trunc_normal"``, ``"orthogonal"``,
            ``"sparse"``, ``"constant"``, ``"eye"``, ``"dirac"``, ``"empty"``,
            ``"measured"`` or ``"override"``; ``"a|b"`` when the two widths differ.
        source: human-readable provenance, e.g. ``"nn.init.normal_(mean=0, std=0.02)"``.
        exact: True when read from the initializer's arguments (or stated by the user);
            False when measured from the values.
        stderr: standard errors of the measured variances at each width (0.0 at a width
            read exactly); None when ``exact``.
    """

    name: str
    shapes: tuple[tuple[int, ...], tuple[int, ...]]
    variances: tuple[float, float]
    means: tuple[float, float]
    distribution: str
    source: str
    exact: bool
    stderr: tuple[float, float] | None


@dataclass(frozen=True)
class _Reading:
    """One parameter at one width."""

    distribution: str
    variance: float
    mean: float
    source: str
    exact: bool = True
    stderr: float = 0.0


# ----------------------------------------------------------------------------------------
# Exact moments of each initializer, from its arguments.


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else repr(v)


def _call_text(prefix: str, args: Mapping[str, Any]) -> str:
    shown = ", ".join(f"{k}={_fmt(v)}" for k, v in args.items() if k not in ("tensor", "generator"))
    return f"{prefix}({shown})"


def _uniform(a: float, b: float, source: str) -> _Reading:
    return _Reading("uniform", (b - a) ** 2 / 12.0, (a + b) / 2.0, source)


def _normal(mean: float, std: float, source: str, distribution: str = "normal") -> _Reading:
    return _Reading(distribution, float(std) ** 2, float(mean), source)


def _constant(value: float, source: str) -> _Reading:
    return _Reading("constant", 0.0, float(value), source)


def _trunc_normal(mean: float, std: float, a: float, b: float, source: str) -> _Reading:
    from scipy.stats import truncnorm

    alpha, beta = (a - mean) / std, (b - mean) / std
    m, v = truncnorm.stats(alpha, beta, moments="mv")
    return _Reading("trunc_normal", std**2 * float(v), mean + std * float(m), source)


def _fan(tensor: torch.Tensor, mode: str) -> int:
    # torch's own fan convention (Conv: in_channels * kernel numel), not a re-derivation.
    fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(tensor)
    return fan_in if mode.lower() == "fan_in" else fan_out


def _kaiming(args: Mapping[str, Any], distribution: str, source: str) -> _Reading:
    gain = nn.init.calculate_gain(args["nonlinearity"], args["a"])
    var = gain**2 / _fan(args["tensor"], args["mode"])
    return _Reading(distribution, var, 0.0, source)


def _xavier(args: Mapping[str, Any], distribution: str, source: str) -> _Reading:
    fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(args["tensor"])
    return _Reading(distribution, args["gain"] ** 2 * 2.0 / (fan_in + fan_out), 0.0, source)


def _orthogonal(args: Mapping[str, Any], source: str) -> _Reading:
    # Semi-orthogonal rows (or columns) have unit norm: each entry has variance 1/max(r, c).
    t = args["tensor"]
    rows = t.size(0)
    cols = t.numel() // rows
    return _Reading("orthogonal", args["gain"] ** 2 / max(rows, cols), 0.0, source)


def _sparse(args: Mapping[str, Any], source: str) -> _Reading:
    rows = args["tensor"].size(0)
    kept = 1.0 - math.ceil(args["sparsity"] * rows) / rows
    return _Reading("sparse", kept * args["std"] ** 2, 0.0, source)


def _deterministic(distribution: str, tensor: torch.Tensor, ones: int, source: str) -> _Reading:
    # eye_/dirac_ are fixed 0/1 patterns, not iid entries: no variance; the mean is the
    # fraction of ones. The frontend must treat these as structured, not random, matrices.
    return _Reading(distribution, 0.0, ones / tensor.numel(), source)


def _dirac_ones(args: Mapping[str, Any]) -> int:
    t, groups = args["tensor"], args["groups"]
    return groups * min(t.size(0) // groups, t.size(1))


_INIT_READERS: dict[str, Callable[[Mapping[str, Any], str], _Reading]] = {
    "uniform_": lambda a, s: _uniform(a["a"], a["b"], s),
    "normal_": lambda a, s: _normal(a["mean"], a["std"], s),
    "trunc_normal_": lambda a, s: _trunc_normal(a["mean"], a["std"], a["a"], a["b"], s),
    "constant_": lambda a, s: _constant(a["val"], s),
    "ones_": lambda a, s: _constant(1.0, s),
    "zeros_": lambda a, s: _constant(0.0, s),
    "eye_": lambda a, s: _deterministic("eye", a["tensor"], min(a["tensor"].shape), s),
    "dirac_": lambda a, s: _deterministic("dirac", a["tensor"], _dirac_ones(a), s),
    "xavier_uniform_": lambda a, s: _xavier(a, "uniform", s),
    "xavier_normal_": lambda a, s: _xavier(a, "normal", s),
    "kaiming_uniform_": lambda a, s: _kaiming(a, "uniform", s),
    "kaiming_normal_": lambda a, s: _kaiming(a, "normal", s),
    "orthogonal_": _orthogonal,
    "sparse_": _sparse,
}


def _tensor_method_reading(method: str, args: tuple, kwargs: dict) -> _Reading | None:
    """Moments of ``Tensor.<method>(*args, **kwargs)``; None for ``copy_`` (handled apart)."""
    if method == "normal_":
        mean = kwargs.get("mean", args[0] if len(args) > 0 else 0.0)
        std = kwargs.get("std", args[1] if len(args) > 1 else 1.0)
        return _normal(float(mean), float(std), f"Tensor.normal_({_fmt(float(mean))}, {_fmt(float(std))})")
    if method == "uniform_":
        a = kwargs.get("from", args[0] if len(args) > 0 else 0.0)
        b = kwargs.get("to", args[1] if len(args) > 1 else 1.0)
        return _uniform(float(a), float(b), f"Tensor.uniform_({_fmt(float(a))}, {_fmt(float(b))})")
    if method == "fill_":
        value = float(kwargs.get("value", args[0]))
        return _constant(value, f"Tensor.fill_({_fmt(value)})")
    if method == "zero_":
        return _constant(0.0, "Tensor.zero_()")
    return None


# ----------------------------------------------------------------------------------------
# Recording.


@dataclass
class _Record:
    target: torch.Tensor  # a detached alias: keeps the storage alive, so its address is never reused
    snapshot: torch.Tensor  # the values right after the call
    reading: _Reading


class _Recorder:
    def __init__(self) -> None:
        self.records: dict[tuple, _Record] = {}  # insertion order = call order
        self.depth = 0

    def add(self, tensor: torch.Tensor, reading: _Reading) -> None:
        if tensor.numel() == 0 or tensor.is_meta:
            return
        target = tensor.detach()
        key = _view_key(target)
        # A later call on the same view supersedes the earlier one (and moves to the end).
        self.records.pop(key, None)
        self.records[key] = _Record(target, target.clone(), reading)

    def exact_record(self, tensor: torch.Tensor) -> _Record | None:
        return self.records.get(_view_key(tensor))

    def copied_from(self, values: torch.Tensor) -> _Reading | None:
        """The reading of a recorded sample that ``values`` equals entry for entry.

        ``copy.deepcopy`` (nn.TransformerEncoder's layer clones) and ``clone`` copy
        storage without a Tensor call we see; equality with a random sample identifies
        the copy. The copies are then *identical*, not independent, draws.
        """
        for r in reversed(self.records.values()):
            same = r.snapshot.shape == values.shape and torch.equal(r.snapshot, values)
            if same and r.reading.variance > 0:
                note = ", copied (identical values, not independent)"
                return replace(r.reading, source=r.reading.source + note)
        return None

    def covering(self, param: torch.Tensor) -> tuple[_Record, torch.Tensor] | None:
        """The last record whose write covers every entry of ``param``, and the
        recorded values of those entries."""
        for r in reversed(self.records.values()):
            snap = _covered_snapshot(r, param)
            if snap is not None:
                return r, snap
        return None


def _view_key(t: torch.Tensor) -> tuple:
    return (t.untyped_storage().data_ptr(), t.dtype, t.storage_offset(), tuple(t.shape), t.stride())


def _covered_snapshot(r: _Record, p: torch.Tensor) -> torch.Tensor | None:
    t = r.target
    if t.untyped_storage().data_ptr() != p.untyped_storage().data_ptr() or t.dtype != p.dtype:
        return None
    if _view_key(t) == _view_key(p):
        return r.snapshot
    if not t.is_contiguous():
        return None
    rel = p.storage_offset() - t.storage_offset()
    last = rel + sum((s - 1) * st for s, st in zip(p.shape, p.stride()))
    if rel < 0 or last >= t.numel():
        return None
    # p is a strided view inside the contiguous block t: read it out of the snapshot.
    return torch.as_strided(r.snapshot.reshape(-1), tuple(p.shape), p.stride(), rel)


_ACTIVE: _Recorder | None = None
_LOCK = threading.Lock()
_TENSOR_METHODS = ("normal_", "uniform_", "fill_", "zero_", "copy_")


def _wrap_init(name: str, original: Callable) -> Callable:
    signature = inspect.signature(original)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        rec = _ACTIVE
        if rec is None or rec.depth > 0:
            return original(*args, **kwargs)
        rec.depth += 1
        try:
            out = original(*args, **kwargs)
        finally:
            rec.depth -= 1
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        values = dict(bound.arguments)
        tensor = values.get("tensor")
        if isinstance(tensor, torch.Tensor):
            rec.add(tensor, _INIT_READERS[name](values, _call_text(f"nn.init.{name}", values)))
        return out

    wrapper.__wrapped__ = original  # type: ignore[attr-defined]
    wrapper.__name__ = name
    return wrapper


def _wrap_method(name: str, original: Callable) -> Callable:
    def wrapper(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        rec = _ACTIVE
        if rec is None or rec.depth > 0:
            return original(self, *args, **kwargs)
        rec.depth += 1
        try:
            out = original(self, *args, **kwargs)
        finally:
            rec.depth -= 1
        if name == "copy_":
            # A copy of a recorded tensor carries its reading (Conv's channels_last path
            # initializes a temporary and copies it in); any other copy is left to the
            # final-value check, which sees it as an unrecorded write.
            src = args[0] if args else kwargs.get("src")
            found = rec.exact_record(src) if isinstance(src, torch.Tensor) else None
            if found is not None and torch.equal(found.snapshot, src.detach()):
                rec.add(self, replace(found.reading, source=found.reading.source + ", copied"))
        else:
            reading = _tensor_method_reading(name, args, kwargs)
            if reading is not None:
                rec.add(self, reading)
        return out

    wrapper.__name__ = name
    return wrapper


@contextmanager
def _recording() -> Iterator[_Recorder]:
    global _ACTIVE
    if not _LOCK.acquire(blocking=False):
        raise RuntimeError(
            "read_initialization is already running (nested or in another thread); "
            "it patches torch.nn.init globally, so call it once at a time"
        )
    originals = {id(getattr(nn.init, n)): (n, getattr(nn.init, n)) for n in _INIT_READERS}
    wrappers = {i: _wrap_init(n, f) for i, (n, f) in originals.items()}
    patched: list[tuple[dict, str, Any]] = []
    method_state = {m: torch.Tensor.__dict__.get(m) for m in _TENSOR_METHODS}
    try:
        # Patch every module global bound to an initializer, so `from torch.nn.init import
        # xavier_uniform_` (nn.MultiheadAttention, user code) is seen as the outer call.
        for mod in list(sys.modules.values()):
            try:
                d = vars(mod)
            except TypeError:
                continue
            if not isinstance(d, dict):
                continue
            hits = [(k, v) for k, v in list(d.items()) if id(v) in originals and v is originals[id(v)][1]]
            for k, v in hits:
                patched.append((d, k, v))
                d[k] = wrappers[id(v)]
        for m in _TENSOR_METHODS:
            setattr(torch.Tensor, m, _wrap_method(m, getattr(torch.Tensor, m)))
        _ACTIVE = _Recorder()
        yield _ACTIVE
    finally:
        _ACTIVE = None
        for d, k, v in patched:
            d[k] = v
        for m, orig in method_state.items():
            if orig is None:
                delattr(torch.Tensor, m)
            else:
                setattr(torch.Tensor, m, orig)
        _LOCK.release()


# ----------------------------------------------------------------------------------------
# Resolving each parameter's reading at one width.


def _measure(values: torch.Tensor, reason: str) -> _Reading:
    x = values.detach().double().reshape(-1)
    m = x.numel()
    mean = float(x.mean())
    s2 = float(x.var(unbiased=True))
    m4 = float(((x - mean) ** 4).mean())
    # Var(s^2) = (mu4 - (m-3)/(m-1) sigma^4)/m, with sample moments plugged in
    # (no normality assumed: init distributions are often uniform).
    se = math.sqrt(max(m4 - (m - 3) / (m - 1) * s2**2, 0.0) / m)
    return _Reading("measured", s2, mean, f"measured ({reason})", exact=False, stderr=se)


def _affine_fit(x: torch.Tensor, y: torch.Tensor) -> tuple[float, float] | None:
    """(c, d) with y == c*x + d up to float rounding, or None."""
    x, y = x.double().reshape(-1), y.double().reshape(-1)
    xc = x - x.mean()
    sxx = float(xc @ xc)
    if sxx == 0.0:
        return None
    c = float(xc @ (y - y.mean())) / sxx
    d = float(y.mean()) - c * float(x.mean())
    return c, d


def _is_affine(x: torch.Tensor, y: torch.Tensor, c: float, d: float, dtype: torch.dtype) -> bool:
    eps = torch.finfo(dtype).eps
    xd, yd = x.double().reshape(-1), y.double().reshape(-1)
    scale = float(yd.abs().max()) + abs(d) + abs(c) * float(xd.abs().max())
    # Each stored value is c*x + d rounded to the parameter's dtype (a few ulps at most).
    return float((yd - (c * xd + d)).abs().max()) <= 8 * eps * scale


def _resolve(name: str, width: int, param: torch.Tensor, rec: _Recorder) -> tuple[_Reading, str | None]:
    """The reading of one parameter, and a warning about a partial overwrite, if any."""
    values = param.detach()
    if values.numel() == 0:
        return _Reading("empty", 0.0, 0.0, "no entries"), None
    found = rec.covering(values)
    if found is None:
        copied = rec.copied_from(values)
        if copied is not None:
            return copied, None
        return _unrecorded(values, "no initializer call wrote it"), None
    record, snap = found
    r = record.reading
    if torch.equal(snap, values):
        return r, None
    fit = _affine_fit(snap, values)
    if fit is not None and _is_affine(snap, values, *fit, values.dtype):
        c, d = fit
        shift = "" if d == 0.0 else f", then +{_fmt(d)}"
        return replace(r, variance=c * c * r.variance, mean=c * r.mean + d,
                       source=f"{r.source}, then ×{_fmt(c)}{shift} (read from the values)"), None
    changed = int((snap != values).sum())
    if changed < values.numel():
        note = f"width {width}: {changed} of {values.numel()} entries"
        return replace(r, source=f"{r.source}; some entries later overwritten"), note
    return _unrecorded(values, f"values changed after {r.source} by an unrecorded operation"), None


def _unrecorded(values: torch.Tensor, reason: str) -> _Reading:
    flat = values.reshape(-1)
    if bool((flat == flat[0]).all()):
        # torch.ones/full/tensor(c) wrapped in nn.Parameter: a constant, whatever the width.
        return _constant(float(flat[0]), f"constant {_fmt(float(flat[0]))} read from the values ({reason})")
    return _measure(values, reason)


# ----------------------------------------------------------------------------------------
# Public entry points.


def _check_widths(widths: Any) -> tuple[int, int]:
    ok = (isinstance(widths, tuple | list) and len(widths) == 2
          and all(isinstance(w, int) and not isinstance(w, bool) and w > 0 for w in widths))
    if not ok or widths[0] == widths[1]:
        raise ValueError(f"widths must be two different positive integers, e.g. (64, 128); got {widths!r}")
    return int(widths[0]), int(widths[1])


def _build(factory: Callable[[int], nn.Module], width: int, seed: int) -> tuple[dict, dict, dict]:
    with _recording() as rec:
        model = build(factory, width, seed)
        params = dict(model.named_parameters())
        for name, p in params.items():
            if not bool(torch.isfinite(p.detach()).all()):
                raise ValueError(
                    f"parameter '{name}' holds NaN or Inf after factory({width}) initialized it; "
                    f"fix the initialization (e.g. a zero fan-in or a division by zero)"
                )
        readings, notes = {}, {}
        for name, p in params.items():
            readings[name], note = _resolve(name, width, p, rec)
            if note:
                notes[name] = note
    return {n: tuple(p.shape) for n, p in params.items()}, readings, notes


def _override_for(name: str, variances: Mapping[str, Any]) -> tuple[str, Any] | None:
    if name in variances:
        return name, variances[name]
    hits = [(k, v) for k, v in variances.items() if fnmatch.fnmatchcase(name, k)]
    if len({repr(v) for _, v in hits}) > 1:
        raise ValueError(
            f"parameter '{name}' matches several overrides with different values: "
            f"{[k for k, _ in hits]}; make the patterns disjoint or name it exactly"
        )
    return hits[0] if hits else None


def _override_pair(key: str, value: Any) -> tuple[float, float]:
    pair = tuple(value) if isinstance(value, tuple | list) else (value, value)
    ok = len(pair) == 2 and all(isinstance(v, int | float) and not isinstance(v, bool) for v in pair)
    if not ok or not all(math.isfinite(v) and v >= 0 for v in pair):
        raise ValueError(
            f"variances['{key}'] = {value!r}: give a finite per-entry variance >= 0, "
            f"or a pair (variance at widths[0], variance at widths[1])"
        )
    return float(pair[0]), float(pair[1])


def _merge(name: str, shapes: tuple, r1: _Reading, r2: _Reading) -> ParamInit:
    same = r1.distribution == r2.distribution
    exact = r1.exact and r2.exact
    return ParamInit(
        name=name,
        shapes=shapes,
        variances=(r1.variance, r2.variance),
        means=(r1.mean, r2.mean),
        distribution=r1.distribution if same else f"{r1.distribution}|{r2.distribution}",
        source=r1.source if r1.source == r2.source else f"{r1.source} | {r2.source}",
        exact=exact,
        stderr=None if exact else (r1.stderr, r2.stderr),
    )


def read_initialization(
    factory: Callable[[int], nn.Module],
    widths: tuple[int, int],
    variances: Mapping[str, float | tuple[float, float]] | None = None,
    seed: int = 0,
) -> dict[str, ParamInit]:
    """Per-parameter initialization of ``factory``'s model, read at two widths.

    Args:
        factory: ``width -> nn.Module``; called once per width under ``torch.manual_seed(seed)``.
        widths: two different widths, e.g. ``(64, 128)``.
        variances: user overrides of the per-entry variance, by exact parameter name or
            ``fnmatch`` glob (``"layers.*.bias"``); a float applies at both widths, a pair
            gives it per width. Overrides win and are marked exact with source
            ``"user override"``; the mean stays the one read (or measured) from the model.
        seed: the RNG seed for both factory calls.

    Returns:
        ``{name: ParamInit}`` in ``named_parameters()`` order.

    Warns:
        ``UserWarning`` for each parameter measured instead of read (with the estimate,
        its standard error and the override that states it exactly), and for each
        parameter partly overwritten after its initializer.

    Raises:
        TypeError: ``factory`` is not callable or does not return an ``nn.Module``.
        ValueError: bad ``widths``/``variances``; NaN/Inf in a parameter; parameter names
            that differ between the two widths; an override matching no parameter.
    """
    if not callable(factory):
        raise TypeError(
            f"factory must be a callable width -> torch.nn.Module (e.g. lambda n: MyNet(n)); "
            f"got {type(factory).__name__}"
        )
    w1, w2 = _check_widths(widths)
    shapes1, read1, notes1 = _build(factory, w1, seed)
    shapes2, read2, notes2 = _build(factory, w2, seed)
    if list(read1) != list(read2):
        only1 = [n for n in read1 if n not in read2]
        only2 = [n for n in read2 if n not in read1]
        raise ValueError(
            f"the model has different parameters at widths {w1} and {w2} (only at {w1}: {only1}; only at "
            f"{w2}: {only2}); the factory must build the same architecture at every width, with only "
            f"sizes depending on the width"
        )
    variances = dict(variances or {})
    used: set[str] = set()
    result: dict[str, ParamInit] = {}
    for name in read1:
        init = _merge(name, (shapes1[name], shapes2[name]), read1[name], read2[name])
        hit = _override_for(name, variances)
        if hit is not None:
            used.add(hit[0])
            init = replace(init, variances=_override_pair(hit[0], hit[1]), distribution="override",
                           source="user override", exact=True, stderr=None)
        elif not init.exact:
            warnings.warn(_measured_message(init, (w1, w2)), stacklevel=2)
        result[name] = init
    unused = sorted(set(variances) - used)
    if unused:
        raise ValueError(
            f"variances overrides {unused} match no parameter; the parameters are {list(read1)}"
        )
    for name in read1:
        if name in notes1 or name in notes2:
            counts = "; ".join(n[name] for n in (notes1, notes2) if name in n)
            warnings.warn(
                f"parameter '{name}': entries were overwritten after its initializer ({counts}), e.g. "
                f"Embedding's padding_idx row; the reading ({result[name].source}) describes the other "
                f"entries only",
                stacklevel=2,
            )
    return result


def _measured_message(init: ParamInit, widths: tuple[int, int]) -> str:
    assert init.stderr is not None
    est = "; ".join(
        f"width {w}: variance {v:.4g} ± {se:.2g} (1 s.e.), mean {m:.4g}"
        for w, v, se, m in zip(widths, init.variances, init.stderr, init.means)
    )
    return (
        f"parameter '{init.name}': initialization not read from an init call ({init.source}); "
        f"measured from its entries instead: {est}. State it exactly with "
        f"variances={{'{init.name}': <per-entry variance>}} (or a pair, one per width)"
    )


def fan_in_scaling(init: ParamInit, fan_ins: tuple[int, int]) -> tuple[float, float]:
    """``(σ², k)`` with per-entry variance ``σ² · fan_in^(-k)``, from the two widths.

    ``fan_ins`` are the fan-ins of the layer the parameter belongs to at the two widths
    (for a bias, its layer's weight fan-in). Conventions:

    * fan-in unchanged between the widths (an input layer, or a parameter whose layer
      does not grow): return ``k = 1`` and ``σ² = variance · fan_in``, the conventional
      σ²/fan_in reading; the two variances must then agree.
    * variance zero at both widths (constants): return ``(0.0, 0.0)``.
    * for measured inits, ``k`` carries their Monte Carlo noise.

    Raises:
        ValueError: non-positive fan-ins, negative or non-finite variances, or two
            variances no power law of the fan-in fits (zero at one width only, or
            different at equal fan-ins).
    """
    (v1, v2), (f1, f2) = init.variances, fan_ins
    if not all(isinstance(f, int) and f > 0 for f in (f1, f2)):
        raise ValueError(f"fan_ins must be two positive integers; got {fan_ins!r} for '{init.name}'")
    if not all(math.isfinite(v) and v >= 0 for v in (v1, v2)):
        raise ValueError(f"'{init.name}' has variances {init.variances}; they must be finite and >= 0")
    if v1 == 0.0 and v2 == 0.0:
        return 0.0, 0.0
    if v1 == 0.0 or v2 == 0.0:
        raise ValueError(
            f"'{init.name}' has variance {v1:.4g} at fan-in {f1} and {v2:.4g} at fan-in {f2}: zero at "
            f"one width only fits no power law σ²·fan_in^(-k); make the init consistent across widths "
            f"or state it with variances={{'{init.name}': (v1, v2)}}"
        )
    if f1 == f2:
        if not math.isclose(v1, v2, rel_tol=1e-12):
            raise ValueError(
                f"'{init.name}' has fan-in {f1} at both widths but variances {v1:.6g} and {v2:.6g}; "
                f"no power law of the fan-in fits; check which fan-in the layer has"
            )
        return v1 * f1, 1.0
    k = -math.log(v2 / v1) / math.log(f2 / f1)
    return v1 * f1**k, k
