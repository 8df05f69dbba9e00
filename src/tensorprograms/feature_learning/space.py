"""Where the Z-variables live: particles (Monte Carlo) or exact coefficient vectors.

Every Z of the limit is represented by a tensor ``[D, ...]`` whose leading dim indexes
either

* **particles** (``ParticleSpace``): ``D = M`` iid samples of one "typical coordinate";
  ``E[X Y]`` is the particle average ``(1/M) Σ_α X_α Y_α``, new independent Gaussians are
  fresh ``N(0, 1)`` draws, activations act particle by particle; or
* **atoms** (``ExactSpace``): for networks linear in the width dims every Z is a linear
  combination of finitely many uncorrelated unit-variance random variables (the *atoms*:
  initial coordinates and the Gaussians the Master Theorem introduces) plus a constant;
  ``X`` holds the coefficients, ``E[X Y] = Σ_a X_a Y_a`` exactly (every scalar of a
  linear network is such a bilinear form, so the atoms' distributions beyond their second
  moments never matter), and a new Gaussian is a new atom (a new unit coordinate).
  Coordinate 0 is the constant 1.

The trainer runs the same code on both; only these methods differ.
"""

from __future__ import annotations

import torch

DT = torch.float64


class ParticleSpace:
    """``M`` Monte Carlo particles (see module docstring)."""

    exact = False

    def __init__(self, particles: int, generator: torch.Generator):
        self.size = int(particles)
        self.weight = 1.0 / self.size
        self.gen = generator

    def dot(self, X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
        """``E[X_i Y_j]`` for ``X [D, a]``, ``Y [D, b]`` -> ``[a, b]``."""
        return (X.T @ Y) * self.weight

    def fresh(self, k: int, gen: torch.Generator | None = None) -> torch.Tensor:
        """``k`` new independent standard Gaussians, ``[D, k]``."""
        return torch.randn(self.size, k, generator=gen or self.gen, dtype=DT)

    def draw(self, shape: tuple[int, ...], dist: str, mean: float, var: float) -> torch.Tensor:
        """An initial vector ``[D, *shape]``: iid coordinates of the given distribution."""
        full = (self.size, *shape)
        if dist == "uniform":
            half = (3.0 * var) ** 0.5
            u = torch.rand(full, generator=self.gen, dtype=DT)
            return mean + half * (2.0 * u - 1.0)
        if dist == "constant" or var == 0.0:
            return torch.full(full, float(mean), dtype=DT)
        return mean + var**0.5 * torch.randn(full, generator=self.gen, dtype=DT)

    def act(self, fn, affine, h: torch.Tensor) -> torch.Tensor:
        return fn(h)

    def dact(self, fn, affine, h: torch.Tensor) -> torch.Tensor | float:
        if affine is not None:
            return affine[0]
        with torch.enable_grad():
            t = h.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(fn(t).sum(), t)
        return g

    def stderr(self, X: torch.Tensor) -> torch.Tensor:
        """Monte Carlo standard error of ``E[X]`` (this average alone; not propagated)."""
        return X.std(0) / self.size**0.5


class ExactSpace:
    """Coefficient vectors over atoms (see module docstring). ``size`` is the current
    capacity; ``used`` the atoms handed out (atom 0 is the constant 1)."""

    exact = True

    def __init__(self, capacity: int = 64):
        self.size = int(capacity)
        self.used = 1
        self.weight = 1.0

    def dot(self, X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
        return X.T @ Y

    def fresh(self, k: int, gen: torch.Generator | None = None) -> torch.Tensor:
        if self.used + k > self.size:
            raise RuntimeError("ExactSpace: capacity exceeded; call reserve() before the step")
        out = torch.zeros(self.size, k, dtype=DT)
        out[torch.arange(self.used, self.used + k), torch.arange(k)] = 1.0
        self.used += k
        return out

    def draw(self, shape: tuple[int, ...], dist: str, mean: float, var: float) -> torch.Tensor:
        k = 1
        for s in shape:
            k *= s
        out = torch.zeros(self.size, k, dtype=DT)
        out[0] = mean
        if var > 0:
            out += var**0.5 * self.fresh(k)
        return out.reshape(self.size, *shape)

    def act(self, fn, affine, h: torch.Tensor) -> torch.Tensor:
        a, c = affine
        out = a * h
        out[0] += c
        return out

    def dact(self, fn, affine, h: torch.Tensor) -> float:
        return affine[0]

