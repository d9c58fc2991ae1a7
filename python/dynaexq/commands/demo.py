"""`dynaexq demo`: a short demonstration of the expert pool and precision state machine."""

from __future__ import annotations

import argparse

HELP = "a short demonstration of the expert pool and precision state machine"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    pass


def run(args: argparse.Namespace) -> int:
    print("dynaexq demo: the pool is not built yet")
    return 0
