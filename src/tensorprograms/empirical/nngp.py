"""Monte Carlo NNGP of the real finite-width PyTorch module.

Conventions (as for the limit, docs/empirical.md):

* per-output kernel: with outputs flattened to ``k`` values per input,
  ``K_s = f(x1) f(x2)ᵀ / k`` for the network of sample ``s``; outputs are iid in the
  limit, so averaging over them is unbiased;
* sample ``s`` is ``factory(width)`` built under ``torch.manual_seed(seed + s)``, so the
  user's own initialization is used as is; models run in float64, eval mode, no grad;
* ``mean`` is the average of ``K_s`` over samples and ``stderr`` its standard error,
  ``sd_s(K_s) / √samples``, computed across samples, not across outputs (the outputs
  of one network are dependent at finite width).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from ..factory import build, eval_mode

__all__ = ["EmpiricalKernel", "nngp"]

# Parameters held at once by a vmapped chunk of models (float64 entries); ~256 MB.
_CHUNK_PARAM_ENTRIES = 2**25


@dataclass
class EmpiricalKernel:
    """Monte Carlo estimate of a per-output kernel (NNGP, or NTK from ``ntk_mean``) at one width.

    Attributes:
        mean: ``[N1, N2]`` float64, average over samples of the per-sample kernel
            (``f(x1) f(x2)ᵀ / k`` for the NNGP).
        stderr: ``[N1, N2]``, standard error of ``mean`` across samples.
        samples: number of independently initialized networks.
        width: the width passed to the factory.
    """

    mean: torch.Tensor
    stderr: torch.Tensor
    samples: int
    width: int


def _check_inputs(x1: torch.Tensor, x2: torch.Tensor | None) -> None:
    for name, x in (("x1", x1), ("x2", x2)):
        if x is None:
            continue
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor batched on dim 0; got {type(x).__name__}")
        if x.dim() < 1 or x.shape[0] == 0:
            raise ValueError(f"{name} must have a non-empty batch dimension 0; got shape {tuple(x.shape)}")
        if x.is_floating_point() and not bool(torch.isfinite(x).all()):
            raise ValueError(f"{name} contains NaN or Inf; remove or impute those inputs first")
    if x2 is not None and x1.shape[1:] != x2.shape[1:]:
        raise ValueError(
            f"x1 and x2 must have the same shape after the batch dimension; got {tuple(x1.shape[1:])} "
            f"and {tuple(x2.shape[1:])}"
        )


def _check_args(factory: Callable, width: int, samples: int, batch_size: int | None) -> None:
    if not callable(factory):
        raise TypeError(f"factory must be a callable width -> torch.nn.Module; got {type(factory).__name__}")
    for name, v, low in (("width", width, 1), ("samples", samples, 2)):
        if not isinstance(v, int) or isinstance(v, bool) or v < low:
            hint = " (a standard error needs at least 2 networks)" if name == "samples" else ""
            raise ValueError(f"{name} must be an integer >= {low}{hint}; got {v!r}")
    if batch_size is not None and (not isinstance(batch_size, int) or isinstance(batch_size, bool)
                                   or batch_size < 1):
        raise ValueError(f"batch_size must be None (automatic) or a positive integer; got {batch_size!r}")


def _build(factory: Callable, width: int, seed: int) -> nn.Module:
    return eval_mode(build(factory, width, seed)).double()


def _as_features(out: object, n: int, where: str) -> torch.Tensor:
    if not isinstance(out, torch.Tensor):
        raise TypeError(
            f"the model returned {type(out).__name__} ({where}); nngp needs a single output tensor "
            f"[N, ...]; wrap the model to return the output you want the kernel of"
        )
    if out.dim() < 1 or out.shape[0] != n:
        raise ValueError(f"the model output has shape {tuple(out.shape)} ({where}); expected batch size {n} "
                         f"on dim 0")
    if not bool(torch.isfinite(out).all()):
        raise ValueError(f"the model output contains NaN or Inf ({where}); check the model and its inputs")
    return out.reshape(n, -1)


def _vmapped(models: list[nn.Module], x: torch.Tensor) -> torch.Tensor:
    """Outputs ``[S, N, ...]`` of all models in one batched call."""
    params, buffers = torch.func.stack_module_state(models)
    base = models[0]

    def run(p: dict, b: dict, inp: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(base, (p, b), (inp,))

    return torch.func.vmap(run, in_dims=(0, 0, None))(params, buffers, x)


def _forward_chunk(models: list[nn.Module], x: torch.Tensor, state: dict) -> Iterator[torch.Tensor]:
    """Each model's output on ``x``: batched with vmap when the model allows it, else a loop.

    The first batched chunk is checked against a plain call of its last model: a model
    that keeps weights outside its registered parameters/buffers would otherwise be
    silently evaluated with the first model's weights.
    """
    if state["vmap"] and len(models) > 1:
        try:
            outs = _vmapped(models, x)
        except Exception:  # noqa: BLE001 - any vmap limitation: evaluate one by one instead
            state["vmap"] = False
        else:
            if not isinstance(outs, torch.Tensor):
                state["vmap"] = False
            elif not state["checked"]:
                plain = models[-1](x)
                state["checked"] = True
                if not (isinstance(plain, torch.Tensor) and plain.shape == outs[-1].shape
                        and torch.allclose(plain, outs[-1], rtol=1e-9, atol=1e-12)):
                    state["vmap"] = False
            if state["vmap"]:
                yield from outs
                return
    for model in models:
        yield model(x)


def nngp(
    factory: Callable[[int], nn.Module],
    width: int,
    x1: torch.Tensor,
    x2: torch.Tensor | None = None,
    samples: int = 64,
    seed: int = 0,
    batch_size: int | None = None,
    progress: bool = False,
) -> EmpiricalKernel:
    """Monte Carlo estimate of the per-output NNGP kernel of ``factory(width)``.

    Args:
        factory: ``width -> nn.Module``; sample ``s`` is built under
            ``torch.manual_seed(seed + s)``.
        width: the width to build.
        x1: inputs ``[N1, ...]`` (batch on dim 0).
        x2: inputs ``[N2, ...]`` with x1's trailing shape; defaults to ``x1``.
        samples: number of independent networks (>= 2).
        seed: seed of the first network.
        batch_size: networks evaluated together (vmapped); None picks a size keeping
            about 256 MB of parameters in memory at once.
        progress: show a tqdm progress bar over networks.

    Returns:
        :class:`EmpiricalKernel` with ``mean`` and ``stderr`` of shape ``[N1, N2]``.

    Raises:
        TypeError / ValueError: a non-callable factory or non-Module result, bad
            ``width``/``samples``/``batch_size``, NaN/Inf inputs, mismatched trailing
            shapes, or a model output that is not a finite tensor batched on dim 0.
    """
    _check_args(factory, width, samples, batch_size)
    _check_inputs(x1, x2)
    n1 = x1.shape[0]
    x = x1 if x2 is None else torch.cat([x1, x2.to(x1.dtype)])
    x = x.double() if x.is_floating_point() else x  # integer inputs (token ids) stay as they are

    mean = torch.zeros(n1, x.shape[0] - n1 if x2 is not None else n1, dtype=torch.float64)
    m2 = torch.zeros_like(mean)  # running sum of squared deviations (Welford)
    count = 0
    state = {"vmap": True, "checked": False}
    bar = _progress(samples, progress)
    chunk = batch_size
    s = 0
    with torch.no_grad():
        while s < samples:
            first = _build(factory, width, seed + s)
            if chunk is None:
                entries = sum(p.numel() for p in first.parameters()) + 1
                chunk = max(1, min(samples, _CHUNK_PARAM_ENTRIES // entries))
            size = min(chunk, samples - s)
            models = [first] + [_build(factory, width, seed + s + j) for j in range(1, size)]
            for out in _forward_chunk(models, x, state):
                f = _as_features(out, x.shape[0], f"width {width}, sample {s}")
                f1, f2 = f[:n1], (f[n1:] if x2 is not None else f[:n1])
                k_s = f1 @ f2.T / f.shape[1]
                count += 1
                delta = k_s - mean
                mean += delta / count
                m2 += delta * (k_s - mean)
                s += 1
                bar.update(1)
    bar.close()
    stderr = torch.sqrt(m2 / (count - 1) / count)
    return EmpiricalKernel(mean=mean, stderr=stderr, samples=count, width=width)


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, enabled: bool, desc: str = "empirical NNGP"):
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="net")
