"""From a user's factory to a :class:`MuPLimitTrainer`: capture, recognise, read the init."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from ..errors import UnsupportedOperation
from ..frontend.capture import capture
from ..frontend.init_reader import ParamInit, read_initialization
from .architecture import MLPSpec, mlp_spec
from .trainer import LOSSES, METHODS, OPTIMIZERS, InitLaw, MuPLimitTrainer, TrainerConfig

_SAMPLED = {"normal": "normal", "override": "normal", "uniform": "uniform", "constant": "constant"}


def _law(init: ParamInit, kind: str) -> InitLaw:
    dist = init.distribution.split("|")[0]
    mean, var = float(init.means[0]), float(init.variances[0])
    if kind == "hidden":
        # Hidden weights enter only through Ẑ, whose law is Gaussian for any iid init.
        if abs(mean) > 0:
            raise UnsupportedOperation(
                f"hidden weight {init.name!r} has nonzero initial mean {mean}; the μP limit needs "
                "zero-mean hidden weights"
            )
        return InitLaw("normal", 0.0, var)
    if var == 0.0:
        return InitLaw("constant", mean, 0.0)
    if dist not in _SAMPLED:
        raise UnsupportedOperation(
            f"parameter {init.name!r} is initialised by {init.source} ({dist}); its per-coordinate law "
            f"enters the μP limit, and only {sorted(set(_SAMPLED) - {'override'})} initialisations are "
            "supported for input-layer weights, biases and the readout. Use nn.init.normal_/uniform_/"
            "zeros_ or pass variances={name: value} (treated as Gaussian)"
        )
    return InitLaw(_SAMPLED[dist], mean, var)


def laws_of(spec: MLPSpec, inits: Mapping[str, ParamInit]) -> dict[str, InitLaw]:
    """Initial law (at the base width) of every parameter the spec uses."""
    out = {}
    for layer in spec.layers:
        out[layer.weight] = _law(inits[layer.weight], layer.kind)
        if layer.bias is not None:
            out[layer.bias] = _law(inits[layer.bias], "bias")
    return out


def check_arguments(optimizer, lr, loss, method, base_width, particles, betas=(0.9, 0.999), eps=1e-8) -> None:
    """Raise a clear error for an unsupported optimizer, loss or method, or a bad number."""
    if not isinstance(optimizer, str) or optimizer.lower() not in OPTIMIZERS:
        name = optimizer if isinstance(optimizer, str) else getattr(optimizer, "__name__", optimizer)
        raise UnsupportedOperation(
            f"optimizer {name!r} is not supported by the μP training limit; use optimizer='sgd' "
            "(plain SGD, no momentum or weight decay) or 'adam' (torch.optim.Adam without weight "
            "decay or amsgrad, one-hidden-layer MLPs)"
        )
    ok_betas = (isinstance(betas, (tuple, list)) and len(betas) == 2
                and all(isinstance(x, (int, float)) and 0 <= x < 1 for x in betas))
    if not ok_betas:
        raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")
    if not (isinstance(eps, (int, float)) and 0 <= eps < float("inf")):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    if loss not in LOSSES:
        raise ValueError(f"loss {loss!r} is not supported; use one of {LOSSES}")
    if method not in METHODS:
        raise ValueError(f"method {method!r} is not one of {METHODS}")
    if not (isinstance(lr, (int, float)) and lr > 0 and lr == lr and lr != float("inf")):
        raise ValueError(f"lr must be a positive finite number, got {lr!r}")
    if isinstance(base_width, bool) or not isinstance(base_width, int) or base_width < 1:
        raise ValueError(f"base_width must be a positive integer, got {base_width!r}")
    if isinstance(particles, bool) or not isinstance(particles, int) or particles < 2:
        raise ValueError(f"particles must be an integer ≥ 2, got {particles!r}")


def check_adam(spec: MLPSpec, method: str) -> None:
    """Adam's limit is computed for MLPs without width × width matrices, with particles."""
    hidden = [layer.weight for layer in spec.layers if layer.kind == "hidden"]
    if hidden:
        raise UnsupportedOperation(
            f"optimizer='adam' is supported for MLPs with one hidden layer; this one has the hidden "
            f"(width × width) weights {hidden}. Adam updates such a matrix by an entrywise nonlinear "
            "function of its gradient history Σ_s dh_s x_sᵀ (TP IVb's nonlinear outer product), whose "
            "limit (ΔW y)_α = E_β[ψ(dh-history_α, x-history_β) y_β] couples every pair of coordinates "
            "(O(M²) per product with M particles) and is not implemented. Use optimizer='sgd', or one "
            "hidden layer"
        )
    if method == "exact":
        raise ValueError(
            "method='exact' cannot train with Adam: its entrywise normalisation is nonlinear in the "
            "coordinates, so they leave the span of the atoms. Use method='particles' (or 'auto')"
        )


def read_mlp(
    factory: Callable[[int], torch.nn.Module],
    example_inputs: torch.Tensor,
    base_width: int,
    variances: Mapping[str, Any] | None = None,
) -> tuple[MLPSpec, dict[str, InitLaw]]:
    """Capture ``factory`` at ``base_width`` and twice that, recognise the MLP and read the
    initial law of each parameter at ``base_width``."""
    cap = capture(factory, (example_inputs.detach(),), (base_width, 2 * base_width))
    spec = mlp_spec(cap)
    inits = read_initialization(factory, (base_width, 2 * base_width), variances=variances)
    return spec, laws_of(spec, inits)


def make_trainer(
    factory: Callable[[int], torch.nn.Module],
    example_inputs: torch.Tensor,
    base_width: int,
    *,
    optimizer: str = "sgd",
    lr: float,
    loss: str = "mse",
    method: str = "auto",
    particles: int = 2**14,
    seed: int = 0,
    variances: Mapping[str, Any] | None = None,
    model: tuple[MLPSpec, dict[str, InitLaw]] | None = None,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> MuPLimitTrainer:
    """A trainer of the μP limit of ``factory`` (see :class:`MuPLimitTrainer`).

    Args:
        factory: ``width -> nn.Module``, an MLP (see :mod:`.architecture`).
        example_inputs: ``[B, d]``, fixes the input dimension.
        base_width: the width at which ``lr`` and the initialisation are the user's own
            (``tp.mup.parametrize``'s ``base_width``).
        optimizer: ``"sgd"`` (plain SGD, ``tp.mup.SGD``) or ``"adam"`` (``tp.mup.Adam``
            with ``eps·base_width/n`` at width n; MLPs with one hidden layer only, particles).
        lr: the learning rate at ``base_width``.
        loss: ``"mse"`` (``F.mse_loss``) or ``"cross_entropy"`` (``F.cross_entropy``).
        method: ``"exact"`` (networks whose activations are all affine), ``"particles"``
            (Monte Carlo, any activation) or ``"auto"`` (exact when possible).
        particles: ``M`` for the Monte Carlo method.
        seed: seeds the particles (and prediction's fresh Gaussians).
        variances: per-parameter overrides of the initial variances (as in
            ``tp.infinite_width``).
        model: the result of :func:`read_mlp` for these arguments, to skip re-capturing.
        betas, eps: Adam's (``torch.optim.Adam``'s defaults); ``eps`` is its value at
            ``base_width`` and scales like the gradients, ``eps·base_width/n``.
    """
    check_arguments(optimizer, lr, loss, method, base_width, particles, betas, eps)
    optimizer = optimizer.lower()
    spec, laws = model if model is not None else read_mlp(factory, example_inputs, base_width, variances)
    if optimizer == "adam":
        check_adam(spec, method)
    if method == "auto":
        method = "exact" if spec.linear and optimizer == "sgd" else "particles"
    if method == "exact" and not spec.linear:
        bad = [a.ops for a in spec.activations if a.affine is None]
        raise ValueError(
            f"method='exact' needs a network linear in the width dims (affine activations); this one "
            f"has the activations {bad}. Use method='particles'"
        )
    cfg = TrainerConfig(float(lr), loss, method, particles if method == "particles" else 0, int(seed),
                        base_width, optimizer, (float(betas[0]), float(betas[1])), float(eps))
    return MuPLimitTrainer(spec, laws, cfg)
