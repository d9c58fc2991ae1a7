"""Transfer engine figures, measured side by side in one run (reported, never asserted).

1. Copy throughput of the engine's backend vs a plain memcpy of the same bytes.
2. Overlap: a compute loop of torch matmuls sized like an expert GEMM, alone and with a
   stream of migrations running beside it: step-time ratio.
3. Submit + poll overhead per transfer from Python (manual backend: no copy cost).

    python benchmarks/bench_transfer.py [--backend cpu|cuda] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
import time

import numpy as np
import torch
from dynaexq import (
    ExpertPool,
    ExpertTable,
    HostStore,
    IllegalTransition,
    QueueFull,
    TransferEngine,
    plan_layout,
)


def rig(
    experts: int, lo: int, hi: int, backend: str, workers: int = 1
) -> tuple[ExpertPool, ExpertTable, HostStore, TransferEngine]:
    layout = plan_layout(1 << 40, [experts], [lo], [hi], experts // 4, staging=4)
    device = 0 if backend == "cuda" else None
    pool = ExpertPool(layout.slot_bytes, layout.slots, layout.alignment, device=device)
    table = ExpertTable(pool, layout.experts, layout.tier_classes, layout.initial_tiers())
    store = HostStore([experts], [[lo, hi]], device=device)
    blob = os.urandom(hi)
    for e in range(experts):
        store.write(0, e, 0, blob[:lo])
        store.write(0, e, 1, blob)
    engine = TransferEngine(table, store, max_in_flight=4, backend=backend, workers=workers)
    return pool, table, store, engine


def churn(table: ExpertTable, engine: TransferEngine, experts: int, n: int) -> tuple[int, float]:
    """Run n migrations (a controller-like promote/demote mix keeping experts/4 hot), up to
    max_in_flight at once; returns (bytes moved, seconds)."""
    moved0 = engine.stats()["bytes_moved"]
    t0 = time.perf_counter()
    submitted = 0
    i = 0
    while submitted < n:
        i += 1
        tiers = [table.tier(0, e) for e in range(experts)]
        want = 1 if sum(tiers) < experts // 4 else 0
        cands = [e for e in range(experts) if tiers[e] != want]
        try:
            engine.submit(0, cands[i % len(cands)], want, urgent=True)
            submitted += 1
        except (QueueFull, IllegalTransition):
            engine.drain(timeout=1.0)
    engine.drain(timeout=60)
    return engine.stats()["bytes_moved"] - moved0, time.perf_counter() - t0


def copy_throughput(backend: str, hi: int) -> dict[str, float]:
    experts = 16
    _, table, store, engine = rig(experts, hi // 4, hi, backend)
    nbytes, secs = churn(table, engine, experts, 200)
    engine_gbs = nbytes / secs / 1e9
    # The same kind of copies with a plain memcpy: every expert's packed bytes from the
    # host store into its own destination (cold, distinct memory, like pool blocks).
    srcs = [
        np.frombuffer(store.view(0, e, t), dtype=np.uint8) for e in range(experts) for t in (0, 1)
    ]
    dst = np.empty(sum(s.nbytes for s in srcs), dtype=np.uint8)
    total, t0 = 0, time.perf_counter()
    while total < nbytes:
        off = 0
        for s in srcs:
            np.copyto(dst[off : off + s.nbytes], s)
            off += s.nbytes
        total += off
    memcpy_gbs = total / (time.perf_counter() - t0) / 1e9
    out = {"engine_GBps": engine_gbs, "memcpy_GBps": memcpy_gbs, "ratio": engine_gbs / memcpy_gbs}
    if backend == "cuda":
        # The device baseline: torch's pinned-host -> device copies of the same sizes, one
        # stream, synchronised once per sweep (what a framework's offloading does).
        src = [torch.from_numpy(s.copy()).pin_memory() for s in srcs]
        dev = [torch.empty(s.numel(), dtype=torch.uint8, device="cuda") for s in src]
        total, t0 = 0, time.perf_counter()
        while total < nbytes:
            for s, d in zip(src, dev, strict=True):
                d.copy_(s, non_blocking=True)
                total += s.numel()
            torch.cuda.synchronize()
        torch_gbs = total / (time.perf_counter() - t0) / 1e9
        out |= {"torch_h2d_GBps": torch_gbs, "ratio_vs_torch_h2d": engine_gbs / torch_gbs}
    return out


def overlap(backend: str, hi: int, steps: int, rounds: int = 5) -> dict[str, float]:
    dev = "cuda" if backend == "cuda" else "cpu"
    # Qwen3-30B-A3B expert: hidden 2048 x intermediate 768; a decode batch of 32 tokens.
    x = torch.randn(32, 2048, device=dev)
    w = torch.randn(2048, 768, device=dev)

    def step_times() -> list[float]:
        out = []
        for _ in range(steps):
            t0 = time.perf_counter()
            for _ in range(8):
                y = x @ w
            if dev == "cuda":
                torch.cuda.synchronize()
            out.append(time.perf_counter() - t0)
            del y
        return out

    step_times()  # warm up
    experts = 16
    _, table, _, engine = rig(experts, hi // 4, hi, backend)
    alone: list[float] = []
    busy: list[float] = []
    # Alternate rounds so background load on a shared machine hits both sides alike.
    for _ in range(rounds):
        alone += step_times()
        stop = threading.Event()

        def migrate(stop: threading.Event = stop) -> None:
            while not stop.is_set():
                churn(table, engine, experts, 4)

        t = threading.Thread(target=migrate)
        t.start()
        try:
            busy += step_times()
        finally:
            stop.set()
            t.join()
    a, b = statistics.median(alone), statistics.median(busy)
    return {"step_alone_ms": a * 1e3, "step_with_migrations_ms": b * 1e3, "ratio": b / a}


def submit_poll_overhead(n: int) -> dict[str, float]:
    experts = 64
    layout = plan_layout(1 << 30, [experts], [256], [1024], experts // 2, staging=8)
    pool = ExpertPool(layout.slot_bytes, layout.slots, layout.alignment)
    table = ExpertTable(pool, layout.experts, layout.tier_classes, layout.initial_tiers())
    store = HostStore([experts], [[256, 1024]])
    for e in range(experts):
        store.write(0, e, 0, bytes(256))
        store.write(0, e, 1, bytes(1024))
    engine = TransferEngine(table, store, max_in_flight=8, queue_capacity=1024, backend="manual")
    per = []
    for _ in range(n):
        e = int(torch.randint(experts, ()).item())
        t0 = time.perf_counter()
        try:
            tid = engine.submit(0, e, 1 - table.tier(0, e))
        except (QueueFull, IllegalTransition):
            continue
        engine.poll()
        per.append(time.perf_counter() - t0)
        engine.finish_copy(tid, True)
        engine.poll()
    return {"submit_plus_poll_us": statistics.median(per) * 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--slot-bytes", type=int, default=4 << 20, help="high-tier expert size")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", default=None, help="write results.json here")
    args = parser.parse_args()
    res = {
        "backend": args.backend,
        "torch_threads": torch.get_num_threads(),
        "copy": copy_throughput(args.backend, args.slot_bytes),
        "overlap": overlap(args.backend, args.slot_bytes, args.steps),
        "submit_poll": submit_poll_overhead(2000),
    }
    print(json.dumps(res, indent=2))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, f"bench_transfer_{args.backend}.json"), "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
