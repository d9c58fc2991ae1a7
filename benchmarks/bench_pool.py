"""Pool / table call costs from Python, side by side with torch.empty.

Prints the time of one pool call, of an alloc+free pair, of a lease+release, and the
ratio of a pool alloc+free to `torch.empty` of the same slot size measured in the same
run. Figures are reported, never asserted.

    python benchmarks/bench_pool.py [--slot-bytes N] [--repeat R]
"""

from __future__ import annotations

import argparse
import timeit

import torch
from dynaexq import ExpertPool, ExpertTable


def best_ns(fn: object, number: int, repeat: int) -> float:
    """Best-of-`repeat` mean time per call in ns (best filters scheduler noise)."""
    times = timeit.repeat(fn, number=number, repeat=repeat)  # type: ignore[arg-type]
    return min(times) / number * 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slot-bytes", type=int, default=3 << 20, help="slot size (3 MiB)")
    parser.add_argument("--number", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()

    pool = ExpertPool(
        {"lo": args.slot_bytes, "hi": 4 * args.slot_bytes}, {"lo": 64, "hi": 4}, budget=None
    )
    table = ExpertTable(pool, [32], [["lo", "hi"]])
    n, r = args.number, args.repeat

    def alloc_free() -> None:
        pool.free(pool.alloc("lo"))

    def lease_release() -> None:
        with table.lease(0, 3):
            pass

    def torch_empty() -> None:
        torch.empty(args.slot_bytes, dtype=torch.uint8)

    one_call = best_ns(lambda: pool.free_count("lo"), n, r)
    pair = best_ns(alloc_free, n, r)
    lease = best_ns(lease_release, n, r)
    empty = best_ns(torch_empty, n, r)
    print(f"slot size: {args.slot_bytes} B; best of {r} x {n} calls")
    print(f"one pool call (free_count):      {one_call:8.0f} ns")
    print(f"pool alloc+free pair:            {pair:8.0f} ns")
    print(f"table lease+release (with):      {lease:8.0f} ns")
    print(f"torch.empty({args.slot_bytes} B, uint8): {empty:8.0f} ns")
    print(f"ratio pool alloc+free / torch.empty: {pair / empty:.3f}")


if __name__ == "__main__":
    main()
