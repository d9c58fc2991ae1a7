"""The `dynaexq` command line.

Each subcommand lives in its own module `dynaexq.commands.<name>` exposing
`HELP: str`, `add_arguments(parser)` and `run(args) -> int`. Modules import their heavy
dependencies (torch) inside `run`, so `dynaexq --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil

import dynaexq.commands as commands


def _command_modules() -> list[str]:
    # A leading underscore marks a helper the subcommands share, not a subcommand.
    return sorted(
        m.name
        for m in pkgutil.iter_modules(commands.__path__)
        if not m.ispkg and not m.name.startswith("_")
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dynaexq",
        description=(
            "Serve Mixture-of-Experts models on one memory-limited GPU with expert "
            "precision as a managed resource."
        ),
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in _command_modules():
        module = importlib.import_module(f"dynaexq.commands.{name}")
        p = sub.add_parser(
            getattr(module, "NAME", name),  # a module may name its command (lm-eval)
            help=module.HELP,
            description=module.HELP,
            formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        )
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args._run(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
