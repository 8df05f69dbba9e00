"""Command-line interface: ``tensorprograms --help``."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from pathlib import Path

NPZ_HELP = ("an .npz file with x_train [N, ...] and x_test [M, ...] (float inputs, batch first, the shape "
            "your module takes) and y_train [N], y_test [M] (integer class labels 0..C-1)")


def load_factory(spec: str):
    """``module:factory`` or ``path/to/file.py:factory`` → the callable ``width -> nn.Module``."""
    if ":" not in spec:
        raise SystemExit("--model must be MODULE:FACTORY or FILE.py:FACTORY (e.g. mymodels:make_mlp); "
                         f"got {spec!r}")
    mod_name, attr = spec.rsplit(":", 1)
    if mod_name.endswith(".py"):
        path = Path(mod_name)
        if not path.exists():
            raise SystemExit(f"--model: {path} does not exist")
        module_spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[path.stem] = module
        module_spec.loader.exec_module(module)
    else:
        sys.path.insert(0, str(Path.cwd()))
        try:
            module = importlib.import_module(mod_name)
        except ImportError as e:
            raise SystemExit(f"--model: cannot import {mod_name!r} ({e}); run from its folder or "
                             "give FILE.py") from e
    fn = getattr(module, attr, None)
    if fn is None or not callable(fn):
        raise SystemExit(f"--model: {mod_name} has no callable {attr!r}; it must be a function "
                         "width -> nn.Module")
    return fn


def _report(args) -> int:
    from .job.data import load_npz
    from .job.pieces import TrainConfig
    from .job.report import ModelSpec, run

    data = load_npz(args.data)
    factory = load_factory(args.model)
    n_train = min(args.n_train or data.x_train.shape[0], data.x_train.shape[0])
    n_test = min(args.n_test or data.x_test.shape[0], data.x_test.shape[0])
    spec = ModelSpec(args.name or args.model.rsplit(":", 1)[1], factory, args.widths, n_train, n_test,
                     args.convergence_widths)
    train = TrainConfig(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size)
    run([(data, [spec])], args.out, train=train, noise=args.noise,
        convergence_inputs=args.convergence_inputs, progress=not args.quiet)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="tensorprograms",
        description="Infinite-width limits of neural networks with Tensor Programs. "
                    "`tensorprograms demo` is the main job; `tensorprograms report` runs the same "
                    "pieces on your own model and data.",
    )
    sub = parser.add_subparsers(dest="command")
    demo = sub.add_parser(
        "demo", help="the main job (what `make demo` runs): MLP, 1-D CNN and GRU on MNIST-1D and digits, "
        "SGD at several widths vs the NNGP/NTK limits, kernel convergence; writes out/report/")
    demo.add_argument("--out", default="out/report", help="output folder (default out/report)")
    demo.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    sub.add_parser("basics", help="limits of a small program and of a 3-layer MLP, checked against finite "
                   "width (the former demo)")
    rep = sub.add_parser(
        "report", help="the main job's pieces on your module and data: test accuracy of the finite network "
        "(SGD) at each width and of its NNGP/NTK limits (one-hot regression), and kernel convergence",
        description="Example: tensorprograms report --model mymodels.py:make_net --data mydata.npz "
        "--widths 64 256 --out out/mine. The factory is called as factory(width) and must return an "
        "nn.Module mapping x [N, ...] to logits [N, classes].")
    rep.add_argument("--model", required=True,
                     help="MODULE:FACTORY or FILE.py:FACTORY, a function width -> nn.Module")
    rep.add_argument("--data", required=True, help=NPZ_HELP)
    rep.add_argument("--out", default="out/report", help="output folder (default out/report)")
    rep.add_argument("--name", default=None, help="model name in the table (default: the factory's name)")
    rep.add_argument("--widths", type=int, nargs="*", default=[64, 256, 1024],
                     help="finite widths trained by SGD (default 64 256 1024; none: skip)")
    rep.add_argument("--n-train", type=int, default=None, help="training subsample size (default: all)")
    rep.add_argument("--n-test", type=int, default=None, help="test subsample size (default: all)")
    rep.add_argument("--epochs", type=int, default=40, help="SGD epochs (default 40)")
    rep.add_argument("--lr", type=float, default=0.05, help="SGD learning rate (default 0.05, momentum 0.9)")
    rep.add_argument("--batch-size", type=int, default=64, help="SGD minibatch (default 64)")
    rep.add_argument("--noise", type=float, default=1e-6,
                     help="noise/ridge on the kernel diagonal (default 1e-6)")
    rep.add_argument("--convergence-widths", type=int, nargs="*", default=[],
                     help="widths for the kernel-convergence table (default: skip)")
    rep.add_argument("--convergence-inputs", type=int, default=8, help="test inputs used for it (default 8)")
    rep.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    rep.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from . import demo

        demo.main(["--out", args.out, "--threads", str(args.threads)])
        return 0
    if args.command == "basics":
        from . import basics

        basics.main()
        return 0
    if args.command == "report":
        import torch

        torch.set_num_threads(args.threads)
        return _report(args)
    parser.print_help()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
