"""Standard errors of whole limits computed with Monte Carlo expectations.

The engine's Monte Carlo standard error (``ProgramLimit.stderr``) is per expectation: an
error in a covariance that later expectations are built on is not propagated. The honest
error of a final quantity (a kernel after several gated layers, say) is measured instead
by recomputing it with independent Monte Carlo seeds: every expectation of seed s draws
its own samples (the engine seeds each quantity from ``seed`` and its name), so the K
results are iid estimates and their spread over ``√K`` is the standard error of their
mean, including everything the per-expectation errors leave out.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

from ..program.program import Program
from .theorem import ProgramLimit, master_theorem

T = TypeVar("T", torch.Tensor, tuple)

__all__ = ["over_seeds", "used_monte_carlo"]


def used_monte_carlo(limit: ProgramLimit) -> bool:
    """Whether any expectation of ``limit`` computed so far was (partly) Monte Carlo."""
    return any("monte_carlo" in r.backend for r in limit.records)


def over_seeds(
    compute: Callable[[Callable[[Program], ProgramLimit]], T],
    seeds: int = 8,
    start: int = 0,
    **engine_options,
) -> tuple[T, T]:
    """``compute`` repeated with ``seeds`` independent Monte Carlo seeds: (mean, stderr).

    Args:
        compute: ``engine -> result``, where ``engine(program)`` is :func:`master_theorem`
            with a fixed seed (and ``engine_options``); ``result`` is a tensor or a tuple of
            tensors (e.g. ``(nngp, ntk)``).
        seeds: K ≥ 2 independent seeds (``start`` … ``start``+K−1). If the first run used no Monte Carlo
            (only closed forms and quadrature), the result is deterministic and is returned
            after that one run with zero standard errors.
        engine_options: passed to :func:`master_theorem` (``mc_samples``, ``backend``, …).

    Returns:
        ``(mean, stderr)`` with the structure of ``result``: the mean over the K runs and
        the sample standard deviation (ddof 1) over ``√K``, per entry.
    """
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 2:
        raise ValueError(f"seeds must be an integer ≥ 2 (independent Monte Carlo runs), got {seeds!r}")
    if "seed" in engine_options:
        raise ValueError("over_seeds chooses the seeds (start … start+seeds−1); pass start=, not seed=")
    runs = []
    monte_carlo = False
    for s in range(start, start + seeds):
        engines: list[ProgramLimit] = []

        def engine(program: Program, _s=s, _engines=engines) -> ProgramLimit:
            limit = master_theorem(program, seed=_s, **engine_options)
            _engines.append(limit)
            return limit

        runs.append(compute(engine))
        monte_carlo = monte_carlo or any(used_monte_carlo(e) for e in engines)
        if s == start and not monte_carlo:
            return runs[0], _map(torch.zeros_like, runs[0])
    tuples = isinstance(runs[0], tuple)
    parts = list(zip(*runs)) if tuples else [runs]
    means, errors = [], []
    for values in parts:
        stack = torch.stack([v.detach() for v in values])
        means.append(stack.mean(0))
        errors.append(stack.std(0, unbiased=True) / seeds**0.5)
    if tuples:
        return tuple(means), tuple(errors)
    return means[0], errors[0]


def _map(fn, value):
    return tuple(fn(v) for v in value) if isinstance(value, tuple) else fn(value)
