"""GP posterior and NTK gradient-flow predictions from kernel matrices.

Conventions (docs/predict.md):

* Kernels are per-output (outputs are iid in the limit): ``[N, N]`` train × train,
  ``[M, N]`` test × train, ``[M, M]`` (or its diagonal ``[M]``) test × test, float64.
* Targets ``y_train`` are ``[N]`` or ``[N, k]``; means come back in the same layout with M
  rows; a covariance ``[M, M]`` is per output unit (the same for every unit).
* Gradient flow trains on ``L(θ) = 1/(2N) Σ_i ||f(x_i) − y_i||²`` with ``dθ/dt = −lr ∇L``,
  so ``t`` counts steps of gradient descent with step ``lr`` (Lee et al. 2019, "Wide neural
  networks of any depth evolve as linear models under gradient descent", eqs. 9–16, with
  their ``η`` our ``lr`` and the 1/N of the mean loss made explicit). In the limit the
  network is its linearization, so with ``Θ`` the NTK on the training inputs:

      f_t(X) = Y + e^{−lr·t·Θ/N} (f_0(X) − Y)
      f_t(x) = f_0(x) + Θ(x, X) Θ⁻¹ (I − e^{−lr·t·Θ/N}) (Y − f_0(X))

  With ``f_0`` drawn from the NNGP (an infinite ensemble of initializations), ``f_t`` is a
  GP with mean ``A Y`` and covariance ``K(x, x') − A K(X, x') − K(x, X) Aᵀ + A K(X, X) Aᵀ``,
  ``A = Θ(x, X) Θ⁻¹ (I − e^{−lr·t·Θ/N})``; on the training inputs ``A = I − e^{−lr·t·Θ/N}``.
* ``noise`` adds ``noise · I`` to the train × train kernel: observation noise for the GP
  posterior, a ridge (``diag_reg``) for gradient flow; 0 gives the noiseless posterior /
  the unregularized flow (a singular kernel is then solved by its pseudo-inverse).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .linalg import PSDSolver

__all__ = ["Prediction", "gp_posterior", "gradient_flow", "one_hot"]


@dataclass
class Prediction:
    """Predicted outputs.

    Attributes:
        mean: ``[M]`` or ``[M, k]`` (the layout of ``y_train``), float64.
        cov: ``[M, M]`` per-output covariance, its diagonal ``[M]`` when only the diagonal
            of the test kernel was given, or None when no test × test kernel was given.
        method: ``"cholesky"`` or ``"eigh"``: how the train kernel was solved.
    """

    mean: Tensor
    cov: Tensor | None
    method: str

    @property
    def variance(self) -> Tensor | None:
        """Per-output predictive variance ``[M]`` (None without a covariance)."""
        if self.cov is None:
            return None
        return self.cov if self.cov.dim() == 1 else self.cov.diagonal()

    def classes(self) -> Tensor:
        """``argmax`` over outputs ``[M]`` (int64): classification by one-hot regression."""
        if self.mean.dim() != 2:
            raise ValueError("classes() needs [M, k] means: fit one-hot targets (tp.predict.one_hot)")
        return self.mean.argmax(dim=1)


def one_hot(labels: Tensor, classes: int | None = None) -> Tensor:
    """Regression targets ``[N, C]`` float64 for integer labels ``[N]`` in ``0..C-1``.

    Plain one-hot (1 for the class, 0 elsewhere). Centring (subtracting 1/C) would shift
    every class's mean prediction by the same amount, so argmax decisions do not change.
    """
    if not isinstance(labels, Tensor) or labels.dim() != 1 or labels.is_floating_point():
        raise ValueError("labels must be an integer tensor [N] of class indices")
    if labels.numel() and labels.min().item() < 0:
        raise ValueError(f"labels must be >= 0; got min {labels.min().item()}")
    C = int(labels.max().item()) + 1 if classes is None else int(classes)
    if labels.numel() and labels.max().item() >= C:
        raise ValueError(f"label {labels.max().item()} is out of range for classes={C}")
    return torch.nn.functional.one_hot(labels.long(), C).to(torch.float64)


def _targets(y: Tensor, n: int) -> Tensor:
    if not isinstance(y, Tensor):
        raise TypeError(f"y_train must be a torch.Tensor [N] or [N, k]; got {type(y).__name__}")
    if y.dim() not in (1, 2) or y.shape[0] != n:
        raise ValueError(
            f"y_train has shape {tuple(y.shape)}; the train kernel is [{n}, {n}], so y_train must be "
            f"[{n}] or [{n}, k] (class labels: use tp.predict.one_hot(labels))"
        )
    y = y.to(torch.float64)
    if not bool(torch.isfinite(y).all()):
        raise ValueError("y_train contains NaN or Inf")
    return y


def _cross(k: Tensor | None, n: int, name: str, default: Tensor) -> Tensor:
    if k is None:
        return default
    if not isinstance(k, Tensor) or k.dim() != 2 or k.shape[1] != n:
        shape = tuple(k.shape) if isinstance(k, Tensor) else type(k).__name__
        raise ValueError(f"{name} must be the test × train kernel [M, {n}]; got {shape}")
    k = k.to(torch.float64)
    if not bool(torch.isfinite(k).all()):
        raise ValueError(f"{name} contains NaN or Inf")
    return k


def _test_test(k: Tensor | None, m: int, name: str) -> Tensor | None:
    if k is None:
        return None
    if not isinstance(k, Tensor) or not (k.shape == (m, m) or k.shape == (m,)):
        shape = tuple(k.shape) if isinstance(k, Tensor) else type(k).__name__
        raise ValueError(f"{name} must be the test × test kernel [{m}, {m}] or its diagonal [{m}]; "
                         f"got {shape}")
    return k.to(torch.float64)


def _noise(noise: float) -> float:
    noise = float(noise)
    if not math.isfinite(noise) or noise < 0:
        raise ValueError(f"noise must be a finite number >= 0 (a variance added to the diagonal); "
                         f"got {noise}")
    return noise


def _quadratic(k_tt: Tensor | None, A: Tensor, k_tX: Tensor, k_XX: Tensor) -> Tensor | None:
    """``k_tt − A k_Xt − k_tX Aᵀ + A k_XX Aᵀ`` (full, or its diagonal when ``k_tt`` is [M])."""
    if k_tt is None:
        return None
    AK = A @ k_XX
    if k_tt.dim() == 1:
        return k_tt - 2 * (A * k_tX).sum(1) + (AK * A).sum(1)
    cross = A @ k_tX.T
    cov = k_tt - cross - cross.T + AK @ A.T
    return 0.5 * (cov + cov.T)


def gp_posterior(
    k_train: Tensor,
    y_train: Tensor,
    k_test_train: Tensor | None = None,
    k_test: Tensor | None = None,
    *,
    noise: float = 0.0,
) -> Prediction:
    """Posterior of the GP with kernel ``k`` (NNGP or NTK) given ``y = f(X) + ε``, ``ε ~ N(0, noise)``.

    Args:
        k_train: ``[N, N]`` kernel on the training inputs.
        y_train: ``[N]`` or ``[N, k]`` targets (k outputs share the per-output kernel).
        k_test_train: ``[M, N]``; None predicts at the training inputs (``k_train``).
        k_test: ``[M, M]`` or its diagonal ``[M]`` for the posterior covariance; None: no
            covariance. At the training inputs (``k_test_train=None``), None means ``k_train``.
        noise: observation-noise variance added to ``k_train``'s diagonal (jitter).

    Returns:
        :class:`Prediction` with mean ``k_*X (K + noise I)⁻¹ y`` and covariance
        ``k_** − k_*X (K + noise I)⁻¹ k_X*`` (of the latent f, without the noise).
    """
    noise = _noise(noise)
    K = PSDSolver(k_train, "k_train").K
    n = K.shape[0]
    y = _targets(y_train, n)
    k_tX = _cross(k_test_train, n, "k_test_train", K)
    at_train = k_test is None and k_test_train is None
    k_tt = _test_test(K if at_train else k_test, k_tX.shape[0], "k_test")
    solver = PSDSolver(K + noise * torch.eye(n, dtype=torch.float64), "k_train + noise·I")
    mean = k_tX @ solver.solve(y)
    cov = None
    if k_tt is not None:
        W = solver.solve(k_tX.T)  # [N, M]
        cov = k_tt - (k_tX * W.T).sum(1) if k_tt.dim() == 1 else k_tt - k_tX @ W
        if cov.dim() == 2:
            cov = 0.5 * (cov + cov.T)
    return Prediction(mean=mean, cov=cov, method=solver.method)


def _flow_factor(lam: Tensor, rate: float, t: float) -> Tensor:
    """``(1 − e^{−rate·t·λ}) / λ`` (``rate·t`` at λ = 0; ``1/λ`` or 0 at t = ∞), stably."""
    if math.isinf(t):
        return torch.where(lam > 0, 1.0 / torch.where(lam > 0, lam, 1.0), torch.zeros_like(lam))
    s = rate * t
    safe = torch.where(lam > 0, lam, torch.ones_like(lam))
    return torch.where(lam > 0, -torch.expm1(-s * safe) / safe, torch.full_like(lam, s))


def gradient_flow(
    ntk_train: Tensor,
    y_train: Tensor,
    ntk_test_train: Tensor | None = None,
    *,
    t: float = math.inf,
    lr: float = 1.0,
    noise: float = 0.0,
    nngp_train: Tensor | None = None,
    nngp_test_train: Tensor | None = None,
    nngp_test: Tensor | None = None,
    f0_train: Tensor | None = None,
    f0_test: Tensor | None = None,
) -> Prediction:
    """Outputs of an infinitely wide network after MSE gradient flow for time ``t``.

    Args:
        ntk_train: ``[N, N]`` NTK on the training inputs.
        y_train: ``[N]`` or ``[N, k]`` targets.
        ntk_test_train: ``[M, N]``; None predicts the training outputs ``f_t(X)``.
        t: training time in steps of size ``lr`` (``math.inf``: the end of training, kernel
            regression with the NTK).
        lr: learning rate of ``dθ/dt = −lr ∇L``, ``L = 1/(2N) Σ ||f(x_i) − y_i||²``.
        noise: ridge added to the NTK's diagonal (0: plain MSE).
        nngp_train, nngp_test_train, nngp_test: the NNGP blocks ``[N, N]``, ``[M, N]``
            (None when predicting the training outputs) and ``[M, M]`` or ``[M]``: give them
            to get the covariance of the infinite ensemble of networks at time t.
        f0_train, f0_test: one network's initial outputs (``[N]``/``[N, k]``,
            ``[M]``/``[M, k]``) for the prediction of that network's training; None: the
            ensemble mean (f_0 = 0 in mean).

    Returns:
        :class:`Prediction`: mean ``f_0(x) + A (Y − f_0(X))``; covariance as in the module
        docstring when the NNGP blocks are given (only with ``f0_*`` None).
    """
    noise = _noise(noise)
    lr, t = float(lr), float(t)
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a finite number > 0; got {lr}")
    if math.isnan(t) or t < 0:
        raise ValueError(f"t must be >= 0 (math.inf for the end of training); got {t}")
    theta = PSDSolver(ntk_train, "ntk_train").K
    n = theta.shape[0]
    y = _targets(y_train, n)
    on_train = ntk_test_train is None
    k_tX = _cross(ntk_test_train, n, "ntk_test_train", theta)
    solver = PSDSolver(theta + noise * torch.eye(n, dtype=torch.float64), "ntk_train + noise·I")
    if math.isinf(t) and solver.method == "cholesky" and not on_train:
        A = solver.solve(k_tX.T).T
    else:
        # A = Θ(x, X) g(Θ), g(λ) = (1 − e^{−lr t λ / N}) / λ, through the eigendecomposition
        g = solver.apply(lambda lam: _flow_factor(lam, lr / n, t), torch.eye(n, dtype=torch.float64))
        A = k_tX @ g
    if (f0_train is None) != (f0_test is None) and not on_train:
        raise ValueError("give both f0_train and f0_test (one network's initial outputs) or neither "
                         "(the ensemble mean)")
    f0X = torch.zeros_like(y) if f0_train is None else _f0(f0_train, y.shape, "f0_train")
    m = k_tX.shape[0]
    if on_train:
        f0t = f0X
    else:
        f0t = torch.zeros((m, *y.shape[1:]), dtype=torch.float64) if f0_test is None else \
            _f0(f0_test, (m, *y.shape[1:]), "f0_test")
    mean = f0t + A @ (y - f0X)
    cov = None
    if nngp_train is not None:
        if f0_train is not None or f0_test is not None:
            raise ValueError("the ensemble covariance is over initializations; omit f0_train/f0_test "
                             "(they fix one network) or the NNGP blocks")
        K = PSDSolver(nngp_train, "nngp_train").K
        if K.shape != theta.shape:
            raise ValueError(f"nngp_train has shape {tuple(K.shape)}; expected {tuple(theta.shape)}")
        if on_train:
            k_tX_nngp, k_tt = K, (K if nngp_test is None else _test_test(nngp_test, m, "nngp_test"))
        else:
            if nngp_test_train is None or nngp_test is None:
                raise ValueError("for the test covariance give nngp_test_train [M, N] and nngp_test "
                                 "[M, M] (or its diagonal [M]) with nngp_train")
            k_tX_nngp = _cross(nngp_test_train, n, "nngp_test_train", K)
            if k_tX_nngp.shape[0] != m:
                raise ValueError(f"nngp_test_train has {k_tX_nngp.shape[0]} rows; ntk_test_train has {m}")
            k_tt = _test_test(nngp_test, m, "nngp_test")
        cov = _quadratic(k_tt, A, k_tX_nngp, K)
    return Prediction(mean=mean, cov=cov, method=solver.method)


def _f0(f: Tensor, shape, name: str) -> Tensor:
    if not isinstance(f, Tensor) or tuple(f.shape) != tuple(shape):
        got = tuple(f.shape) if isinstance(f, Tensor) else type(f).__name__
        raise ValueError(f"{name} must have shape {tuple(shape)} (the initial outputs); got {got}")
    return f.to(torch.float64)
