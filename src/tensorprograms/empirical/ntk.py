"""Empirical neural tangent kernel of a finite PyTorch model, with ``torch.func``.

Conventions (docs/empirical.md, "Empirical NTK"):

* ``f(x)`` is the model's output flattened to ``k`` values per input; the model runs in
  float64 and eval mode (a float64 eval copy is used when the model is not one already;
  the caller's model is never modified).
* Only parameters with ``requires_grad=True`` count ("trainable"); the others, and the
  buffers, are held fixed.
* ``parametrization="standard"``: gradients with respect to the parameters as they are,

      Θ(x, x')_ab = Σ_p ⟨∂f_a(x)/∂p, ∂f_b(x')/∂p⟩.

* ``parametrization="ntk"``: each parameter ``p`` with per-entry initialization variance
  ``v_p`` is read as ``p = √v_p · ω_p`` with ``ω_p ~ N(0, 1)`` the trainable parameter,
  so ``∂f/∂ω_p = √v_p · ∂f/∂p`` and

      Θ(x, x')_ab = Σ_p v_p ⟨∂f_a(x)/∂p, ∂f_b(x')/∂p⟩.

  The function (and its distribution at initialization) is unchanged; only the
  gradient geometry differs. A parameter with variance 0 (zero-initialized biases,
  LayerNorm gains fixed at 1) contributes nothing.
* ``per_output=True`` returns ``Σ_a Θ_aa / k`` (the per-output kernel: outputs are iid in
  the limit), shape ``[N1, N2]``; ``per_output=False`` returns ``[N1, N2, k, k]``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn

from ..factory import eval_mode
from .nngp import EmpiricalKernel, _build, _check_args, _check_inputs, _progress
from .structured import structured_ntk

__all__ = ["ntk", "ntk_mean"]

_METHODS = ("auto", "structured", "jacobian", "ntk_vp")
_PARAMETRIZATIONS = ("standard", "ntk")
_BYTES = 8  # float64


def _float64_eval(model: nn.Module) -> nn.Module:
    """``model`` itself when already float64 and in eval mode, else a float64 eval copy."""
    tensors = list(model.parameters()) + list(model.buffers())
    if not model.training and not any(m.training for m in model.modules()) and all(
        t.dtype == torch.float64 for t in tensors if t.is_floating_point()
    ):
        return model
    return eval_mode(copy.deepcopy(model)).double()


def _weights(trainable: dict[str, Tensor], parametrization: str,
             variances: Mapping[str, float] | None) -> dict[str, float] | None:
    if parametrization == "standard":
        return None
    if variances is None:
        raise ValueError(
            "parametrization='ntk' weights each parameter's gradient contraction by its per-entry "
            "initialization variance; pass variances={name: variance}, e.g. "
            "{n: p.variances[0] for n, p in tensorprograms.frontend.init_reader.read_initialization("
            "factory, (width, 2 * width)).items()} (variances[0] is the variance at the first width, "
            "which must be the model's width)"
        )
    missing = [n for n in trainable if n not in variances]
    if missing:
        raise ValueError(
            f"variances has no entry for the trainable parameters {missing}; give the per-entry "
            f"initialization variance of every parameter with requires_grad=True"
        )
    out: dict[str, float] = {}
    for n in trainable:
        v = variances[n]
        if hasattr(v, "variances") and not isinstance(v, (int, float)):
            raise TypeError(
                f"variances['{n}'] is a {type(v).__name__}; give a float, e.g. p.variances[0] for a "
                f"ParamInit p read at the model's width"
            )
        v = float(v)
        if not math.isfinite(v) or v < 0:
            raise ValueError(f"variances['{n}'] = {v!r}; a per-entry variance must be finite and >= 0")
        out[n] = v
    return out


def _saved_bytes_per_input(fn: Callable[[Tensor], Tensor], x: Tensor) -> tuple[int, int]:
    """(k, bytes autograd saves per input for the backward): sizes the chunks.

    Measured on one and on two inputs (when there are two) so that tensors saved once
    per batch (the parameters themselves) are not counted per input.
    """

    def saved(batch: Tensor) -> tuple[int, int]:
        total = [0]

        def pack(t: Tensor) -> Tensor:
            total[0] += t.numel() * t.element_size()
            return t

        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = fn(batch)
        return out.shape[-1], total[0]

    k, one = saved(x[:1])
    if x.shape[0] < 2:
        return k, one
    _, two = saved(x[:2])
    return k, max(two - one, 0)


def ntk(
    model: nn.Module,
    x1: Tensor,
    x2: Tensor | None = None,
    *,
    per_output: bool = True,
    method: str = "auto",
    max_memory: int = 2**28,
    parametrization: str = "standard",
    variances: Mapping[str, float] | None = None,
) -> Tensor:
    """Empirical NTK of ``model`` between the inputs ``x1`` and ``x2``.

    Args:
        model: the finite network; its output on ``[N, ...]`` inputs must be a tensor
            ``[N, ...]`` (flattened to ``k`` values per input). Each input must be
            processed independently (true in eval mode for the usual layers).
        x1: inputs ``[N1, ...]`` (batch on dim 0); floating inputs are used in float64,
            integer inputs (token ids) as they are.
        x2: inputs ``[N2, ...]`` with x1's trailing shape; None means ``x1`` (and the
            symmetric kernel is computed once per pair of blocks).
        per_output: True: ``[N1, N2]``, the trace over outputs divided by ``k``.
            False: ``[N1, N2, k, k]``, ``Θ[i, j, a, b] = Σ_p w_p ⟨∂f_a(x1_i)/∂p, ∂f_b(x2_j)/∂p⟩``.
        method: ``"structured"``: for parameters used only by linear layers
            (``torch.nn.functional.linear`` on ``[N, d]`` rows), Gram matrices of layer inputs
            and output gradients instead of Jacobians (empirical/structured.py); an error
            if some trainable parameter has another use. ``"jacobian"``: per chunk of
            inputs, vmapped ``torch.func.jacrev`` of the per-input output, contracted parameter
            by parameter. ``"ntk_vp"``: NTK-vector
            products, one column ``(j, b)`` at a time: ``g = J(x2)ᵀ e_{jb}`` by
            ``torch.func.vjp``, then ``J(x1) g`` by ``torch.func.jvp``; memory O(P) instead
            of O(N·k·P). ``"auto"``: ``"structured"`` when every trainable parameter
            allows it, else ``"jacobian"`` when the whole Jacobian, ``N·k·P·8``
            bytes (N = N1 + N2, or N1 when x2 is None; P = trainable entries), fits in
            ``max_memory``, else ``"ntk_vp"``.
        max_memory: bytes; inputs (and NTK-vector-product columns) are chunked so that
            the Jacobians, output blocks and the saved activations of the backward pass
            (measured on one input) held at once stay under it. A chunk holds at least one
            input, so a single input whose Jacobian exceeds it still runs.
        parametrization: ``"standard"``: gradients w.r.t. the parameters as they are
            (weight ``w_p = 1``). ``"ntk"``: the NTK parametrization's gradients: a
            parameter with per-entry initialization variance ``v_p`` is ``√v_p · ω_p``
            with trainable ``ω_p ~ N(0, 1)``, so its contraction is weighted by
            ``w_p = v_p`` (a zero-variance parameter drops out).
        variances: ``{parameter name: per-entry variance}`` for ``parametrization="ntk"``,
            e.g. ``{n: p.variances[0] for n, p in read_initialization(factory, (n, 2n)).items()}``
            (``tensorprograms.frontend.init_reader``); must cover every trainable parameter
            (names as in ``model.named_parameters()``); extra names are ignored.

    Returns:
        float64 tensor ``[N1, N2]`` (per_output) or ``[N1, N2, k, k]``.

    Raises:
        ValueError: no trainable parameters; NaN/Inf inputs; x1/x2 trailing shapes differ;
            unknown ``method``/``parametrization``; ``parametrization="ntk"`` without
            ``variances`` or with a missing/invalid variance; bad ``max_memory``; a model
            output that is not finite or not batched on dim 0.
        TypeError: ``model`` is not an ``nn.Module``; a non-tensor input or output.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    if method not in _METHODS:
        raise ValueError(f"unknown method {method!r}; use one of {list(_METHODS)}")
    if parametrization not in _PARAMETRIZATIONS:
        raise ValueError(f"unknown parametrization {parametrization!r}; use one of {list(_PARAMETRIZATIONS)}")
    if not isinstance(max_memory, int) or isinstance(max_memory, bool) or max_memory < 1:
        raise ValueError(f"max_memory must be a positive integer (bytes); got {max_memory!r}")
    _check_inputs(x1, x2)
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(
            "the model has no trainable parameters (none with requires_grad=True): its NTK is zero; "
            "set requires_grad=True on the parameters the kernel should count"
        )
    model = _float64_eval(model)
    trainable = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    fixed = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
    fixed.update(dict(model.named_buffers()))
    weights = _weights(trainable, parametrization, variances)

    def prep(x: Tensor) -> Tensor:
        return x.double() if x.is_floating_point() else x

    x1 = prep(x1)
    sym = x2 is None
    x2 = x1 if sym else prep(x2)
    n1, n2 = x1.shape[0], x2.shape[0]

    def f_batch(params: dict[str, Tensor], x: Tensor) -> Tensor:
        out = torch.func.functional_call(model, ({**fixed, **params},), (x,))
        if not isinstance(out, Tensor):
            raise TypeError(
                f"the model returned {type(out).__name__}; ntk needs a single output tensor [N, ...]; "
                f"wrap the model to return the output you want the kernel of"
            )
        if out.dim() < 1 or out.shape[0] != x.shape[0]:
            raise ValueError(
                f"the model output has shape {tuple(out.shape)}; expected batch size {x.shape[0]} on dim 0"
            )
        return out.reshape(x.shape[0], -1)

    def check_finite(name: str, out: Tensor) -> None:
        if not bool(torch.isfinite(out).all()):
            raise ValueError(f"the model output on {name} contains NaN or Inf; check the model and inputs")

    if method in ("auto", "structured"):
        with torch.no_grad():
            found = structured_ntk(lambda x: f_batch(trainable, x), trainable, weights, x1, x2, sym,
                                   per_output)
        if found is not None:
            theta, outs = found
            for name, o in zip(("x1", "x2"), outs):
                check_finite(name, o)
            k = outs[0].shape[1]
            return theta / k if per_output else theta
        if method == "structured":
            raise ValueError(
                "method='structured' needs every trainable parameter to be used only as the weight "
                "or bias of torch.nn.functional.linear (nn.Linear) on [N, d] inputs; use "
                "method='jacobian' or 'auto' for this model"
            )
    grad_params = {n: p.clone().requires_grad_() for n, p in trainable.items()}
    k, act = _saved_bytes_per_input(lambda x: f_batch(grad_params, x), x1)
    with torch.no_grad():
        for name, x in (("x1", x1), ("x2", x2)):
            check_finite(name, f_batch(trainable, x))
    n_params = sum(p.numel() for p in trainable.values())
    if method == "auto":
        method = "jacobian" if (n1 + (0 if sym else n2)) * k * n_params * _BYTES <= max_memory else "ntk_vp"

    shape = (n1, n2) if per_output else (n1, n2, k, k)
    out = torch.zeros(shape, dtype=torch.float64)
    if method == "jacobian":
        _by_jacobian(f_batch, trainable, weights, x1, x2, sym, per_output, k, act, max_memory, out)
    else:
        _by_ntk_vp(f_batch, trainable, weights, x1, x2, per_output, k, act, max_memory, out)
    return out / k if per_output else out


def _chunks(n: int, size: int) -> list[slice]:
    return [slice(i, min(n, i + size)) for i in range(0, n, size)]


def _jacobian(f_batch: Callable, params: dict[str, Tensor], x: Tensor) -> dict[str, Tensor]:
    """``{name: [c, k, numel]}``: per-input Jacobians, vmapped over the inputs of ``x``."""

    def single(p: dict[str, Tensor], xi: Tensor) -> Tensor:
        return f_batch(p, xi.unsqueeze(0))[0]

    try:
        jac = torch.func.vmap(torch.func.jacrev(single), in_dims=(None, 0))(params, x)
    except Exception:  # noqa: BLE001 - a model vmap cannot run: one input, one output at a time
        per = [torch.func.jacrev(single, chunk_size=1)(params, xi) for xi in x]
        jac = {n: torch.stack([j[n] for j in per]) for n in params}
    return {n: j.reshape(x.shape[0], j.shape[1], -1) for n, j in jac.items()}


def _contract(j1: dict[str, Tensor], j2: dict[str, Tensor], weights: dict[str, float] | None,
              per_output: bool) -> Tensor:
    spec = "iam,jam->ij" if per_output else "iam,jbm->ijab"
    total = None
    for name, a in j1.items():
        term = torch.einsum(spec, a, j2[name])
        if weights is not None:
            term = term * weights[name]
        total = term if total is None else total + term
    return total


def _by_jacobian(f_batch, params, weights, x1, x2, sym, per_output, k, act, max_memory, out) -> None:
    n_params = sum(p.numel() for p in params.values())
    # Per input in a chunk: its Jacobian (k·P entries) and k copies of the saved
    # activations (jacrev's vmapped backward); two chunks are held at once, plus the block.
    per_input = k * n_params * _BYTES + k * act
    block = (1 if per_output else k * k) * _BYTES
    # Largest c with 2·c·per_input + c²·block <= max_memory (at least 1).
    c = (-per_input + math.sqrt(per_input * per_input + block * max_memory)) / block
    size = max(1, min(max(x1.shape[0], x2.shape[0]), int(c)))
    rows, cols = _chunks(x1.shape[0], size), _chunks(x2.shape[0], size)
    for bi, r in enumerate(rows):
        j1 = _jacobian(f_batch, params, x1[r])
        for bj, c in enumerate(cols):
            if sym and bj < bi:
                continue
            j2 = j1 if sym and bj == bi else _jacobian(f_batch, params, x2[c])
            blk = _contract(j1, j2, weights, per_output)
            out[r, c] = blk
            if sym and bj > bi:
                out[c, r] = blk.transpose(0, 1) if per_output else blk.permute(1, 0, 3, 2)
            del j2


def _by_ntk_vp(f_batch, params, weights, x1, x2, per_output, k, act, max_memory, out) -> None:
    n_params = sum(p.numel() for p in params.values())
    # Input chunks: the saved activations of the vjp (x2 chunk) and of the jvp (x1 chunk)
    # take at most a quarter of the budget each; columns (one gradient of P entries and
    # one jvp of the x1 chunk each) share the remaining half.
    per_input = act + k * _BYTES
    size = max(1, (max_memory // 4) // max(per_input, 1))
    names = list(params)
    for c in _chunks(x2.shape[0], size):
        x2c = x2[c]
        _, vjp_fn = torch.func.vjp(lambda p, x=x2c: f_batch(p, x), params)
        for r in _chunks(x1.shape[0], size):
            x1c = x1[r]
            c1 = x1c.shape[0]

            def column(e: Tensor, x=x1c, vjp_fn=vjp_fn) -> Tensor:
                (g,) = vjp_fn(e)
                if weights is not None:
                    g = {n: g[n] * weights[n] for n in names}
                return torch.func.jvp(lambda p: f_batch(p, x), (params,), (g,))[1]  # [c1, k]

            n_cols = x2c.shape[0] * k
            per_col = n_params * _BYTES + c1 * (k * _BYTES + act) + x2c.shape[0] * act
            cols = max(1, min(n_cols, (max_memory // 2) // max(per_col, 1)))
            basis_idx = torch.arange(n_cols)
            for start in range(0, n_cols, cols):
                idx = basis_idx[start:start + cols]
                basis = torch.zeros(idx.shape[0], n_cols, dtype=torch.float64)
                basis[torch.arange(idx.shape[0]), idx] = 1.0
                basis = basis.reshape(idx.shape[0], x2c.shape[0], k)
                try:
                    res = torch.func.vmap(column)(basis) if idx.shape[0] > 1 else column(basis[0])[None]
                except Exception:  # noqa: BLE001 - vmap limitation: one column at a time
                    res = torch.stack([column(b) for b in basis])
                # res[t, i, a] = Θ(x1_i, x2_j)_{a b} for column t = (j, b)
                j_idx, b_idx = idx // k, idx % k
                if per_output:
                    vals = res[torch.arange(idx.shape[0]), :, b_idx]  # [t, c1]: a == b
                    out[r, c].index_add_(1, j_idx, vals.T)  # several b share a j: accumulate
                else:
                    # advanced indices split by a slice put their dim first: [t, c1, k]
                    out[r, c][:, j_idx, :, b_idx] = res


def ntk_mean(
    factory: Callable[[int], nn.Module],
    width: int,
    x1: Tensor,
    x2: Tensor | None = None,
    samples: int = 32,
    seed: int = 0,
    parametrization: str = "standard",
    progress: bool = False,
    *,
    method: str = "auto",
    max_memory: int = 2**28,
) -> EmpiricalKernel:
    """Mean per-output empirical NTK of ``factory(width)`` over random initializations.

    Sample ``s`` is ``factory(width)`` built under ``torch.manual_seed(seed + s)`` (the
    caller's RNG state is restored), in float64 and eval mode; its kernel is
    ``ntk(model, x1, x2, per_output=True, ...)``. For ``parametrization="ntk"`` the
    per-entry variances are read once with
    ``read_initialization(factory, (width, 2 * width))`` and those at ``width`` are used.

    Returns:
        :class:`EmpiricalKernel`: ``mean`` ``[N1, N2]`` over samples and ``stderr``, the
        standard deviation across samples (ddof 1) over ``√samples``.

    Raises:
        TypeError / ValueError: as :func:`tensorprograms.empirical.nngp` for the factory,
            ``width``, ``samples`` and inputs, and as :func:`ntk` for the rest.
    """
    _check_args(factory, width, samples, None)
    _check_inputs(x1, x2)
    if parametrization not in _PARAMETRIZATIONS:
        raise ValueError(f"unknown parametrization {parametrization!r}; use one of {list(_PARAMETRIZATIONS)}")
    variances = None
    if parametrization == "ntk":
        from ..frontend.init_reader import read_initialization

        inits = read_initialization(factory, (width, 2 * width))
        variances = {n: p.variances[0] for n, p in inits.items()}
    mean = m2 = None
    bar = _progress(samples, progress, desc="empirical NTK")
    for s in range(samples):
        model = _build(factory, width, seed + s)
        k_s = ntk(model, x1, x2, per_output=True, method=method, max_memory=max_memory,
                  parametrization=parametrization, variances=variances)
        if mean is None:
            mean, m2 = torch.zeros_like(k_s), torch.zeros_like(k_s)
        delta = k_s - mean
        mean += delta / (s + 1)
        m2 += delta * (k_s - mean)
        bar.update(1)
    bar.close()
    stderr = torch.sqrt(m2 / (samples - 1) / samples)
    return EmpiricalKernel(mean=mean, stderr=stderr, samples=samples, width=width)
