"""How user functions are called, and what is learned about them by probing.

Calling convention (used everywhere: finite-width runs, the limit's samples,
quadrature nodes): each vector argument arrives as ``(*batch, *F_i)``, the batch
dims first (width coordinates, samples or quadrature nodes), with ``F_i`` left-padded
by singleton dims to a common rank so that ordinary broadcasting across finite
indices works; scalars arrive with their finite shape ``F_θ``; constants as given.
The function must keep the batch dims and return ``(*batch, *F_out)``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..errors import ProgramError


def common_rank(shapes: Sequence[tuple[int, ...]]) -> int:
    return max((len(s) for s in shapes), default=0)


def pad_finite(value: torch.Tensor, nbatch: int, shape: tuple[int, ...], rank: int) -> torch.Tensor:
    """View ``(*batch, *shape)`` as ``(*batch, 1, …, 1, *shape)`` with ``rank`` finite dims."""
    batch = value.shape[:nbatch]
    return value.reshape(tuple(batch) + (1,) * (rank - len(shape)) + tuple(shape))


class MatrixMap:
    """The linear function ``u -> u @ Aᵀ`` of one vector of finite shape ``(in,)``, for a
    fixed ``A [out, in]`` (an input layer's data). It keeps ``A`` as ``.matrix`` so that
    consumers that need the map's matrix read it instead of probing the function with the
    identity (an ``in × in × out`` product at every call)."""

    __name__ = "matmul"

    def __init__(self, matrix: torch.Tensor):
        self.matrix = matrix

    def __call__(self, u: torch.Tensor) -> torch.Tensor:
        return u @ self.matrix.T


class Gather:
    """The selection ``u -> u.reshape(*batch, -1)[..., index].reshape(*batch, *out_shape)`` of
    one vector of finite shape ``in_shape``: linear, with a known output shape, by
    construction. Programs take it without probing (a Flatten of P positions lowers to P
    selections, and probing each on random inputs cost more than the kernels)."""

    def __init__(self, index: torch.Tensor, in_shape: tuple[int, ...], out_shape: tuple[int, ...],
                 name: str = "gather"):
        self.index, self.in_shape, self.out_shape = index, tuple(in_shape), tuple(out_shape)
        self.__name__ = name
        if index.numel() != math.prod(self.out_shape):
            raise ValueError(f"{name}: {index.numel()} indices for an output of shape {self.out_shape}")

    def __call__(self, u: torch.Tensor) -> torch.Tensor:
        batch = u.shape[: u.ndim - len(self.in_shape)]
        return u.reshape(*batch, -1)[..., self.index].reshape(*batch, *self.out_shape)


def known_linear_shape(fn: Callable, shapes: Sequence[tuple[int, ...]], params: Sequence[Any]):
    """The output shape of a map that is linear by construction (MatrixMap, Gather) applied to
    one vector of the shape it expects, else None (the caller probes)."""
    if params or len(shapes) != 1:
        return None
    if isinstance(fn, MatrixMap) and tuple(shapes[0]) == (fn.matrix.shape[1],):
        return (fn.matrix.shape[0],)
    if isinstance(fn, Gather) and tuple(shapes[0]) == fn.in_shape:
        return fn.out_shape
    return None


def call_full(
    fn: Callable[..., torch.Tensor],
    vectors: Sequence[torch.Tensor],
    vector_shapes: Sequence[tuple[int, ...]],
    params: Sequence[Any],
    nbatch: int,
) -> torch.Tensor:
    """Call ``fn`` by the convention above and return its output."""
    param_shapes = [tuple(p.shape) for p in params if isinstance(p, torch.Tensor)]
    rank = common_rank(list(vector_shapes) + param_shapes)
    args = [pad_finite(v, nbatch, s, rank) for v, s in zip(vectors, vector_shapes, strict=False)]
    return fn(*args, *params)


@functools.lru_cache(maxsize=8)
def _draws(seed: int, shapes: tuple[tuple[int, ...], ...]) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes)


def standard_normal(seed: int, shapes: Sequence[tuple[int, ...]]) -> list[torch.Tensor]:
    """Standard-normal probe inputs of ``shapes``, drawn in order from a generator seeded
    with ``seed``: drawn once per (seed, shapes) and copied (a function may write into its
    arguments). A Flatten lowers to one selection per position, each probed on inputs of
    the same shape; drawing them anew each time cost more than the probes themselves."""
    return [t.clone() for t in _draws(seed, tuple(tuple(s) for s in shapes))]


def probe_output_shape(
    fn: Callable[..., torch.Tensor],
    vector_shapes: Sequence[tuple[int, ...]],
    params: Sequence[Any],
    where: str,
) -> tuple[int, ...]:
    """Run ``fn`` on random inputs to learn its output's finite shape.

    Raises ProgramError when ``fn`` fails on tensors, returns a non-tensor, NaN on
    standard-normal inputs, or drops the leading batch dim.
    """
    draws = standard_normal(0, [(b, *s) for b in (2, 3) for s in vector_shapes])
    outs = []
    for i, batch in enumerate((2, 3)):
        vecs = draws[i * len(vector_shapes):(i + 1) * len(vector_shapes)]
        try:
            out = call_full(fn, vecs, vector_shapes, params, nbatch=1)
        except Exception as exc:  # noqa: BLE001 - any failure of user code is reported the same way
            raise ProgramError(
                f"{where}: the function could not be evaluated on torch tensors "
                f"({type(exc).__name__}: {exc}). A Nonlin's function must accept tensors shaped "
                "(*batch, *finite_shape) and return (*batch, *out_shape); wrap NumPy or math "
                "code in torch operations."
            ) from exc
        if not isinstance(out, torch.Tensor):
            raise ProgramError(
                f"{where}: the function returned {type(out).__name__}, not a torch.Tensor. "
                "Return a tensor shaped (*batch, *out_shape)."
            )
        if out.ndim < 1 or out.shape[0] != batch:
            raise ProgramError(
                f"{where}: the function changed the leading (width/batch) dimension: input batch "
                f"{batch}, output shape {tuple(out.shape)}. Nonlins act coordinatewise in the width "
                "index; reduce or mix only the trailing finite dimensions."
            )
        outs.append(tuple(out.shape[1:]))
    if outs[0] != outs[1]:
        raise ProgramError(f"{where}: the output's finite shape depends on the batch size: {outs}.")
    return outs[0]


def _broadcast_flat(
    value: torch.Tensor, nbatch_shape: tuple[int, ...], shape: tuple[int, ...], out_shape
) -> torch.Tensor:
    rank = len(out_shape)
    v = value.reshape(tuple(nbatch_shape) + (1,) * (rank - len(shape)) + tuple(shape))
    return v.expand(tuple(nbatch_shape) + tuple(out_shape)).reshape(-1)


def is_elementwise(
    fn: Callable[..., torch.Tensor],
    vector_shapes: Sequence[tuple[int, ...]],
    params: Sequence[Any],
    out_shape: tuple[int, ...],
) -> bool:
    """Whether ``fn`` is one scalar function applied at every finite index.

    Tested by behaviour on random probes: called on flat 1-D tensors (everything
    broadcast to the output's finite shape and flattened) it must reproduce the
    full-shape result, change only output j when input j is perturbed, and commute
    with a permutation. An elementwise function lets the engine compute expectations
    pair by pair (low-dimensional Gaussians) instead of jointly over all finite indices.
    """
    param_shapes = [tuple(p.shape) for p in params if isinstance(p, torch.Tensor)]
    if common_rank(list(vector_shapes) + param_shapes) > len(out_shape):
        return False
    gen = torch.Generator().manual_seed(1)
    batch = 3
    vecs = [torch.randn(batch, *s, generator=gen, dtype=torch.float64) for s in vector_shapes]
    tparams = [
        torch.rand(p.shape, generator=gen, dtype=torch.float64) + 0.5
        if isinstance(p, torch.Tensor)
        else p
        for p in params
    ]
    try:
        full = call_full(fn, vecs, vector_shapes, tparams, nbatch=1)
        if tuple(full.shape) != (batch, *out_shape):
            return False
        flat_vecs = [
            _broadcast_flat(v, (batch,), s, out_shape) for v, s in zip(vecs, vector_shapes, strict=False)
        ]
        flat_params = [
            _broadcast_flat(p.expand(batch, *p.shape), (batch,), tuple(p.shape), out_shape)
            if isinstance(p, torch.Tensor)
            else p
            for p in tparams
        ]
        flat = fn(*flat_vecs, *flat_params)
        if not isinstance(flat, torch.Tensor) or flat.shape != flat_vecs[0].shape:
            return False
        if not torch.allclose(flat, full.reshape(-1), rtol=1e-10, atol=1e-12, equal_nan=True):
            return False
        k = flat.numel()
        perm = torch.randperm(k, generator=gen)
        permuted = fn(
            *[v[perm] for v in flat_vecs],
            *[p[perm] if isinstance(p, torch.Tensor) else p for p in flat_params],
        )
        if not torch.allclose(permuted, flat[perm], rtol=1e-10, atol=1e-12, equal_nan=True):
            return False
        if k > 1 and flat_vecs:
            bumped = [v.clone() for v in flat_vecs]
            bumped[0][0] += 0.37
            after = fn(*bumped, *flat_params)
            same = (after == flat) | (torch.isnan(after) & torch.isnan(flat))
            if (~same[1:]).any():
                return False
    except Exception:  # noqa: BLE001 - a function that fails on flat input is simply not elementwise
        return False
    return True


def is_linear(fn: Callable[..., torch.Tensor], vector_shapes: Sequence[tuple[int, ...]]) -> bool:
    """Whether ``fn`` is linear in its vector arguments (probed on random inputs)."""
    try:
        check_linear(fn, vector_shapes, "")
    except ProgramError:
        return False
    except Exception:  # noqa: BLE001 - a function that fails on the probe is not known linear
        return False
    return True


def check_linear(
    fn: Callable[..., torch.Tensor], vector_shapes: Sequence[tuple[int, ...]], where: str,
    params: Sequence[Any] = (),
) -> None:
    """Raise ProgramError unless ``fn`` is linear (a LinComb must keep Z Gaussian)."""
    draws = standard_normal(2, [(2, *s) for s in vector_shapes] * 2)
    u, v = draws[:len(vector_shapes)], draws[len(vector_shapes):]
    a, b = 0.7, -1.3
    ps = list(params)
    lhs = call_full(fn, [a * x + b * y for x, y in zip(u, v, strict=False)], vector_shapes, ps, 1)
    rhs = a * call_full(fn, u, vector_shapes, ps, 1) + b * call_full(fn, v, vector_shapes, ps, 1)
    scale = 1.0 + rhs.abs().max().item()
    if not torch.allclose(lhs, rhs, rtol=1e-9, atol=1e-9 * scale):
        raise ProgramError(
            f"{where}: the function is not linear in its inputs, so its output is not a G-var. "
            "Use P.nonlin(...) for nonlinear maps (and note a LinComb has no constant term)."
        )
