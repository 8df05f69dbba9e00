"""From an abc-parametrization to concrete per-parameter factors at a width.

Every forward multiplier on a parameter is folded into the parameter itself, using the
abc symmetry (TP IV section 3): a parameter used as ``alpha * w`` with learning rate eta
trains exactly like a parameter ``u = alpha * w`` used as is, with SGD learning rate
``alpha^2 eta`` (weight decay ``lambda / alpha^2``), or with Adam learning rate
``alpha eta`` and epsilon ``eps / alpha``. So the model keeps the user's classes and
forward code; only its initial values and its optimizer's per-parameter settings change.
The only multipliers left in the forward pass act on activations: attention logits and
the readout use of a weight tied to an embedding.

Factors are relative to ``base_width``: all are exactly 1 when ``width == base_width``.
"""

from __future__ import annotations

from dataclasses import dataclass

from tensorprograms.mup.errors import MupError
from tensorprograms.mup.shapes import ParamInfo
from tensorprograms.parametrization import ABCParametrization, LayerScaling, named

FIELDS = (
    "init",
    "sgd_lr",
    "sgd_wd",
    "adam_lr",
    "adam_eps",
    "adam_wd",
    "adamw_wd",
)
_ZERO = LayerScaling(0.0, 0.0, 0.0)


@dataclass(frozen=True)
class ParamRule:
    """Multiplicative factors for one parameter at one width (see module docstring).

    ``init`` rescales the user's initial values; ``*_lr``, ``*_eps``, ``*_wd`` multiply the
    optimizer's learning rate, epsilon and weight decay for this parameter (``adam_wd``
    for Adam's coupled decay, ``adamw_wd`` for AdamW's decoupled one).
    """

    init: float = 1.0
    sgd_lr: float = 1.0
    sgd_wd: float = 1.0
    adam_lr: float = 1.0
    adam_eps: float = 1.0
    adam_wd: float = 1.0
    adamw_wd: float = 1.0

    def as_list(self) -> list[float]:
        return [getattr(self, f) for f in FIELDS]


@dataclass(frozen=True)
class Rules:
    """All rules of a model: per parameter name, plus the activation multiplier of
    each tied readout module (qualified module name -> factor)."""

    params: dict[str, ParamRule]
    readout_multipliers: dict[str, float]


def _scalings(name: str, kind: str) -> tuple[LayerScaling, LayerScaling]:
    if kind == "finite":
        return _ZERO, _ZERO
    return named(name, "sgd").layer(kind), named(name, "adam").layer(kind)  # type: ignore[arg-type]


def _rule(info: ParamInfo, m: float, sgd: LayerScaling, adam: LayerScaling) -> ParamRule:
    if abs((sgd.a + sgd.b) - (adam.a + adam.b)) > 1e-12:
        raise AssertionError("named points must share their initialisation across optimizers")
    k = info.init_exponent
    init = 1.0 if k is None else m ** (k - (sgd.a + sgd.b))
    return ParamRule(
        init=init,
        sgd_lr=m ** -(2 * sgd.a + sgd.c),
        sgd_wd=m ** (2 * sgd.a + sgd.c),
        adam_lr=m ** -(adam.a + adam.c),
        adam_eps=m**adam.a,
        adam_wd=m ** (2 * adam.a + adam.c),
        adamw_wd=m**adam.a,
    )


def _tied_multiplier(name: str, pname: str, m: float) -> float:
    p_sgd, p_adam = named(name, "sgd"), named(name, "adam")
    d_init = (p_sgd.output.a + p_sgd.output.b) - (p_sgd.input.a + p_sgd.input.b)
    d_sgd = (2 * p_sgd.output.a + p_sgd.output.c) - (2 * p_sgd.input.a + p_sgd.input.c)
    d_adam = (p_adam.output.a + p_adam.output.c) - (p_adam.input.a + p_adam.input.c)
    if abs(2 * d_init - d_sgd) > 1e-12 or abs(d_init - d_adam) > 1e-12:
        raise MupError(
            f"parameter {pname!r} is tied between an embedding and a readout, and "
            f"parametrization {name!r} gives those two roles learning rates that no "
            "single shared parameter can follow; untie the weights or use 'mup'"
        )
    return m**-d_init


def build(
    infos: dict[str, ParamInfo], width_mult: float, parametrization: str | ABCParametrization
) -> Rules:
    """Rules for every parameter in ``infos`` at width ``width_mult * base_width``."""
    if isinstance(parametrization, ABCParametrization):
        raise MupError(
            "tp.mup.parametrize takes a parametrization by name ('standard', 'ntk', 'mup', "
            "'meanfield'), because it needs the SGD and the Adam exponents together"
        )
    name = named(parametrization).name
    if name == "standard":
        return Rules({n: ParamRule() for n in infos}, {})
    params: dict[str, ParamRule] = {}
    readouts: dict[str, float] = {}
    for n, info in infos.items():
        params[n] = _rule(info, width_mult, *_scalings(name, info.kind))
        if info.kind == "input" and len(info.owners) > 1:
            mult = _tied_multiplier(name, n, width_mult)
            for mod in info.tied_readout_owners:
                readouts[mod] = mult
    return Rules(params, readouts)
