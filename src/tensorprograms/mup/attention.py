"""Attention logits: from 1/sqrt(d) to 1/d scaling, without touching the user's code.

μP scales attention logits by 1/d (d the head dimension) instead of 1/sqrt(d) (TP V,
section 4). At ``base_width`` nothing must change, so the logits are multiplied by
``sqrt(d_base / d)``; head dimensions that do not grow with width are left alone.

Detection: ``nn.MultiheadAttention`` modules are found statically; calls to
``torch.nn.functional.scaled_dot_product_attention`` and
``torch.nn.functional.multi_head_attention_forward``, and hand-written logits
(``(q @ k.transpose(-2, -1)) / math.sqrt(d)`` or ``* d ** -0.5``) are recorded by
running the model at base width and at the target width on example inputs under a
``TorchFunctionMode``, and aligned call by call.

At run time a forward pre-hook on each module that runs attention (an
``nn.MultiheadAttention``, or a module whose ``forward`` calls SDPA; the root module if
none is found) enters :class:`AttentionScaler` (a ``TorchFunctionMode``) and a forward
hook leaves it. The factors live in that module's registered buffer
``tp_mup_attention`` (rows ``[d, factor]``), so they travel with ``state_dict``,
``torch.save``, ``deepcopy`` and wrappers.
"""

from __future__ import annotations

import inspect
import math
import threading
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from tensorprograms.mup.errors import MupError

BUFFER = "tp_mup_attention"
_SDPA = F.scaled_dot_product_attention
_MHA = F.multi_head_attention_forward


def _mha_head_dim(args: tuple, kwargs: dict) -> int:
    embed_dim = args[3] if len(args) > 3 else kwargs["embed_dim_to_check"]
    heads = args[4] if len(args) > 4 else kwargs["num_heads"]
    return int(embed_dim) // int(heads)


_MATMULS = (torch.matmul, torch.bmm, torch._C.TensorBase.matmul, torch._C.TensorBase.bmm)
_DIVS = (torch.div, torch.true_divide, torch._C.TensorBase.div)
_MULS = (torch.mul, torch._C.TensorBase.mul)


class _Explicit:
    """Finds logits written out by hand: ``(q @ k^T) / sqrt(d)`` or ``* d**-0.5``.

    A batched matmul contracting a dimension of size d tags its result; a later
    division of a tagged tensor by sqrt(d) (or multiplication by 1/sqrt(d)) is the
    attention's scaling.
    """

    def __init__(self) -> None:
        self.tags: dict[int, tuple[int, torch.Tensor]] = {}

    def after(self, func: Any, args: tuple, out: Any) -> None:
        if func in _MATMULS and len(args) >= 2:
            a, b = args[0], args[1]
            if (
                isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
                and a.dim() >= 3 and b.dim() >= 3 and a.shape[-1] == b.shape[-2]
            ):
                self.tags[id(out)] = (int(a.shape[-1]), out)

    def match(self, func: Any, args: tuple) -> tuple[int, int, str] | None:
        """(head dim, index of the scalar argument, "div" | "mul") or None."""
        if len(args) != 2:
            return None
        if func in _DIVS and isinstance(args[1], (int, float)):
            t, i, kind = args[0], 1, "div"
        elif func in _MULS and isinstance(args[1], (int, float)):
            t, i, kind = args[0], 1, "mul"
        elif func in _MULS and isinstance(args[0], (int, float)):
            t, i, kind = args[1], 0, "mul"
        else:
            return None
        tag = self.tags.get(id(t))
        if tag is None or tag[1] is not t:
            return None
        d, s = tag[0], float(args[i])
        want = math.sqrt(d) if kind == "div" else 1.0 / math.sqrt(d)
        return (d, i, kind) if math.isclose(s, want, rel_tol=1e-6) else None


class _Recorder(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, int]] = []
        self.explicit = _Explicit()

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None):
        kwargs = kwargs or {}
        if func is _SDPA:
            self.calls.append(("sdpa", int(args[0].shape[-1])))
        elif func is _MHA:
            self.calls.append(("mha", _mha_head_dim(args, kwargs)))
        else:
            hit = self.explicit.match(func, args)
            if hit is not None:
                self.calls.append(("explicit", hit[0]))
        out = func(*args, **kwargs)
        self.explicit.after(func, args, out)
        return out


def record(model: nn.Module, example_inputs: Any) -> list[tuple[str, int]]:
    """The attention calls of one forward pass: ``[(kind, head_dim), ...]``."""
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    rec = _Recorder()
    # A train-mode forward updates buffers (BatchNorm running statistics); the model
    # must come out exactly as the factory built it.
    saved = {n: b.clone() for n, b in model.named_buffers()}
    try:
        with torch.no_grad(), rec:
            model(*inputs)
    finally:
        with torch.no_grad():
            for n, b in model.named_buffers():
                if n in saved:
                    b.copy_(saved[n])
    return rec.calls


def factors(base: list[tuple[str, int]], wide: list[tuple[str, int]]) -> dict[int, float]:
    """Map head dim at the target width -> logit multiplier ``sqrt(d_base / d)``."""
    if [k for k, _ in base] != [k for k, _ in wide]:
        raise MupError(
            "the model's attention calls differ between base width and target width on the "
            "same example inputs; attention must not depend on width through control flow"
        )
    out: dict[int, float] = {}
    for (_, db), (_, dw) in zip(base, wide, strict=True):
        f = math.sqrt(db / dw)
        if out.get(dw, f) != f:
            raise MupError(
                f"two attention calls with head dim {dw} at the target width have different "
                "head dims at base width; give them distinct head dims"
            )
        if dw != db:
            out[dw] = f
    return out


def static_factors(base: nn.Module, wide: nn.Module) -> dict[int, float]:
    """Factors for every ``nn.MultiheadAttention`` (found without running the model)."""
    b = [m for m in base.modules() if isinstance(m, nn.MultiheadAttention)]
    w = [m for m in wide.modules() if isinstance(m, nn.MultiheadAttention)]
    return factors([("mha", m.head_dim) for m in b], [("mha", m.head_dim) for m in w])


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """Modules that run attention themselves: ``nn.MultiheadAttention`` and modules
    whose class's ``forward`` source calls ``scaled_dot_product_attention``."""
    out = []
    verdict: dict[type, bool] = {}
    for m in model.modules():
        cls = type(m)
        if cls not in verdict:
            if issubclass(cls, nn.MultiheadAttention):
                verdict[cls] = True
            elif cls.__module__.startswith("torch."):
                verdict[cls] = False
            else:
                try:
                    verdict[cls] = "scaled_dot_product_attention" in inspect.getsource(cls.forward)
                except (OSError, TypeError):
                    verdict[cls] = False
        if verdict[cls]:
            out.append(m)
    return out


def uses_functional_attention(model: nn.Module) -> bool:
    """Whether some module's ``forward`` source calls scaled_dot_product_attention or
    looks like hand-written attention (a matmul and a square root)."""
    if any(not isinstance(m, nn.MultiheadAttention) for m in attention_modules(model)):
        return True
    for cls in {type(m) for m in model.modules()}:
        if cls.__module__.startswith("torch."):
            continue
        try:
            src = inspect.getsource(cls.forward)
        except (OSError, TypeError):
            continue
        if ("@" in src or "matmul" in src or "bmm" in src) and ("sqrt" in src or "**" in src):
            return True
    return False


class AttentionScaler(TorchFunctionMode):
    """Multiplies the logits of every attention call whose head dim is in ``table``."""

    def __init__(self, table: dict[int, float]) -> None:
        super().__init__()
        self.table = table
        self.explicit = _Explicit()

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None):
        kwargs = dict(kwargs or {})
        hit = self.explicit.match(func, args)
        if hit is not None and hit[0] in self.table:
            d, i, kind = hit
            f = self.table[d]
            s = float(args[i])
            args = tuple((s / f if kind == "div" else s * f) if j == i else a
                         for j, a in enumerate(args))
        elif func is _SDPA:
            d = int(args[0].shape[-1])
            f = self.table.get(d)
            if f is not None:
                base = kwargs.get("scale")
                kwargs["scale"] = f * (1.0 / math.sqrt(d) if base is None else base)
        elif func is _MHA:
            f = self.table.get(_mha_head_dim(args, kwargs))
            if f is not None:
                args, kwargs = _scale_mha_query(args, kwargs, f)
        out = func(*args, **kwargs)
        self.explicit.after(func, args, out)
        return out


_MHA_PARAMS = inspect.signature(_MHA).parameters


def _scale_mha_query(args: tuple, kwargs: dict, f: float) -> tuple[tuple, dict]:
    # Scaling the query projection (weight and bias) by f scales q.k by f exactly, and
    # autograd carries the factor into the gradients like any forward multiplier.
    bound = dict(zip(_MHA_PARAMS, args, strict=False))
    bound.update(kwargs)
    e = int(bound["embed_dim_to_check"])
    if bound.get("use_separate_proj_weight", False):
        bound["q_proj_weight"] = bound["q_proj_weight"] * f
    else:
        w = bound["in_proj_weight"]
        scale = torch.ones(w.shape[0], 1, dtype=w.dtype, device=w.device)
        scale[:e] = f
        bound["in_proj_weight"] = w * scale
    b = bound.get("in_proj_bias")
    if b is not None:
        scale_b = torch.ones_like(b)
        scale_b[:e] = f
        bound["in_proj_bias"] = b * scale_b
    return (), bound


def _table(module: nn.Module) -> dict[int, float]:
    buf = getattr(module, BUFFER)
    return {int(d): float(f) for d, f in buf.tolist()}


# Per thread (DataParallel runs replicas in threads): the stack of hooked forwards now
# running, with the mode each entered (None when an outer hooked module already
# scales, so that nested hooked modules never scale twice).
_ACTIVE = threading.local()


def _stack() -> list[AttentionScaler | None]:
    return _ACTIVE.__dict__.setdefault("stack", [])


class EnterScaler:
    """Forward pre-hook (picklable): enter the attention mode for this forward."""

    def __call__(self, module: nn.Module, args: Any) -> None:
        stack = _stack()
        mode = None
        if not any(m is not None for m in stack):
            mode = AttentionScaler(_table(module))
            mode.__enter__()
        stack.append(mode)


class ExitScaler:
    """Forward hook (picklable, ``always_call``): leave the mode entered above."""

    def __call__(self, module: nn.Module, args: Any, output: Any) -> None:
        stack = _stack()
        if stack:
            mode = stack.pop()
            if mode is not None:
                mode.__exit__(None, None, None)


def install(modules: list[nn.Module], table: dict[int, float]) -> None:
    """Register the buffer and the two hooks on each module that runs attention."""
    rows = [[float(d), float(f)] for d, f in sorted(table.items())]
    for mod in modules:
        buf = torch.tensor(rows, dtype=torch.float64).reshape(-1, 2)
        mod.register_buffer(BUFFER, buf)
        mod.register_forward_pre_hook(EnterScaler())
        mod.register_forward_hook(ExitScaler(), always_call=True)
