"""A GPyTorch kernel backed by an infinite-width limit (``tp.gpytorch``; needs the optional
extra ``gpytorch``: ``pip install tensorprograms[gpytorch]``).

``InfiniteWidthKernel(limit)`` is the NNGP (or NTK) of ``limit = tp.infinite_width(...)``
as a ``gpytorch.kernels.Kernel``. Its hyperparameters are the limit's variances σ² (one
per model parameter with σ² > 0, ``limit.hyperparameters``), stored as raw parameters
behind GPyTorch's ``Positive`` constraint, so the exact marginal likelihood trains them
(the limit kernels are differentiable with respect to σ²). Inputs are ``[N, ...]`` in the
model's input shape (no GPyTorch batch dimensions), float64. See docs/predict.md.
"""

from __future__ import annotations

try:
    import gpytorch
    from gpytorch.constraints import Positive
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("tensorprograms.gpytorch needs gpytorch: pip install 'tensorprograms[gpytorch]'") from e

import torch

from .frontend.limit import InfiniteWidthLimit

__all__ = ["InfiniteWidthKernel"]


def _raw_name(name: str) -> str:
    return "raw_" + name.replace(".", "__")


class InfiniteWidthKernel(gpytorch.kernels.Kernel):
    """``k(x, x')`` = the NNGP (``kind="nngp"``) or NTK (``kind="ntk"``) of ``limit``.

    Attributes:
        names: the model parameters whose σ² are hyperparameters (those with σ² > 0; the
            rest, e.g. biases that vanish in the limit, stay fixed).
        variances: ``{name: σ²}`` as differentiable 0-d tensors (the constrained values).
    """

    has_lengthscale = False

    def __init__(self, limit: InfiniteWidthLimit, kind: str = "nngp", **kwargs):
        if not isinstance(limit, InfiniteWidthLimit):
            raise TypeError(f"limit must be a tp.InfiniteWidthLimit (tp.infinite_width(...)); "
                            f"got {type(limit).__name__}")
        if kind not in ("nngp", "ntk"):
            raise ValueError(f"kind must be 'nngp' or 'ntk'; got {kind!r}")
        super().__init__(**kwargs)
        self.limit, self.kind = limit, kind
        self.names = [n for n, v in limit.hyperparameters.items() if float(v.detach()) > 0]
        if not self.names:
            raise ValueError("the limit has no variance > 0 to train")
        for name in self.names:
            constraint = Positive()
            init = constraint.inverse_transform(limit.hyperparameters[name].detach().to(torch.float64))
            self.register_parameter(_raw_name(name), torch.nn.Parameter(init.clone()))
            self.register_constraint(_raw_name(name), constraint)

    @property
    def variances(self) -> dict[str, torch.Tensor]:
        out = {}
        for name in self.names:
            raw = getattr(self, _raw_name(name))
            out[name] = getattr(self, _raw_name(name) + "_constraint").transform(raw)
        return out

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, diag: bool = False,
                last_dim_is_batch: bool = False, **params) -> torch.Tensor:
        if last_dim_is_batch or x1.dim() != len(self.limit.example_inputs[0].shape):
            raise ValueError(
                "InfiniteWidthKernel takes inputs shaped like the model's, "
                f"{tuple(self.limit.example_inputs[0].shape)}"
                f" with any batch size; got {tuple(x1.shape)} (GPyTorch batch dimensions are not supported)"
            )
        self.limit.hyperparameters.update(self.variances)
        same = x1 is x2 or (x1.shape == x2.shape and torch.equal(x1, x2))
        if self.kind == "nngp":
            K = self.limit.nngp(x1) if same else self.limit.nngp(x1, x2)
        else:
            K = self.limit.ntk(x1) if same else self.limit.ntk(x1, x2)
        return K.diagonal() if diag else K
