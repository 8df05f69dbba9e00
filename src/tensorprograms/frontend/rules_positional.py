"""Fixed sinusoidal positional encodings (Vaswani et al. 2017) as a width-sized buffer.

The table for width d has, at position p and frequency index i = 0 … d/2 − 1,
``sin(p·ω_i)`` and ``cos(p·ω_i)`` with ``ω_i = 10000^(−2i/d)``, interleaved (coordinates 2i,
2i+1) or in two halves (sin then cos). It is deterministic, but what a Tensor Program sees
of a vector is the law of its coordinates: every later matrix has iid entries, so the
coordinates' order does not matter, only their empirical distribution, which converges
as d → ∞. A coordinate is a frequency exponent ``u = 2i/d``, uniform on [0, 1) in the
limit, and a phase (sin or cos) with probability 1/2 each. So the table is, in the
limit, the Nonlin of two auxiliary initial vectors g, s ~ N(0, 1):

    PE_p = sin(p · 10000^(−Φ(g)) + (π/2)·1[s > 0])        (Φ the normal CDF: Φ(g) ~ U[0, 1))

with ``E[PE_p PE_q] = ½ ∫_0^1 cos((p − q)·10000^(−u)) du`` and PE independent of every
Gaussian vector of the network. How the module is detected: a width-sized buffer whose
values at both capture widths equal this formula (either layout; rows at any positions p,
read off the table and checked). Any other width-sized buffer is rejected
(rules_attention's hook).
"""

from __future__ import annotations

import math

import torch

from .lower import APPLY_HOOKS, BUFFER_CONSUMERS, Lowering
from .values import Param, Vec

BASE = 10000.0
LAYOUTS = ("interleaved", "halves")


def sinusoidal_table(positions: torch.Tensor, width: int, layout: str = "interleaved") -> torch.Tensor:
    """The standard table ``[len(positions), width]`` (float64) for the given positions."""
    if width % 2:
        raise ValueError(f"a sinusoidal table needs an even width, got {width}")
    omega = BASE ** (-torch.arange(0, width, 2, dtype=torch.float64) / width)  # [d/2]
    angle = positions.to(torch.float64)[:, None] * omega
    if layout == "interleaved":
        return torch.stack([angle.sin(), angle.cos()], -1).reshape(len(positions), width)
    return torch.cat([angle.sin(), angle.cos()], -1)


def read_positions(table: torch.Tensor) -> tuple[torch.Tensor, str] | None:
    """``(positions, layout)`` if ``table`` ``[M, d]`` is a sinusoidal table, else None.

    Each row's position is read from its lowest frequency ω = 10000^(−(d−2)/d) (unambiguous
    for |p|·ω < π) and rounded to an integer; the whole table is then compared with the
    formula (float32 tolerance)."""
    M, d = table.shape
    if d < 4 or d % 2:
        return None
    t = table.to(torch.float64)
    omega = BASE ** (-(d - 2) / d)
    for layout in LAYOUTS:
        s, c = (t[:, d - 2], t[:, d - 1]) if layout == "interleaved" else (t[:, d // 2 - 1], t[:, d - 1])
        p = torch.round(torch.atan2(s, c) / omega)
        if torch.allclose(sinusoidal_table(p, d, layout), t, rtol=0, atol=1e-5):
            return p, layout
    return None


def _sinusoidal(low: Lowering, p: Param) -> Vec | None:
    """The buffer ``p`` as the limit's PE vector, if it is a sinusoidal table at both widths."""
    if len(p.width_axes) != 1:
        return None
    axis = p.width_axes[0]
    found = []
    for module in low.c.modules:
        value = dict(module.named_buffers()).get(p.name)
        if value is None:
            return None
        rows = value.detach().movedim(axis, -1)
        read = read_positions(rows.reshape(-1, rows.shape[-1]))
        if read is None:
            return None
        found.append(read)
    (pos, layout), (pos2, _) = found
    if not torch.equal(pos, pos2):
        return None
    cache = low.__dict__.setdefault("_sinusoidal", {})
    if p.name not in cache:
        P = low.program
        if "aux" not in cache:  # one pair of auxiliary vectors for every table of the model
            cache["aux"] = (P.vector("pe_u", variance=1.0), P.vector("pe_phase", variance=1.0))
        g, s = cache["aux"]
        finite = tuple(d for i, d in enumerate(p.shape) if i != axis)
        positions = pos.reshape(finite) if finite else pos.reshape(())

        def encoding(u, phase, _p=positions):
            freq = torch.pow(BASE, -torch.special.ndtr(u))  # 10000^(−U), U uniform on [0, 1)
            shift = (phase > 0).to(u.dtype) * (math.pi / 2)  # cos = sin(· + π/2)
            b = u.shape
            return torch.sin(_p.to(u.dtype) * freq.reshape(*b, *[1] * _p.ndim)
                             + shift.reshape(*b, *[1] * _p.ndim))

        encoding.__name__ = "sinusoidal_encoding"
        cache[p.name] = P.nonlin(encoding, g, s, elementwise=False)
    return Vec(cache[p.name], p.shape, axis)


def _hook(low: Lowering, node, args: list, kwargs: dict):
    """Replace sinusoidal buffers among an op's arguments by their PE vectors."""
    if node.target in BUFFER_CONSUMERS or not any(isinstance(a, Param) and a.width_axes for a in args):
        return NotImplemented
    buffers = {name for name, _ in low.c.modules[0].named_buffers()}
    new, changed = list(args), False
    for i, a in enumerate(args):
        if isinstance(a, Param) and a.width_axes and a.name in buffers:
            vec = _sinusoidal(low, a)
            if vec is not None:
                new[i], changed = vec, True
    if not changed:
        return NotImplemented
    return low._apply(node, new, kwargs)


APPLY_HOOKS.insert(0, _hook)
