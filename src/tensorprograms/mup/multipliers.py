"""Where μP state lives on a model: registered buffers, and picklable hooks.

* Per parameter, a buffer ``tp_mup__<attr>`` on the module that first owns it, holding
  its :class:`~tensorprograms.mup.rules.ParamRule` factors in the order of
  ``rules.FIELDS`` (optimizers read these).
* Per tied readout module, a buffer ``tp_mup_readout`` with the activation multiplier
  and a forward pre-hook that scales the module's input by it.
* A root buffer ``tp_mup_meta``: ``[width, base_width]``.

Plain buffers survive ``state_dict``/``load_state_dict``, ``torch.save``/``load``,
``copy.deepcopy`` and wrappers that keep the original modules (``DataParallel`` is
tested; DDP and FSDP with ``use_orig_params=True`` should work the same way, untested).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from tensorprograms.mup.rules import FIELDS, ParamRule

PARAM_PREFIX = "tp_mup__"
READOUT = "tp_mup_readout"
META = "tp_mup_meta"


def attach_rule(module: nn.Module, attr: str, rule: ParamRule) -> None:
    module.register_buffer(PARAM_PREFIX + attr, torch.tensor(rule.as_list(), dtype=torch.float64))


class ScaleInput:
    """Forward pre-hook (picklable): multiply the first input by the module's
    ``tp_mup_readout`` buffer. For a linear readout ``W (s x) + b = s W x + b``, which is
    a multiplier on this use of ``W`` only (the bias is unaffected)."""

    def __call__(self, module: nn.Module, args: tuple) -> tuple:
        s = getattr(module, READOUT)
        return (args[0] * s.to(args[0].dtype), *args[1:])


def attach_readout(module: nn.Module, factor: float) -> None:
    module.register_buffer(READOUT, torch.tensor(factor, dtype=torch.float64))
    module.register_forward_pre_hook(ScaleInput())


def iter_rules(model: nn.Module) -> Iterator[tuple[nn.Parameter, ParamRule]]:
    """Every (parameter, rule) of a parametrized model, each parameter once.

    Works through wrappers (``model.module``) since it walks all submodules.
    """
    seen: set[int] = set()
    for mod in model.modules():
        for name, buf in mod._buffers.items():
            if buf is None or not name.startswith(PARAM_PREFIX):
                continue
            p = mod._parameters.get(name[len(PARAM_PREFIX) :])
            if p is None or id(p) in seen:
                continue
            seen.add(id(p))
            yield p, ParamRule(*[float(v) for v in buf.tolist()])


def is_parametrized(model: nn.Module) -> bool:
    return any(hasattr(m, META) for m in model.modules())


def meta(model: Any) -> tuple[int, int]:
    for m in model.modules():
        if hasattr(m, META):
            w, b = getattr(m, META).tolist()
            return int(w), int(b)
    raise ValueError("not a tp.mup-parametrized model")


assert len(FIELDS) == len(ParamRule().as_list())
