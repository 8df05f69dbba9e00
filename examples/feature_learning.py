"""μP limit vs NNGP and NTK limits of the same MLP on a small MNIST-1D subset.

    PYTHONPATH=src python examples/feature_learning.py --out out/feature_learning

The MLP is ``40 -> n -> 10`` (``--depth 1``, ReLU, PyTorch default init) or ``40 -> n ->
n -> 10`` (``--depth 2``). Three infinite-width limits of it are compared on the same
training subset (features standardised with training statistics):

* NNGP: GP posterior mean with the NNGP kernel (``tp.infinite_width(..., "ntk").nngp``);
* NTK: gradient flow to convergence on MSE = kernel regression with the NTK;
  both on one-hot targets minus 1/10, ridge ``λ · mean(diag K)`` with λ from a grid;
* μP: the feature-learning limit (``parametrization="mup"``) trained with SGD on the
  cross-entropy for ``--epochs`` epochs (minibatches of ``--batch``), lr from a grid.

Every hyperparameter (λ, lr) is chosen on a validation split taken from MNIST-1D's
training set; test accuracy is on MNIST-1D's test set. A finite μP network of width
``--finite-width`` trained identically is reported as a check. Needs ``mnist1d``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch import nn

import tensorprograms as tp
from tensorprograms.feature_learning import finite_width_run
from tensorprograms.job.feature_learning import batches as make_batches
from tensorprograms.mup.transfer import mnist1d


def mlp_factory(depth: int):
    def factory(n: int) -> nn.Module:
        layers: list[nn.Module] = [nn.Linear(40, n), nn.ReLU()]
        for _ in range(depth - 1):
            layers += [nn.Linear(n, n), nn.ReLU()]
        return nn.Sequential(*layers, nn.Linear(n, 10))

    return factory


def kernel_accuracy(K_tt, K_st, y_train, y_eval, lam):
    Y = torch.nn.functional.one_hot(y_train, 10).double() - 0.1
    reg = lam * K_tt.diagonal().mean()
    alpha = torch.linalg.solve(K_tt + reg * torch.eye(len(K_tt), dtype=K_tt.dtype), Y)
    return float(((K_st @ alpha).argmax(1) == y_eval).double().mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", type=int, default=512)
    ap.add_argument("--val", type=int, default=500)
    ap.add_argument("--depth", type=int, default=1)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lrs", type=float, nargs="+", default=[0.01, 0.03, 0.1, 0.3])
    ap.add_argument("--ridges", type=float, nargs="+", default=[1e-4, 1e-2, 1e-1, 1.0])
    ap.add_argument("--particles", type=int, default=2**13)
    ap.add_argument("--base-width", type=int, default=64)
    ap.add_argument("--finite-width", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("out/feature_learning"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    t_start = time.time()
    d = mnist1d(num_samples=5000, seed=42)
    g = torch.Generator().manual_seed(a.seed)
    perm = torch.randperm(len(d["x"]), generator=g)
    tr, va = perm[: a.train], perm[a.train: a.train + a.val]
    mu, sd = d["x"][tr].mean(0), d["x"][tr].std(0)
    norm = lambda x: ((x - mu) / sd).double()  # noqa: E731
    xtr, ytr, xva, yva = norm(d["x"][tr]), d["y"][tr], norm(d["x"][va]), d["y"][va]
    xte, yte = norm(d["x_test"]), d["y_test"]
    factory = mlp_factory(a.depth)
    res: dict = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()}}

    t0 = time.time()
    kl = tp.infinite_width(factory, xtr[:2], parametrization="ntk")
    x_all = torch.cat([xva, xte])
    K_tt, T_tt = kl.kernels(xtr)
    K_st, T_st = kl.kernels(x_all, xtr)
    nv = len(xva)
    for name, (A, B) in (("nngp", (K_tt, K_st)), ("ntk", (T_tt, T_st))):
        val = {lam: kernel_accuracy(A, B[:nv], ytr, yva, lam) for lam in a.ridges}
        best = max(val, key=val.get)
        res[name] = {"val": val, "ridge": best, "test": kernel_accuracy(A, B[nv:], ytr, yte, best)}
        print(f"{name}: val {val} -> ridge {best}, test accuracy {res[name]['test']:.4f}")
    res["kernel_seconds"] = time.time() - t0

    lim = tp.infinite_width(factory, xtr[:2], parametrization="mup", base_width=a.base_width)
    batches = make_batches(xtr, ytr, a.epochs, a.batch, a.seed)
    mup_val, trainers = {}, {}
    for lr in a.lrs:
        t0 = time.time()
        trn = lim.trainer(lr=lr, loss="cross_entropy", particles=a.particles, seed=a.seed)
        try:
            trn.train(batches)
        except tp.feature_learning.TrainingDiverged as e:
            print(f"mup lr {lr}: {e}")
            mup_val[lr] = float("nan")
            continue
        mup_val[lr] = float((trn.predict(xva).argmax(1) == yva).double().mean())
        trainers[lr] = trn
        print(f"mup lr {lr}: val accuracy {mup_val[lr]:.4f} ({time.time() - t0:.1f} s, {trn.cost()})")
    best = max((lr for lr in mup_val if mup_val[lr] == mup_val[lr]), key=mup_val.get)
    trn = trainers[best]
    f, se = trn.predict(xte, stderr=True)
    res["mup"] = {"val": mup_val, "lr": best, "test": float((f.argmax(1) == yte).double().mean()),
                  "max_output_stderr": float(se.max()), "cost": trn.cost(),
                  "final_train_loss": trn.history[-1]}
    print(f"mup: lr {best}, test accuracy {res['mup']['test']:.4f}")

    if a.finite_width:
        t0 = time.time()
        run = finite_width_run(factory, a.finite_width, a.base_width, batches, xte, lr=best,
                               loss="cross_entropy", seed=a.seed, readout_bias=f"{2 * a.depth}.bias")
        acc = float((run.outputs.argmax(1) == yte).double().mean())
        agree = float((run.outputs.argmax(1) == f.argmax(1)).double().mean())
        res["finite_mup"] = {"width": a.finite_width, "test": acc, "seconds": time.time() - t0,
                             "agreement_with_limit": agree}
        print(f"finite μP width {a.finite_width}: test accuracy {acc:.4f}")
    res["seconds"] = time.time() - t_start
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / f"results_depth{a.depth}.json").write_text(json.dumps(res, indent=2, default=str))
    print(json.dumps({k: res[k] for k in ("nngp", "ntk", "mup")}, default=str))


if __name__ == "__main__":
    main()
