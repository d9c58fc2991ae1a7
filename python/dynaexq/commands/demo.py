"""`dynaexq demo`: a short demonstration of the expert pool and precision state machine.

Sizes a two-tier pool from a byte budget, puts every expert of a toy MoE in it, then
promotes and demotes experts while a reader holds a lease, showing that a new version is
invisible until its copy completes, that a failed copy rolls back, and that an old block
is reclaimed only after its lease is released and its last use has completed.
"""

from __future__ import annotations

import argparse

HELP = "a short demonstration of the expert pool and precision state machine"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--layers", type=int, default=2, help="MoE layers")
    parser.add_argument("--experts", type=int, default=8, help="experts per layer")
    parser.add_argument("--lo-bytes", type=int, default=3_000, help="packed low-tier expert")
    parser.add_argument("--hi-bytes", type=int, default=12_000, help="packed high-tier expert")
    parser.add_argument("--hot", type=float, default=0.25, help="fraction of hot slots")
    parser.add_argument("--staging", type=int, default=2, help="transitions in flight")
    parser.add_argument("--budget", type=int, default=128_000, help="byte budget")


def _tag(tag: int, size: int) -> bytes:
    return bytes([tag % 256]) * size


def run(args: argparse.Namespace) -> int:
    from dynaexq import (
        ExpertPool,
        ExpertTable,
        HostStore,
        LayoutError,
        PoolExhausted,
        TransferEngine,
        plan_layout,
    )

    n = args.layers
    try:
        layout = plan_layout(
            args.budget,
            [args.experts] * n,
            [args.lo_bytes] * n,
            [args.hi_bytes] * n,
            args.hot,
            staging=args.staging,
        )
    except LayoutError as e:
        print(f"the budget does not fit: {e}")
        return 1
    print(f"budget {args.budget} B -> layout of {layout.total_bytes} B")
    for name, size in layout.slot_bytes.items():
        print(f"  class {name:>10}: {layout.slots[name]:3d} slots x {size} B")
    pool = ExpertPool(layout.slot_bytes, layout.slots, layout.alignment)
    table = ExpertTable(
        pool, layout.experts, layout.tier_classes, layout.initial_tiers(), manual_fence=True
    )
    for layer in range(n):
        for e in range(args.experts):
            # Version 1's bytes, before the first lease; a real runtime loads the packed
            # expert here.
            size = args.hi_bytes if table.tier(layer, e) else args.lo_bytes
            table.load(layer, e, _tag(1, size))
    tiers = [[table.tier(layer, e) for e in range(args.experts)] for layer in range(n)]
    print(f"initial tiers (1 = high precision): {tiers}")

    print("\n-- promote expert (0, 5) while a reader holds a lease on it")
    reader = table.lease(0, 5)
    reader.record_use()  # e.g. a kernel launched on the compute stream
    print(f"reader sees {reader.version}")
    demote = table.begin(0, 0, 0)  # a replacement pair: make room for the newcomer
    promote = table.begin(0, 5, 1)
    print(f"admitted {demote} into {demote.block}\nadmitted {promote} into {promote.block}")
    demote.write(_tag(2, args.lo_bytes))  # only the owner of a transition writes its block
    promote.write(_tag(2, args.hi_bytes))
    print(f"before completion, readers still get {table.published(0, 5)}")
    table.complete(demote)
    new = table.complete(promote)
    print(f"after completion, new leases get {new}; the old reader keeps {reader.version}")
    print(f"retired, waiting for lease + last use: {table.retired()}")
    reader.release()
    print(f"lease released, use still running -> reclaimed {table.reclaim()}")
    table.signal_uses()
    print(f"use completed -> reclaimed {table.reclaim()}")

    print("\n-- a failed copy rolls back")
    before = table.published(1, 3)
    t = table.begin(1, 3, 1)
    table.abort(t)
    print(f"expert (1, 3) is still {table.published(1, 3)} (was {before})")

    print("\n-- admission control: transitions beyond the staging slots are refused")
    admitted = []
    try:
        for e in range(args.experts):
            if table.tier(1, e) == 0 and table.transition_of(1, e) is None:
                admitted.append(table.begin(1, e, 1))
    except PoolExhausted as e:
        print(f"admitted {len(admitted)}, then: {e}")
    for t in admitted:
        table.abort(t)

    print("\n-- the transfer engine: copies from a host tier store, published when done")
    store = HostStore(layout.experts, [[args.lo_bytes, args.hi_bytes]] * n)
    for layer in range(n):
        for e in range(args.experts):
            for tier, size in ((0, args.lo_bytes), (1, args.hi_bytes)):
                store.write(layer, e, tier, bytes([(layer * 16 + e * 2 + tier) % 256]) * size)
    # The engine uploads every published version from the store, so it takes a table
    # nobody has leased yet (one engine per table; it alone settles its transitions).
    pool = ExpertPool(layout.slot_bytes, layout.slots, layout.alignment)
    table = ExpertTable(pool, layout.experts, layout.tier_classes, layout.initial_tiers())
    engine = TransferEngine(table, store, max_in_flight=2, backend="cpu")
    steps = [("demote (1, 0)", (1, 0, 0), None), ("promote (1, 6)", (1, 6, 1), None)]
    steps.append(("promote (1, 7) with an injected copy failure", (1, 7, 1), "fail"))
    for what, (layer, e, tier), fault in steps:
        tid = engine.submit(layer, e, tier, urgent=True, fault=fault)
        print(f"{what}: {engine.wait(tid, timeout=10)}")
    with table.lease(1, 6) as lease:
        same = bytes(lease.view()[: args.hi_bytes]) == bytes(store.view(1, 6, 1))
        print(f"(1, 6) now {lease.version}; its bytes equal the store's: {same}")
    print(f"(1, 7) stayed {table.published(1, 7)}; engine: {engine.stats()}")

    s = pool.stats()
    print(
        f"\npool: {s['reserved_bytes']} of {s['total_bytes']} B reserved, "
        f"high-water {s['high_water_bytes']} B; table: {table.stats()}"
    )
    return 0
