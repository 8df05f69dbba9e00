"""The empirical NTK of linear layers without per-example Jacobians (structured derivatives).

A parameter that enters the model only as ``torch.nn.functional.linear(x, W, b)`` on
per-example rows (``x`` of shape ``[B, d_in]``) has a rank-one per-example gradient:
``∂f_a(x_i)/∂W = g_{a,i} ⊗ x_i`` with ``g`` the gradient with respect to the layer's output
``y = x Wᵀ + b``. Its NTK contribution is therefore

    Θ_W(i, j)_ab = Σ_{c, c'} (G_{c,a} G_{c',b}ᵀ)_ij · (X_c X_{c'}ᵀ)_ij,   Θ_b = Σ_{c,c'} (G G'ᵀ)_ij

over the calls ``c`` that use W (one, or several with weight sharing): two Gram matrices
per pair of calls instead of N·k·P Jacobian entries (neural-tangents' "structured
derivatives" rule for dense layers). ``G`` is read off one backward pass per output unit
through zero "probes" added to the layer outputs (examples are independent, so the
gradient of Σ_i f_a(x_i) at row i is example i's own).

Every use of every trainable parameter is watched (a ``TorchFunctionMode``); when one is not
such a ``linear`` call (a parameter used in a matmul, a convolution, a weight tied to an
embedding, inputs with extra dims), :func:`structured_ntk` returns None and the caller
uses the general Jacobian contraction.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten


class _Watch(TorchFunctionMode):
    """Records linear calls on trainable parameters; flags any other use of them."""

    def __init__(self, names: dict[int, str], batch: int):
        super().__init__()
        self.names, self.batch = names, batch
        self.calls: list[tuple[str | None, str | None, Tensor, Tensor]] = []  # W, b, x, probe
        self.other = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.linear:
            x = args[0] if args else kwargs.get("input")
            w = args[1] if len(args) > 1 else kwargs.get("weight")
            b = args[2] if len(args) > 2 else kwargs.get("bias")
            wn = self.names.get(id(w))
            bn = self.names.get(id(b)) if b is not None else None
            if (wn is not None or bn is not None) and id(x) not in self.names:
                if x.dim() != 2 or x.shape[0] != self.batch:
                    self.other = True  # rows that are not one per example (e.g. a sequence)
                out = func(*args, **kwargs)
                probe = torch.zeros_like(out, requires_grad=True)
                self.calls.append((wn, bn, x.detach(), probe))
                return out + probe
        for t in tree_flatten((args, kwargs))[0]:
            if isinstance(t, Tensor) and id(t) in self.names:
                self.other = True
        return func(*args, **kwargs)


def _trace(f: Callable[[Tensor], Tensor], x: Tensor, names: dict[int, str]):
    """(calls, G per call ``[k, B, d_out]``, the output ``[B, k]``) or None when a parameter
    has another use."""
    watch = _Watch(names, x.shape[0])
    with torch.enable_grad():
        with watch:
            out = f(x)
        if watch.other or not watch.calls:
            return None
        probes = [p for *_, p in watch.calls]
        k = out.shape[1]
        grads = [[] for _ in probes]
        for a in range(k):
            gs = torch.autograd.grad(out[:, a].sum(), probes, retain_graph=a < k - 1, allow_unused=True)
            for c, (g, p) in enumerate(zip(gs, probes)):
                grads[c].append(torch.zeros_like(p) if g is None else g)
    return watch.calls, [torch.stack(g) for g in grads], out.detach()


def structured_ntk(f: Callable[[Tensor], Tensor], params: dict[str, Tensor],
                   weights: dict[str, float] | None, x1: Tensor, x2: Tensor, sym: bool,
                   per_output: bool) -> tuple[Tensor, tuple[Tensor, Tensor]] | None:
    """``(Θ, (f(x1), f(x2)))`` with Θ summed over outputs (``[N1, N2]``, per_output) or
    ``[N1, N2, k, k]``, or None when some trainable parameter is not used by linear layers
    only (see the module docstring).

    ``f(x) -> [B, k]`` runs the model with the tensors of ``params`` as its parameters;
    ``weights`` are the NTK parametrization's per-parameter factors (None: all 1)."""
    names = {id(t): n for n, t in params.items()}
    one = _trace(f, x1, names)
    if one is None:
        return None
    two = one if sym else _trace(f, x2, names)
    if two is None:
        return None
    (calls1, g1, out1), (calls2, g2, out2) = one, two
    if [c[:2] for c in calls1] != [c[:2] for c in calls2]:
        return None  # the two batches took different paths through the model

    def w(name: str | None) -> float:
        return 0.0 if name is None else (1.0 if weights is None else weights[name])

    total = None
    for c, (wn, bn, xa, _) in enumerate(calls1):
        for d, (wn2, bn2, xb, _) in enumerate(calls2):
            # weight: calls of the same W pair up; bias: calls of the same b
            fw = w(wn) if wn is not None and wn == wn2 else 0.0
            fb = w(bn) if bn is not None and bn == bn2 else 0.0
            if fw == 0.0 and fb == 0.0:
                continue
            feat = fw * (xa @ xb.T) + fb if fw != 0.0 else torch.full((xa.shape[0], xb.shape[0]), fb,
                                                                      dtype=xa.dtype)
            if per_output:
                gg = torch.einsum("aip,ajp->ij", g1[c], g2[d])
                term = gg * feat
            else:
                gg = torch.einsum("aip,bjp->ijab", g1[c], g2[d])
                term = gg * feat[:, :, None, None]
            total = term if total is None else total + term
    if total is None:
        return None
    return total, (out1, out2)
