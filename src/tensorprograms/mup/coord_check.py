"""Coordinate checks: does every activation keep its size as width grows?

For each width, build the model with :func:`tp.mup.parametrize`, train it a few steps on
fixed data, and record after every module the mean absolute value of its output's
coordinates, at each step (the forward pass before that step's update). A fitted slope
of log(size) against log(width) near 0 means width-independent; > 0 means blow-up.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from tensorprograms.mup.errors import MupError
from tensorprograms.mup.optim import SGD, SUPPORTED, Adam, AdamW
from tensorprograms.mup.parametrize import parametrize
from tensorprograms.mup.shapes import Factory, infer

_OPTIMIZERS = {"sgd": SGD, "adam": Adam, "adamw": AdamW}


@dataclass
class CoordCheckResult:
    """Sizes of every activation across widths and steps.

    ``sizes[i, t, w]``: mean |coordinate| of module ``modules[i]``'s output at step ``t``
    and width ``widths[w]``, averaged over seeds; ``changes[i, t, w]`` the same for the
    change since step 0 (``changes[:, 0] == 0``). ``slopes`` and ``change_slopes``
    ``[i, t]``: least-squares slopes of log value against log width. ``hidden[i]``: the
    activation has a width-dependent dimension (otherwise it is an output, e.g. logits).

    Criterion (TP IV/V): hidden activations keep their size, |slope| <= tolerance at
    every step; every activation's change since init keeps its size at steps >= 1; an
    output's size at init may vanish with width (μP sends it to 0 like width^-1/2) but
    must not grow: slope <= tolerance.
    """

    modules: list[str]
    widths: list[int]
    sizes: np.ndarray
    changes: np.ndarray
    slopes: np.ndarray
    change_slopes: np.ndarray
    hidden: list[bool]
    tolerance: float
    parametrization: str
    optimizer: str

    def failures(self, skip: Sequence[str] = ()) -> list[tuple[str, str, int, float]]:
        """``(module, "size" | "change", step, slope)`` violating the criterion, for
        modules not in ``skip``."""
        tol = self.tolerance
        out = []
        for i, name in enumerate(self.modules):
            if name in skip:
                continue
            for t in range(self.slopes.shape[1]):
                s = float(self.slopes[i, t])
                if self.hidden[i] or t > 0:
                    bad = not np.isfinite(s) or abs(s) > tol
                else:
                    bad = not np.isfinite(s) or s > tol
                if self.hidden[i] and bad:
                    out.append((name, "size", t, s))
                elif not self.hidden[i] and t == 0 and bad:
                    out.append((name, "size", t, s))
                if t > 0:
                    c = float(self.change_slopes[i, t])
                    if not np.isfinite(c) or abs(c) > tol:
                        out.append((name, "change", t, c))
        return out

    def passed(self, skip: Sequence[str] = ()) -> bool:
        """True when no activation violates the criterion (see the class docstring)."""
        return not self.failures(skip)

    def slope(self, module: str, step: int, change: bool = False) -> float:
        """Fitted slope of one module's size (or change) at one step."""
        arr = self.change_slopes if change else self.slopes
        return float(arr[self.modules.index(module), step])

    def summary(self) -> str:
        """A table of slopes, one row per module, one column per step."""
        steps = self.slopes.shape[1]
        head = f"coord check: {self.parametrization} + {self.optimizer}, widths {self.widths}"
        cols = [f"size t={t}" for t in range(steps)] + [f"chg t={t}" for t in range(1, steps)]
        lines = [head, "slopes of log|activation| vs log width", f"{'module':24s} " + " ".join(
            f"{c:>9s}" for c in cols)]
        for i, name in enumerate(self.modules):
            vals = [self.slopes[i, t] for t in range(steps)]
            vals += [self.change_slopes[i, t] for t in range(1, steps)]
            tag = "" if self.hidden[i] else " (out)"
            row = " ".join(f"{v:+9.3f}" for v in vals)
            lines.append(f"{((name or '<root>') + tag):24s} {row}")
        bad = self.failures()
        lines.append(
            f"PASS: all |slope| <= {self.tolerance}"
            if not bad
            else f"FAIL: {len(bad)} (module, step) with |slope| > {self.tolerance}, worst "
            f"{max(bad, key=lambda b: abs(b[3]) if np.isfinite(b[3]) else np.inf)}"
        )
        return "\n".join(lines)

    def plot(self, path: str) -> None:
        """Save a PNG: one panel per step, size against width (log-log), one line per
        module."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker

        steps = self.sizes.shape[1]
        fig, axes = plt.subplots(
            2, steps, figsize=(3.2 * steps, 6.0), squeeze=False
        )
        for row, (arr, label) in enumerate(
            ((self.sizes, "mean |h|"), (self.changes, "mean |h_t - h_0|"))
        ):
            for t in range(steps):
                ax = axes[row, t]
                if row == 1 and t == 0:
                    ax.axis("off")
                    continue
                for i, name in enumerate(self.modules):
                    ax.loglog(self.widths, arr[i, t], marker="o", ms=3, label=name or "<root>")
                ax.set_title(f"step {t}")
                ax.set_xlabel("width")
                ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
                ax.set_xticks(self.widths, [str(w) for w in self.widths])
            axes[row, 0 if row == 0 else min(1, steps - 1)].set_ylabel(label)
        axes[0, -1].legend(fontsize=6, loc="best")
        fig.suptitle(f"{self.parametrization} / {self.optimizer}")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)


class _Recorder:
    """Forward hooks that log mean |output| and mean |output - output at step 0|."""

    def __init__(self, sizes: dict, changes: dict, shapes_seen: dict, wi: int, seed: int):
        self.sizes, self.changes, self.shapes_seen = sizes, changes, shapes_seen
        self.wi, self.seed, self.step = wi, seed, 0
        self.first: dict[str, torch.Tensor] = {}

    def hook(self, name: str) -> Callable[..., None]:
        def fn(mod: nn.Module, inp: Any, out: Any) -> None:
            t = _first_tensor(out)
            if t is None or not t.is_floating_point():
                return
            t = t.detach()
            key = (name, self.step, self.wi)
            if len(self.sizes.get(key, ())) > self.seed:
                return  # a module called twice per forward: keep its first call
            self.sizes.setdefault(key, []).append(float(t.abs().mean()))
            if self.step == 0:
                self.first[name] = t.clone()
                self.shapes_seen[(name, self.wi)] = tuple(t.shape)
            delta = float((t - self.first[name]).abs().mean())
            self.changes.setdefault(key, []).append(delta)

        return fn


def _default_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if y.dtype in (torch.int64, torch.int32):
        return nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))
    return nn.functional.mse_loss(out, y)


def _first_tensor(x: Any) -> torch.Tensor | None:
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, (tuple, list)) and x and isinstance(x[0], torch.Tensor):
        return x[0]
    return None


def coord_check(
    factory: Factory,
    widths: Sequence[int],
    data: tuple[Any, torch.Tensor],
    steps: int = 3,
    *,
    base_width: int | None = None,
    parametrization: str = "mup",
    optimizer: str = "sgd",
    lr: float = 0.1,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    seeds: int = 3,
    tolerance: float = 0.1,
    modules: Callable[[str, nn.Module], bool] | None = None,
    progress: bool = False,
) -> CoordCheckResult:
    """Record activation sizes across ``widths`` over the first ``steps`` steps.

    Args:
        factory: ``width -> nn.Module``.
        widths: at least two widths.
        data: ``(x, y)``: ``x`` a tensor or tuple of tensors (batch on dim 0), ``y``
            targets; the same batch is used at every step.
        steps: number of forward passes recorded (``steps - 1`` updates between them).
        base_width: defaults to ``min(widths)``.
        parametrization: name, as for :func:`tp.mup.parametrize`.
        optimizer: ``"sgd"``, ``"adam"`` or ``"adamw"``.
        lr: base-width learning rate.
        loss_fn: ``(output, y) -> scalar``; cross-entropy for integer ``y``, else MSE.
        seeds: models per width; sizes are averaged over them.
        tolerance: allowed |slope| for :meth:`CoordCheckResult.passed`.
        modules: predicate ``(qualified_name, module) -> bool`` selecting the recorded
            modules (default: all, the root's output named ``""``).
    """
    widths = [int(w) for w in widths]
    if len(widths) < 2:
        raise MupError("coord_check needs at least two widths to fit a slope")
    if steps < 1:
        raise MupError(f"steps must be >= 1, got {steps}")
    if optimizer.lower() not in _OPTIMIZERS:
        raise MupError(f"no known μP rule for optimizer {optimizer!r}; supported: {SUPPORTED}")
    make_opt = _OPTIMIZERS[optimizer.lower()]
    base = min(widths) if base_width is None else base_width
    x, y = data
    xs = x if isinstance(x, tuple) else (x,)
    loss_fn = loss_fn or _default_loss
    names: list[str] | None = None
    sizes: dict[tuple[str, int, int], list[float]] = {}
    changes: dict[tuple[str, int, int], list[float]] = {}
    shapes_seen: dict[tuple[str, int], tuple[int, ...]] = {}
    infos = infer(factory, base)
    jobs = [(wi, w, s) for wi, w in enumerate(widths) for s in range(seeds)]
    with torch.random.fork_rng(devices=[]):  # seeds below must not leak to the caller
        for wi, w, s in tqdm(jobs, desc="coord check", disable=not progress):
            torch.manual_seed(s)
            model = parametrize(
                factory, w, base, parametrization, example_inputs=xs, shapes_info=infos
            )
            chosen = [
                (n, m) for n, m in model.named_modules() if modules is None or modules(n, m)
            ]
            if names is None:
                names = [n for n, _ in chosen]
            rec = _Recorder(sizes, changes, shapes_seen, wi, s)
            handles = []
            for n, m in chosen:
                handles.append(m.register_forward_hook(rec.hook(n)))
            opt = make_opt(model, lr=lr)
            for t in range(steps):
                rec.step = t
                opt.zero_grad()
                loss = loss_fn(model(*xs), y)
                if t < steps - 1:
                    loss.backward()
                    opt.step()
            for h in handles:
                h.remove()
    assert names is not None
    names = [n for n in names if (n, 0, 0) in sizes]

    def table(d: dict[tuple[str, int, int], list[float]]) -> np.ndarray:
        return np.array(
            [[[np.mean(d[(n, t, wi)]) for wi in range(len(widths))] for t in range(steps)]
             for n in names]
        )

    arr, chg = table(sizes), table(changes)
    hidden = [len({shapes_seen[(n, wi)] for wi in range(len(widths))}) > 1 for n in names]
    return CoordCheckResult(
        names, widths, arr, chg, _slopes(arr, widths), _slopes(chg, widths), hidden,
        tolerance, str(parametrization), optimizer,
    )


def _slopes(arr: np.ndarray, widths: list[int]) -> np.ndarray:
    logw = np.log(np.array(widths, dtype=float))
    with np.errstate(divide="ignore", invalid="ignore"):
        logs = np.log(arr)
    flat = logs.reshape(-1, len(widths))
    out = np.full(flat.shape[0], np.nan)
    ok = np.all(np.isfinite(flat), axis=1)
    if ok.any():
        out[ok] = np.polyfit(logw, flat[ok].T, 1)[0]
    return out.reshape(arr.shape[:2])
