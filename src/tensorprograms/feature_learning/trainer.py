"""SGD in the μP infinite-width limit of an MLP (TP IV), step by step.

Convention: the limit of ``tp.mup.parametrize(factory, n, base_width)`` trained with
``tp.mup.SGD(model, lr)`` (plain SGD, no momentum or weight decay) as ``n → ∞``; ``lr``
means what it means at ``base_width`` (``b``). With ``σ²`` read from the user's
initialisation at width ``b`` (per-entry variance ``s``), the limit is that of the network

* input layer ``h¹ = W¹ξ + b¹`` (``W¹`` entries of variance ``s``, finite fan-in ``d``),
  coordinates updated by ``-(η/b)·(n dh¹) ξᵀ`` (and the biases by ``-(η/b)·n dh``);
* hidden ``h^l = W^l x^{l-1} + b^l``, ``W^l`` entries ``N(0, σ_l²/n)`` with ``σ_l² = s·b``,
  updated by ``-η·dh xᵀ`` (the Netsor⊤ rule in :mod:`.matrix`);
* readout ``f = (1/n) Σ_α v_α x^L_α + c``: ``v`` of variance ``s·b²`` (so ``f₀ → c₀``),
  updated by ``-η b χ x^L``; the readout bias ``c`` by ``-η χ``, ``χ = ∂loss/∂f``.

The readout bias is a finite parameter: its random initial value does not average out
with width, so the limit starts it at its mean (0 for PyTorch's default); the validation
tool zeroes it in the finite networks so that both start from the same function.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .architecture import MLPSpec
from .matrix import HiddenMatrix
from .space import DT, ExactSpace, ParticleSpace

LOSSES = ("mse", "cross_entropy")
OPTIMIZERS = ("sgd", "adam")
METHODS = ("auto", "exact", "particles")


class TrainingDiverged(FloatingPointError):
    """A scalar of the limit became NaN or infinite; the message names the step and the scalar."""


@dataclass(frozen=True)
class InitLaw:
    """Per-entry initial law of one parameter, at the base width."""

    dist: str  # "normal", "uniform" or "constant"
    mean: float
    var: float


@dataclass(frozen=True)
class TrainerConfig:
    lr: float
    loss: str
    method: str
    particles: int
    seed: int
    base_width: int
    optimizer: str = "sgd"
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8


class MuPLimitTrainer:
    """Train the μP limit of an MLP with SGD, or Adam for networks with one hidden layer
    (build it with ``limit.trainer(...)``).

    ``step(xb, yb)`` takes one SGD step on a batch (``xb [B, d]``; ``yb [B, k]`` floats
    for ``"mse"`` = ``F.mse_loss``, ``[B]`` class indices for ``"cross_entropy"`` =
    ``F.cross_entropy``) and returns the batch loss *before* the update (like the usual
    ``loss.backward(); opt.step()`` loop). ``predict(x)`` gives the limit's outputs
    ``[N, k]`` (float64). With particles, every scalar is a particle average;
    ``predict(x, stderr=True)`` also returns the standard error of each output as an
    average over particles (the error propagated from earlier averages is not included;
    compare runs with different ``seed`` for the full Monte Carlo spread).

    Cost per step ~ ``D · Σ_l S_l · B`` with ``D`` the particle count (or, exact, the atom
    count) and ``S_l ≤ 2·B·t`` the history of hidden layer ``l``: ``D·L·T²·B²`` for T steps.
    """

    def __init__(self, spec: MLPSpec, laws: dict[str, InitLaw], config: TrainerConfig):
        self.spec = spec
        self.laws = laws
        self.config = config
        self.gen = torch.Generator().manual_seed(config.seed)
        if config.method == "exact":
            self.space = ExactSpace(64)
        else:
            self.space = ParticleSpace(config.particles, self.gen)
        b = config.base_width
        sp = self.space
        lay = spec.layers
        self.steps = 0
        self.history: list[float] = []
        self.seconds = 0.0
        self._diverged: str | None = None
        first = laws[lay[0].weight]
        self._reserve(spec.d_in + 2 * len(lay) + spec.k_out)
        self.w1 = sp.draw((spec.d_in,), first.dist, first.mean, first.var)
        self.biases: list[torch.Tensor | None] = []
        for layer in lay[:-1]:
            law = laws.get(layer.bias) if layer.bias else None
            self.biases.append(None if law is None else sp.draw((), law.dist, law.mean, law.var))
        self.mats = [HiddenMatrix(sp, laws[layer.weight].var * b) for layer in lay[1:-1]]
        out = laws[lay[-1].weight]
        self.v = sp.draw((spec.k_out,), out.dist, out.mean * b, out.var * b * b)
        cb = laws.get(lay[-1].bias) if lay[-1].bias else None
        self.c = torch.full((spec.k_out,), 0.0 if cb is None else cb.mean, dtype=DT)
        self.has_c = lay[-1].bias is not None
        # Adam's moment estimates (m, v) per parameter, in the limit's units (see _adam)
        self.adam: dict[str, list[torch.Tensor]] = {}

    # ---------------------------------------------------------------- state handling
    def _vectors(self) -> dict[str, torch.Tensor]:
        """Every tensor of the state whose leading dim is the space's."""
        out = {"w1": self.w1, "v": self.v}
        for i, bias in enumerate(self.biases):
            if bias is not None:
                out[f"b{i}"] = bias
        for i, m in enumerate(self.mats):
            for f in ("Q", "G", "P", "Gp"):
                out[f"W{i}.{f}"] = getattr(m, f)
        for name, (m1, m2) in self.adam.items():
            if name != "c":
                out[f"adam.{name}.m"], out[f"adam.{name}.v"] = m1, m2
        return out

    def _set_vector(self, name: str, t: torch.Tensor) -> None:
        if name.startswith("adam."):
            _, key, which = name.split(".")
            self.adam.setdefault(key, [None, None])[0 if which == "m" else 1] = t  # type: ignore[list-item]
        elif name in ("w1", "v"):
            setattr(self, name, t)
        elif name.startswith("b"):
            self.biases[int(name[1:])] = t
        else:
            i, f = name[1:].split(".")
            setattr(self.mats[int(i)], f, t)

    def _reserve(self, extra: int) -> None:
        """Exact space: make room for ``extra`` new atoms (pads every state vector)."""
        sp = self.space
        if not sp.exact or sp.used + extra <= sp.size:
            return
        new = max(2 * sp.size, sp.used + extra)
        if hasattr(self, "w1"):
            for name, t in self._vectors().items():
                pad = t.new_zeros(new - t.shape[0], *t.shape[1:])
                self._set_vector(name, torch.cat([t, pad], 0))
        sp.size = new

    def state_dict(self) -> dict:
        """Everything needed to resume bit for bit (tensors are cloned)."""
        tensors = {k: v.clone() for k, v in self._vectors().items()}
        for i, m in enumerate(self.mats):
            tensors[f"W{i}.R"] = m.R.clone()
            tensors[f"W{i}.Rp"] = m.Rp.clone()
        return {
            "config": asdict(self.config),
            "tensors": tensors,
            "c": self.c.clone(),
            "adam_c": [t.clone() for t in self.adam.get("c", [])],
            "steps": self.steps,
            "pairs": [m.pairs for m in self.mats],
            "history": list(self.history),
            "rng": self.gen.get_state(),
            "space": (self.space.size, getattr(self.space, "used", None)),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a :meth:`state_dict` of a trainer of the same model and configuration."""
        if state["config"] != asdict(self.config):
            raise ValueError(
                f"checkpoint was made with {state['config']}, this trainer has {asdict(self.config)}; "
                "build the trainer with the same lr, loss, method, particles, seed and base width"
            )
        self.adam = {}
        size, used = state["space"]
        self.space.size = size
        if used is not None:
            self.space.used = used
        for k, v in state["tensors"].items():
            if k.endswith(".R") or k.endswith(".Rp"):
                i, f = k[1:].split(".")
                setattr(self.mats[int(i)], f, v.clone())
            else:
                self._set_vector(k, v.clone())
        for m, p in zip(self.mats, state["pairs"]):
            m.pairs = p
        self.c = state["c"].clone()
        if state.get("adam_c"):
            self.adam["c"] = [t.clone() for t in state["adam_c"]]
        self.steps = state["steps"]
        self.history = list(state["history"])
        self.gen.set_state(state["rng"])
        self._diverged = None

    # ---------------------------------------------------------------- forward/backward
    def _check_x(self, x: torch.Tensor, what: str) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[1] != self.spec.d_in:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{what} must be a tensor [batch, {self.spec.d_in}], got {got}")
        if not torch.isfinite(x).all():
            raise ValueError(f"{what} contains NaN or Inf")
        return x.to(DT)

    def _forward(self, xb: torch.Tensor, commit: bool, gen, check: bool):
        sp, acts = self.space, self.spec.activations
        h = self.w1 @ xb.T
        if self.biases[0] is not None:
            h = h + self.biases[0][:, None]
        hs, xs = [h], []
        for i, m in enumerate(self.mats):
            self._check(check, h, i + 1)
            x = sp.act(acts[i].fn, acts[i].affine, h)
            xs.append(x)
            h = m.forward(x, commit, gen)
            if self.biases[i + 1] is not None:
                h = h + self.biases[i + 1][:, None]
            hs.append(h)
        self._check(check, h, len(hs))
        xL = sp.act(acts[-1].fn, acts[-1].affine, h)
        xs.append(xL)
        f = sp.dot(xL, self.v) + self.c  # E[x^L v] + c, [B, k]
        return f, hs, xs

    def _check(self, check: bool, h: torch.Tensor, layer: int) -> None:
        if not check:
            return
        m2 = torch.diagonal(self.space.dot(h, h))
        bad = ~torch.isfinite(m2)
        if bad.any():
            i = int(bad.nonzero()[0])
            self._fail(f"E[(h^{layer})^2], the second moment of layer {layer}'s preactivation on batch "
                       f"example {i}, is {m2[i].item()}")

    def _fail(self, what: str) -> None:
        self._diverged = (
            f"the μP limit diverged at step {self.steps}: {what}. Lower the learning rate; the trainer's "
            "state is now undefined (load a state_dict from before to continue)"
        )
        raise TrainingDiverged(self._diverged)

    def _loss(self, f: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fr = f.detach().requires_grad_(True)
        with torch.enable_grad():
            loss = F.mse_loss(fr, y) if self.config.loss == "mse" else F.cross_entropy(fr, y)
            (chi,) = torch.autograd.grad(loss, fr)
        return loss.detach(), chi

    def _targets(self, yb, batch: int) -> torch.Tensor:
        k = self.spec.k_out
        if self.config.loss == "mse":
            if not isinstance(yb, torch.Tensor) or tuple(yb.shape) not in ((batch, k),):
                raise ValueError(f"loss='mse' needs targets yb of shape [{batch}, {k}]")
            return yb.to(DT)
        if not isinstance(yb, torch.Tensor) or yb.shape != (batch,) or yb.dtype.is_floating_point:
            raise ValueError(f"loss='cross_entropy' needs integer class targets yb of shape [{batch}]")
        if ((yb < 0) | (yb >= k)).any():
            raise ValueError(f"cross_entropy targets must lie in [0, {k}) (the model has {k} outputs)")
        return yb.long()

    def step(self, xb: torch.Tensor, yb: torch.Tensor) -> float:
        """One SGD (or Adam) step on the batch; returns the batch loss before the update."""
        if self._diverged:
            raise TrainingDiverged(self._diverged)
        t0 = time.perf_counter()
        xb = self._check_x(xb, "xb")
        yb = self._targets(yb, xb.shape[0])
        B, cfg, sp = xb.shape[0], self.config, self.space
        b, lr = cfg.base_width, cfg.lr
        self._reserve(2 * B * len(self.mats))
        f, hs, xs = self._forward(xb, True, None, True)
        for i in range(f.shape[1]):
            for j in range(f.shape[0]):
                if not math.isfinite(f[j, i].item()):
                    self._fail(f"the output f[{j}, {i}] = E[v x^L] + c is {f[j, i].item()}")
        loss, chi = self._loss(f, yb)
        if not torch.isfinite(loss):
            self._fail(f"the loss is {loss.item()}")
        acts = self.spec.activations
        dx = self.v @ chi.T  # n·dx^L = V^T χ, [D, B]
        dhs: list[torch.Tensor] = [None] * len(hs)  # type: ignore[list-item]
        for li in range(len(hs) - 1, -1, -1):
            dhs[li] = dx * sp.dact(acts[li].fn, acts[li].affine, hs[li])
            if li >= 1:
                dx = self.mats[li - 1].backward(dhs[li], lr)
        if cfg.optimizer == "adam":
            self._adam_update(xb, chi, dhs, xs[-1])
        else:
            self.v = self.v - (lr * b) * (xs[-1] @ chi)
            if self.has_c:
                self.c = self.c - lr * chi.sum(0)
            for li, bias in enumerate(self.biases):
                if bias is not None:
                    self.biases[li] = bias - (lr / b) * dhs[li].sum(1)
            self.w1 = self.w1 - (lr / b) * (dhs[0] @ xb)
        for m in self.mats:
            m.finish_step()
        for name, t in (("the readout weights v", self.v), ("the input weights", self.w1)):
            if not torch.isfinite(t).all():
                self._fail(f"{name} became non-finite in the update")
        self.steps += 1
        self.history.append(float(loss))
        self.seconds += time.perf_counter() - t0
        return float(loss)

    def _adam(self, name: str, grad: torch.Tensor, eps: float) -> torch.Tensor:
        """torch.optim.Adam's step direction ``m̂ / (√v̂ + eps)`` for ``grad`` (updating the
        moments stored under ``name``); an entry whose gradients were all zero moves by 0."""
        b1, b2 = self.config.betas
        t = self.steps + 1
        m, v = self.adam.get(name) or (torch.zeros_like(grad), torch.zeros_like(grad))
        m = b1 * m + (1 - b1) * grad
        v = b2 * v + (1 - b2) * grad * grad
        self.adam[name] = [m, v]
        denom = v.sqrt() / math.sqrt(1 - b2**t) + eps
        return torch.where(v > 0, m / (1 - b1**t) / denom.where(v > 0, 1.0), 0.0)

    def _adam_update(self, xb, chi, dhs, xL) -> None:
        """One Adam step of the μP limit (TP IVb), for networks without hidden matrices.

        The limit of ``tp.mup.Adam(model, lr, eps=ε·b/n)`` (ε scaled like the gradients,
        which are Θ(1/n) in μP, so it keeps its meaning at every width). Adam acts entry
        by entry and is invariant to the gradients' scale up to ε, so each width-sized
        parameter's update is the same function of its own coordinate's gradient history:
        per particle. In the limit's units (``n·dh`` from the backward pass): input weights
        and biases ``Δ = -η·Adam(n·Σ_B dh ξ, ε·b)``; readout ``v = n·W``: ``Δv = -η·b·
        Adam(Σ_B χ x^L, ε)`` (μP's Adam lr b/n and ε·n/b for the readout); readout bias
        ``Δc = -η·Adam(Σ_B χ, 0)`` (its ε·b/n vanishes)."""
        cfg, b = self.config, self.config.base_width
        lr, eps = cfg.lr, cfg.eps
        self.v = self.v - (lr * b) * self._adam("v", xL @ chi, eps)
        if self.has_c:
            self.c = self.c - lr * self._adam("c", chi.sum(0), 0.0)
        if self.biases[0] is not None:
            self.biases[0] = self.biases[0] - lr * self._adam("b0", dhs[0].sum(1), eps * b)
        self.w1 = self.w1 - lr * self._adam("w1", dhs[0] @ xb, eps * b)

    def train(self, batches, progress: bool = True) -> list[float]:
        """Run :meth:`step` over an iterable of ``(xb, yb)``; returns the losses."""
        return [self.step(xb, yb) for xb, yb in tqdm(batches, disable=not progress, desc="μP limit")]

    def _evaluate(self, x: torch.Tensor):
        """Forward pass of the current state on ``x`` without changing it: ``(f [N, k],
        x^L [D, N])``. The fresh Gaussians for directions not seen in training come from a
        generator seeded by ``(seed, steps)``: deterministic, and the training RNG is untouched."""
        x = self._check_x(x, "x")
        sp = self.space
        gen = torch.Generator().manual_seed((self.config.seed * 1_000_003 + self.steps + 7919) % 2**62)
        self._reserve(x.shape[0] * len(self.mats))
        used = getattr(sp, "used", None)
        try:
            f, _, xs = self._forward(x, False, gen, False)
        finally:
            if used is not None:
                sp.used = used
        return f, xs[-1]

    def predict(self, x: torch.Tensor, stderr: bool = False):
        """Outputs ``[N, k]`` of the limit at its current state (float64); with
        ``stderr=True`` also their particle standard errors (zeros for the exact method).
        Deterministic (see :meth:`_evaluate`)."""
        f, xL = self._evaluate(x)
        if stderr:
            if self.space.exact:
                return f, torch.zeros_like(f)
            return f, self.space.stderr(xL[:, :, None] * self.v[:, None, :])
        return f

    def feature_kernel(self, x1: torch.Tensor, x2: torch.Tensor | None = None) -> torch.Tensor:
        """The kernel of the last hidden layer's features at the current state,
        ``E[x^L(x1_i) x^L(x2_j)]`` ``[N1, N2]`` (float64): the infinite-width limit of
        ``φ(h^L(x1)) · φ(h^L(x2)) / n`` of the finite μP network. At init it is the NNGP
        kernel of that layer; training moves it (feature learning). With particles, a
        particle average; ``x1`` and ``x2`` go through one forward pass so they share
        the same fresh Gaussians."""
        n1 = x1.shape[0] if isinstance(x1, torch.Tensor) else 0
        x = x1 if x2 is None else torch.cat([self._check_x(x1, "x1"), self._check_x(x2, "x2")])
        _, xL = self._evaluate(x)
        K = self.space.dot(xL, xL)
        return K if x2 is None else K[:n1, n1:]

    def cost(self) -> dict:
        """Size of the computation so far: ``D`` (particles or atoms), the history size per
        hidden layer, steps and seconds."""
        return {
            "method": self.config.method,
            "D": self.space.size,
            "history": [m.R.shape[1] for m in self.mats],
            "basis": [(m.Q.shape[1], m.P.shape[1]) for m in self.mats],
            "steps": self.steps,
            "seconds": self.seconds,
        }
