"""Width inference for parameters, by instantiating the factory at two widths.

Until the frontend can align captured graphs, a parameter's dimensions are compared
between ``factory(base_width)`` and ``factory(probe_factor * base_width)``: a dimension
that grows by exactly ``probe_factor`` is infinite, one that does not change is finite,
anything else is an error. From the infinite dimensions and the owning module's layout
each parameter gets a kind: ``"input"`` (finite fan-in, infinite fan-out: first layers,
biases, norm gains, embeddings), ``"hidden"`` (both infinite), ``"output"`` (infinite
fan-in, finite fan-out) or ``"finite"`` (no infinite dimension).

The same probes measure how the user's initialisation scales with width: the exponent
k in ``rms(param) ~ width^-k``, from the pooled root-mean-square of several probe
instantiations, snapped to the nearest multiple of 1/2.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from tensorprograms.mup.errors import MupError

Factory = Callable[[int], nn.Module]
_TRANSPOSED_LAYOUT = (nn.Embedding, nn.EmbeddingBag)
_CONV_TRANSPOSE = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_MIN_POOLED_ENTRIES = 400
_MAX_PROBES = 32
_SNAP_TOL = 0.2


@dataclass(frozen=True)
class ParamInfo:
    """Width structure of one parameter.

    ``shape_base`` is its shape at ``base_width``; ``infinite`` the indices of
    dimensions proportional to width; ``fan_in_dim``/``fan_out_dim`` the indices of the
    fan-in and fan-out dimensions (None for a 1-D vector's fan-in or a scalar);
    ``kind`` as in the module docstring; ``init_exponent`` the k of ``rms ~ width^-k``
    (None when the parameter is initialised to zero); ``owners`` the qualified names of
    every ``(module, attribute)`` that holds this very Parameter (several when tied).
    """

    name: str
    shape_base: tuple[int, ...]
    infinite: tuple[int, ...]
    fan_in_dim: int | None
    fan_out_dim: int | None
    kind: str
    init_exponent: float | None
    owners: tuple[tuple[str, str], ...]

    @property
    def tied_readout_owners(self) -> tuple[str, ...]:
        """Modules (not Embeddings) that use this parameter as a readout weight."""
        return tuple(m for m, _ in self.owners[1:]) if self.kind == "input" else ()


def _owners(model: nn.Module) -> dict[int, list[tuple[str, str, nn.Module]]]:
    out: dict[int, list[tuple[str, str, nn.Module]]] = {}
    for mname, mod in model.named_modules(remove_duplicate=False):
        for pname, p in mod._parameters.items():
            if p is not None:
                entry = (mname, pname, mod)
                lst = out.setdefault(id(p), [])
                if all(e[2] is not mod or e[1] != pname for e in lst):
                    lst.append(entry)
    return out


def _fan_dims(mod: nn.Module, pname: str, ndim: int) -> tuple[int | None, int | None]:
    if ndim == 0:
        return None, None
    if ndim == 1:
        return None, 0
    if isinstance(mod, _TRANSPOSED_LAYOUT) or isinstance(mod, _CONV_TRANSPOSE):
        return 0, 1
    return 1, 0


def _kind(infinite: set[int], fan_in: int | None, fan_out: int | None, name: str) -> str:
    fin = fan_in in infinite if fan_in is not None else False
    fout = fan_out in infinite if fan_out is not None else False
    other = infinite - {fan_in, fan_out}
    if other:
        raise MupError(
            f"parameter {name!r}: dimension(s) {sorted(other)} grow with width but are "
            "neither its fan-in nor its fan-out (e.g. a convolution kernel size that "
            "depends on width); make them width-independent"
        )
    if fin and fout:
        return "hidden"
    if fout:
        return "input"
    if fin:
        return "output"
    return "finite"


def _build(factory: Factory, width: int) -> nn.Module:
    model = factory(width)
    if not isinstance(model, nn.Module):
        raise MupError(
            f"factory({width}) returned {type(model).__name__}, not a torch.nn.Module; "
            "pass a callable width -> nn.Module"
        )
    return model


def _pooled_rms(factory: Factory, width: int, names: list[str], probes: int) -> dict[str, float]:
    sums = dict.fromkeys(names, 0.0)
    counts = dict.fromkeys(names, 0)
    for i in range(probes):
        torch.manual_seed(10_007 * (i + 1) + width)
        params = dict(_build(factory, width).named_parameters())
        for n in names:
            t = params[n].detach().double()
            sums[n] += float((t * t).sum())
            counts[n] += t.numel()
    return {n: math.sqrt(sums[n] / max(counts[n], 1)) for n in names}


def infer(factory: Factory, base_width: int, probe_factor: int = 4) -> dict[str, ParamInfo]:
    """Infer the :class:`ParamInfo` of every parameter of ``factory``'s models.

    ``factory(width)`` must return an ``nn.Module`` whose width-dependent dimensions are
    proportional to ``width``. The global RNG state is left unchanged.
    """
    if not isinstance(base_width, int) or base_width < 1:
        raise MupError(f"base_width must be a positive integer, got {base_width!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        small = _build(factory, base_width)
        torch.manual_seed(0)
        big = _build(factory, probe_factor * base_width)
    ps, pb = dict(small.named_parameters()), dict(big.named_parameters())
    if list(ps) != list(pb):
        raise MupError(
            f"factory({base_width}) and factory({probe_factor * base_width}) have different "
            f"parameter names ({sorted(set(ps) ^ set(pb))[:5]}...); the factory must build "
            "the same architecture at every width, changing only sizes"
        )
    owners = _owners(small)
    infos: dict[str, ParamInfo] = {}
    for name, p in ps.items():
        q = pb[name]
        if p.dim() != q.dim():
            raise MupError(f"parameter {name!r} changes its number of dimensions with width")
        inf: set[int] = set()
        for d, (s, t) in enumerate(zip(p.shape, q.shape, strict=True)):
            if t == probe_factor * s:
                inf.add(d)
            elif t != s:
                raise MupError(
                    f"parameter {name!r}: dimension {d} is {s} at width {base_width} and "
                    f"{t} at width {probe_factor * base_width}, neither constant nor "
                    "proportional to width; make every width-dependent size a multiple "
                    "of width (e.g. 4 * width, not width + 1)"
                )
        own = owners[id(p)]
        first_mod = own[0][2]
        fan_in, fan_out = _fan_dims(first_mod, own[0][1], p.dim())
        kind = _kind(inf, fan_in, fan_out, name)
        for mname, pname, mod in own[1:]:
            other = _kind(inf, *_fan_dims(mod, pname, p.dim()), name)
            if {kind, other} == {"input", "output"}:
                continue  # tied embedding / readout, handled by the caller
            if other != kind:
                raise MupError(
                    f"parameter {name!r} is shared by modules with incompatible roles "
                    f"({kind} in {own[0][0] or '<root>'}, {other} in {mname}); only "
                    "embedding/readout tying is supported"
                )
        if kind == "output" and any(
            isinstance(m, _TRANSPOSED_LAYOUT) for _, _, m in own[1:]
        ):
            kind = "input"
            own = [o for o in own if isinstance(o[2], _TRANSPOSED_LAYOUT)] + [
                o for o in own if not isinstance(o[2], _TRANSPOSED_LAYOUT)
            ]
        infos[name] = ParamInfo(
            name=name,
            shape_base=tuple(p.shape),
            infinite=tuple(sorted(inf)),
            fan_in_dim=fan_in,
            fan_out_dim=fan_out,
            kind=kind,
            init_exponent=None,
            owners=tuple((m, a) for m, a, _ in own),
        )
    if not any(i.infinite for i in infos.values()):
        raise MupError(
            f"no parameter of factory's model changes shape between width {base_width} and "
            f"{probe_factor * base_width}: the model has no width-dependent dimension, so "
            "there is nothing to parametrize; check that the factory actually uses its "
            "width argument"
        )
    _measure_init(factory, base_width, probe_factor, infos)
    return infos


def _measure_init(
    factory: Factory, base_width: int, probe_factor: int, infos: dict[str, ParamInfo]
) -> None:
    names = list(infos)
    smallest = min(math.prod(i.shape_base) or 1 for i in infos.values())
    probes = min(_MAX_PROBES, max(2, math.ceil(_MIN_POOLED_ENTRIES / smallest)))
    with torch.random.fork_rng(devices=[]):
        r0 = _pooled_rms(factory, base_width, names, probes)
        r1 = _pooled_rms(factory, probe_factor * base_width, names, probes)
    for n in names:
        if r0[n] == 0.0 and r1[n] == 0.0:
            k = None
        elif r0[n] == 0.0 or r1[n] == 0.0:
            raise MupError(
                f"parameter {n!r} is initialised to zero at one width but not at another; "
                "its initialisation must scale as a power of width"
            )
        else:
            raw = -math.log(r1[n] / r0[n]) / math.log(probe_factor)
            k = round(2 * raw) / 2
            if abs(raw - k) > _SNAP_TOL:
                warnings.warn(
                    f"parameter {n!r}: its initial scale behaves like width^{-raw:.3f}, not "
                    "a multiple of width^(-1/2); using the measured exponent (noisy)",
                    stacklevel=3,
                )
                k = raw
        infos[n] = ParamInfo(**{**infos[n].__dict__, "init_exponent": k})
