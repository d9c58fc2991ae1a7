"""The `dynaexq` command line."""

from __future__ import annotations

import argparse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dynaexq",
        description="Serve Mixture-of-Experts models with expert precision as a managed resource.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="a short demonstration of the expert pool and state machine")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        print("dynaexq demo: nothing yet")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
