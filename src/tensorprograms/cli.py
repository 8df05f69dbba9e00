"""Command-line interface: ``tensorprograms --help``."""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="tensorprograms",
        description="Infinite-width limits of neural networks with Tensor Programs.",
    )
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("demo", help="limits of a small program and of a 3-layer MLP, checked "
                   "against finite-width runs (what `make demo` runs)")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from . import demo

        demo.main()
        return 0
    parser.print_help()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
