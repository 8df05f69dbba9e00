"""``tp.mup.parametrize``: the user's model at any width, in μP (or SP, NTP, MF)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from tensorprograms.mup import attention, multipliers, rules, shapes
from tensorprograms.mup.errors import MupError
from tensorprograms.parametrization import named


def parametrize(
    factory: shapes.Factory,
    width: int,
    base_width: int,
    parametrization: str = "mup",
    *,
    example_inputs: Any = None,
    shapes_info: dict[str, shapes.ParamInfo] | None = None,
) -> nn.Module:
    """Build ``factory(width)`` and parametrize it relative to ``factory(base_width)``.

    Args:
        factory: ``width -> nn.Module``; width-dependent sizes must be proportional to
            ``width``. Its own initialisation defines the model at ``base_width``.
        width: the width to build.
        base_width: the width at which the returned model is exactly the user's model
            (same outputs, same first optimizer step) and at which hyperparameters are
            tuned.
        parametrization: ``"mup"`` (default), ``"standard"`` (the code as written),
            ``"ntk"`` or ``"meanfield"`` (see :mod:`tensorprograms.parametrization`).
        example_inputs: a tensor or tuple of tensors; needed only when the model calls
            ``F.scaled_dot_product_attention`` in its own code, so that the head
            dimensions of those calls can be read off a forward pass.
        shapes_info: the result of ``tp.mup.infer_shapes(factory, base_width)``, to
            skip re-probing the factory when building many widths.

    Returns:
        The model from ``factory(width)`` (the user's class, unchanged code), with its
        initial values rescaled, μP factors in registered buffers, and - only for
        attention and tied readouts - forward hooks. Train it with :func:`tp.mup.SGD`,
        :func:`tp.mup.Adam`, :func:`tp.mup.AdamW` or :func:`tp.mup.param_groups`.

    The global RNG is consumed exactly as by ``factory(width)``, so seeding before the
    call reproduces the user's model at ``base_width`` bit for bit.
    """
    if not callable(factory):
        raise MupError("factory must be a callable width -> nn.Module")
    for nm, v in (("width", width), ("base_width", base_width)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise MupError(f"{nm} must be a positive integer, got {v!r}")
    name = named(parametrization).name if isinstance(parametrization, str) else parametrization
    model = shapes._build(factory, width)
    infos = shapes.infer(factory, base_width) if shapes_info is None else shapes_info
    m = width / base_width
    _check_width(model, infos, m, width)
    if multipliers.is_parametrized(model):
        raise MupError("factory returned an already parametrized model; pass the plain factory")
    rs = rules.build(infos, m, name)
    by_name = dict(model.named_modules())
    with torch.no_grad():
        for pname, p in model.named_parameters():
            r = rs.params[pname]
            if r.init != 1.0:
                p.mul_(r.init)
            mname, attr = infos[pname].owners[0]
            multipliers.attach_rule(by_name[mname], attr, r)
    for mname, factor in rs.readout_multipliers.items():
        multipliers.attach_readout(by_name[mname], factor)
    if name != "standard":
        _attention(factory, base_width, model, example_inputs)
    model.register_buffer(multipliers.META, torch.tensor([width, base_width], dtype=torch.int64))
    return model


def _check_width(model: nn.Module, infos: dict[str, shapes.ParamInfo], m: float, width: int):
    names = [n for n, _ in model.named_parameters()]
    if names != list(infos):
        raise MupError(
            f"factory({width}) has parameters {sorted(set(names) ^ set(infos))[:5]} that the "
            "base-width model lacks (or vice versa); the factory must build the same "
            "architecture at every width, changing only sizes"
        )
    for pname, p in model.named_parameters():
        info = infos[pname]
        for d in info.infinite:
            if not math.isclose(p.shape[d], m * info.shape_base[d]):
                raise MupError(
                    f"parameter {pname!r} has size {p.shape[d]} in dimension {d} at width "
                    f"{width}, not {m * info.shape_base[d]:g} = width/base_width times its "
                    "base size; width-dependent sizes must be proportional to width"
                )


def _attention(factory: shapes.Factory, base_width: int, model: nn.Module, example: Any):
    with torch.random.fork_rng(devices=[]):
        base = shapes._build(factory, base_width)
    explicit = False
    if example is not None:
        with torch.random.fork_rng(devices=[]):
            calls_base = attention.record(base, example)
            calls = attention.record(model, example)
            table = attention.factors(calls_base, calls)
        explicit = any(kind == "explicit" for kind, _ in calls)
    else:
        if attention.uses_functional_attention(model):
            raise MupError(
                "the model's forward calls scaled_dot_product_attention or looks like "
                "hand-written attention (a matmul and a sqrt); pass example_inputs=... to "
                "tp.mup.parametrize so the head dimension of each attention can be read "
                "off a forward pass and its logits scaled by 1/d"
            )
        table = attention.static_factors(base, model)
    if table:
        # Hand-written attention is only recognisable op by op, so its scaler must be
        # active for the whole forward: hook the root.
        where = [model] if explicit else attention.attention_modules(model) or [model]
        attention.install(where, table)
