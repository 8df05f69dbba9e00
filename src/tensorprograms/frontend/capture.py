"""Capture a model at two widths with ``torch.export`` and infer which dims grow with width.

Both graphs are decomposed to core ATen and aligned node by node; a dimension whose size
differs between the widths is a *width dimension*, and it must grow proportionally
(size = c·width, e.g. 4·width in an MLP block). Everything else is finite.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import fx

from ..errors import WidthError
from ..factory import build, eval_mode
from .module_checks import check_recurrent_modules


@dataclass
class WidthDims:
    """Sizes of one tensor at the two widths and which of its dims are width dims."""

    small: tuple[int, ...]
    large: tuple[int, ...]
    width_axes: tuple[int, ...]
    ratios: tuple[float, ...]  # size / width for each width axis


@dataclass
class Captured:
    """The aligned graphs: nodes of the small-width export, with width info per node."""

    program: torch.export.ExportedProgram  # at the small width
    nodes: list[fx.Node]
    dims: dict[str, WidthDims]  # node name -> width dims (tensor-valued nodes only)
    param_of: dict[str, str]  # placeholder node name -> parameter/buffer qualified name
    user_inputs: list[str]  # placeholder names of the user's inputs, in order
    widths: tuple[int, int]
    modules: tuple[torch.nn.Module, torch.nn.Module] = field(repr=False)
    large_nodes: list[fx.Node] = field(default_factory=list, repr=False)  # aligned with nodes


def source_line(node: fx.Node) -> str:
    """The user's source location of a node (the last frame of its stack trace)."""
    trace = node.meta.get("stack_trace") or ""
    lines = [ln.strip() for ln in trace.strip().splitlines() if ln.strip().startswith("File ")]
    user = [ln for ln in lines if "/torch/" not in ln]
    pick = user[-1] if user else (lines[-1] if lines else "")
    code = ""
    stripped = [ln.strip() for ln in trace.strip().splitlines()]
    if pick in stripped:
        i = len(stripped) - 1 - stripped[::-1].index(pick)
        if i + 1 < len(stripped) and not stripped[i + 1].startswith("File "):
            code = stripped[i + 1]
    return f"{pick}: {code}" if code else (pick or "<unknown source line>")


def _shape(node: fx.Node) -> tuple[int, ...] | None:
    """The node's shape; for ops returning tuples (max-pool values and indices), the first's."""
    val = node.meta.get("val")
    if isinstance(val, (tuple, list)) and val and isinstance(val[0], torch.Tensor):
        val = val[0]
    if isinstance(val, torch.Tensor):
        return tuple(int(s) for s in val.shape)
    return None


def _export(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> torch.export.ExportedProgram:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch-internal deprecations
            # nn.RNN/GRU/LSTM re-assign their flat weight list while exported: harmless here
            warnings.filterwarnings("ignore", message=r"The tensor attributes .*_flat_weights",
                                    category=UserWarning)
            ep = torch.export.export(model, inputs, strict=False)
            return ep.run_decompositions()
    except Exception as exc:  # noqa: BLE001 - re-raised with a hint
        raise WidthError(
            f"torch.export could not capture the model ({type(exc).__name__}: "
            f"{str(exc).strip().splitlines()[0] if str(exc).strip() else exc}). The frontend "
            "needs a graph without data-dependent Python control flow: replace `if tensor...` "
            "with torch.where, and loops over tensor values with loops over fixed ranges."
        ) from exc


def capture(
    factory: Callable[[int], torch.nn.Module],
    inputs: Sequence[torch.Tensor],
    widths: tuple[int, int],
) -> Captured:
    """Export ``factory(w)`` at both widths on ``inputs`` and align the graphs."""
    w1, w2 = widths
    models = []
    for w in widths:
        models.append(eval_mode(build(factory, w, 0)).double())
        check_recurrent_modules(models[-1])
    inputs = tuple(x.double() if x.is_floating_point() else x for x in inputs)  # token ids stay integer
    eps = [_export(m, inputs) for m in models]
    n1 = [n for n in eps[0].graph.nodes]
    n2 = [n for n in eps[1].graph.nodes]
    if len(n1) != len(n2) or any(a.target != b.target for a, b in zip(n1, n2)):
        raise WidthError(
            f"the model's graph at width {w1} differs from its graph at width {w2} (different "
            "operations). The architecture must be the same at every width; only sizes may change."
        )
    dims: dict[str, WidthDims] = {}
    any_width = False
    for a, b in zip(n1, n2):
        s1, s2 = _shape(a), _shape(b)
        if s1 is None or s2 is None:
            continue
        if len(s1) != len(s2):
            raise WidthError(f"node {a.name} changes rank with width: {s1} vs {s2}")
        axes, ratios = [], []
        for i, (x, y) in enumerate(zip(s1, s2)):
            if x == y:
                continue
            r1, r2 = x / w1, y / w2
            if not math.isclose(r1, r2, rel_tol=1e-9):
                raise WidthError(
                    f"dimension {i} of {a.name} ({source_line(a)}) has size {x} at width {w1} and "
                    f"{y} at width {w2}: it grows with width but not proportionally (size = c·width). "
                    "Make every width-dependent size a fixed multiple of the width."
                )
            axes.append(i)
            ratios.append(r1)
        any_width = any_width or bool(axes)
        dims[a.name] = WidthDims(s1, s2, tuple(axes), tuple(ratios))
    if not any_width:
        raise WidthError(
            f"nothing in the model changes between width {w1} and width {w2}: the factory "
            "ignores its width argument. `factory(width)` must build the model with hidden "
            "sizes proportional to `width`."
        )
    sig = eps[0].graph_signature
    param_of = {}
    user_inputs = []
    for spec in sig.input_specs:
        name = spec.arg.name
        if spec.kind.name in ("PARAMETER", "BUFFER", "CONSTANT_TENSOR"):
            param_of[name] = spec.target
        elif spec.kind.name == "USER_INPUT":
            user_inputs.append(name)
    return Captured(eps[0], n1, dims, param_of, user_inputs, widths, (models[0], models[1]), n2)
