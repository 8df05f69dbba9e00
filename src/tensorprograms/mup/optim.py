"""μP optimizers: per-parameter learning rates, epsilons and weight decays.

``tp.mup.SGD(model, lr=...)`` etc. build the torch optimizer with one param group per
distinct factor tuple. Hyperparameters mean what they mean at ``base_width``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from tensorprograms.mup import multipliers
from tensorprograms.mup.errors import MupError

# torch optimizer class -> (rule family, has coupled weight decay, has eps)
_RULES: dict[type, tuple[str, str, bool]] = {
    torch.optim.SGD: ("sgd", "sgd_wd", False),
    torch.optim.Adam: ("adam", "adam_wd", True),
    torch.optim.AdamW: ("adam", "adamw_wd", True),
}
SUPPORTED = ("SGD", "Adam", "AdamW")


def _family(optimizer: str | type) -> tuple[str, str, bool]:
    if isinstance(optimizer, str):
        lookup = {c.__name__.lower(): v for c, v in _RULES.items()}
        if optimizer.lower() in lookup:
            return lookup[optimizer.lower()]
    elif optimizer in _RULES:
        return _RULES[optimizer]
    label = optimizer if isinstance(optimizer, str) else getattr(optimizer, "__name__", optimizer)
    raise MupError(
        f"no known μP rule for optimizer {label!r}; supported: {', '.join(SUPPORTED)} "
        "(torch.optim classes or their names). For another entrywise-normalised optimizer "
        "pass optimizer='adam' to param_groups; for a plain gradient method, 'sgd'"
    )


def param_groups(
    model: nn.Module,
    lr: float,
    optimizer: str | type = "sgd",
    *,
    weight_decay: float = 0.0,
    eps: float | None = None,
) -> list[dict[str, Any]]:
    """Param groups for ``optimizer`` (``"sgd"``, ``"adam"``, ``"adamw"`` or the torch
    class) realising the model's parametrization with base-width hyperparameters
    ``lr``, ``weight_decay`` and, for Adam-type optimizers, ``eps`` (torch's default
    1e-8 if None). Each group is ``{"params": [...], "lr": ..., "weight_decay": ...,
    ["eps": ...]}``; pass the list to any torch optimizer of that family.
    """
    if not multipliers.is_parametrized(model):
        raise MupError(
            "model was not built by tp.mup.parametrize (no μP buffers found); build it with "
            "tp.mup.parametrize(factory, width, base_width)"
        )
    fam, wd_field, has_eps = _family(optimizer)
    if eps is None:
        eps = 1e-8
    groups: dict[tuple[float, ...], dict[str, Any]] = {}
    covered: set[int] = set()
    for p, rule in multipliers.iter_rules(model):
        covered.add(id(p))
        lr_f = rule.sgd_lr if fam == "sgd" else rule.adam_lr
        key = (lr_f, getattr(rule, wd_field), rule.adam_eps if has_eps else 1.0)
        g = groups.get(key)
        if g is None:
            g = {"params": [], "lr": lr * key[0], "weight_decay": weight_decay * key[1]}
            if has_eps:
                g["eps"] = eps * key[2]
            groups[key] = g
        g["params"].append(p)
    missing = [n for n, p in model.named_parameters() if id(p) not in covered]
    if missing:
        raise MupError(
            f"parameters {missing[:5]} have no μP rule: they were added after "
            "tp.mup.parametrize; create every parameter inside the factory"
        )
    return list(groups.values())


def _make(cls: type) -> Callable[..., torch.optim.Optimizer]:
    def build(model: nn.Module, lr: float, **kwargs: Any) -> torch.optim.Optimizer:
        wd = kwargs.pop("weight_decay", 0.0)
        eps = kwargs.pop("eps", None)
        groups = param_groups(model, lr, cls, weight_decay=wd, eps=eps)
        return cls(groups, lr=lr, **kwargs)

    build.__name__ = cls.__name__
    build.__doc__ = (
        f"``torch.optim.{cls.__name__}`` over a ``tp.mup.parametrize``d model, with its "
        "per-parameter μP factors. ``lr``, ``weight_decay`` (and ``eps``) are base-width "
        "values; other keyword arguments go to torch unchanged."
    )
    return build


SGD = _make(torch.optim.SGD)
Adam = _make(torch.optim.Adam)
AdamW = _make(torch.optim.AdamW)
