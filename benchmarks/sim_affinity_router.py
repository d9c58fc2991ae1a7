"""How well `HotSetAffinityRouter` keeps two interleaved domains apart, without Ray.

The traffic of `tests/test_serve_ray.py::test_affinity_router_specialises_replicas`
(python / C windows of the embedded model's held-out text, shuffled, `--in-flight`
requests at a time over 2 replicas) is replayed through the router's own
`choose_replicas` / `on_request_routed` with simulated service times (exponential, mean
growing with the replica's load), many seeds. Prints the distribution of specialisation
over the run's second half (the share of requests on their domain's replica under the
best pairing; 0.5 is no specialisation) and, for reference, an oracle that knows each
request's domain under the same load rule (the ceiling the `imbalance` rule leaves).

    python benchmarks/sim_affinity_router.py --seeds 80 --per-domain 48
"""

from __future__ import annotations

import argparse
import asyncio
import heapq
import json
import types
from typing import Any

import numpy as np
from dynaexq.engine import embedded_model_path
from dynaexq.serve import ray as serve_ray

DOMAINS = ("python", "c")


def windows(domain: str, n: int, length: int, seed: int) -> list[list[int]]:
    data = np.load(embedded_model_path() / "heldout" / f"{domain}.npy").astype(np.int64)
    rng = np.random.default_rng(seed)
    return [data[o : o + length].tolist() for o in rng.integers(0, len(data) - length, n)]


def one_run(
    signature: Any, seed: int, per_domain: int, in_flight: int, oracle: bool, kw: dict
) -> float:
    ws = {d: windows(d, per_domain, 128, seed * 2 + k) for k, d in enumerate(DOMAINS)}
    traffic = [(d, ws[d][i]) for i in range(per_domain) for d in DOMAINS]
    np.random.default_rng(seed + 1000).shuffle(traffic)
    router = serve_ray.HotSetAffinityRouter.__new__(serve_ray.HotSetAffinityRouter)
    router.initialize_state(**kw)
    loads = {0: 0, 1: 0}
    router._replica_queue_len_cache = types.SimpleNamespace(get=lambda rid: loads[rid])
    replicas = [types.SimpleNamespace(replica_id=i, routing_stats={}) for i in loads]
    rng = np.random.default_rng(seed)
    events: list[tuple[float, int, int]] = []
    routed: list[tuple[str, int]] = []

    def submit(now: float, n: int) -> None:
        domain, ids = traffic[n]
        pending = types.SimpleNamespace(
            args=[{"specs": [], "signature": signature(ids)}],
            metadata=types.SimpleNamespace(internal_request_id=str(n)),
            routing_context=types.SimpleNamespace(),
        )
        chosen = asyncio.run(router.choose_replicas(replicas, pending))[0][0].replica_id
        if oracle:
            want, least = DOMAINS.index(domain), min(loads.values())
            chosen = want if loads[want] <= least + router.imbalance else 1 - want
        router.on_request_routed(pending, chosen, None)
        loads[chosen] += 1
        routed.append((domain, chosen))
        service = rng.exponential(1.0) * (1 + 0.5 * loads[chosen])
        heapq.heappush(events, (now + service, n, chosen))

    n = 0
    while n < min(in_flight, len(traffic)):
        submit(0.0, n)
        n += 1
    while events:
        now, _, replica = heapq.heappop(events)
        loads[replica] -= 1
        if n < len(traffic):
            submit(now, n)
            n += 1
    second = routed[len(routed) // 2 :]
    same = sum(r == DOMAINS.index(d) for d, r in second) / len(second)
    return max(same, 1 - same)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=80)
    ap.add_argument("--per-domain", type=int, default=48)
    ap.add_argument("--in-flight", type=int, default=4)
    ap.add_argument("--router-kwargs", type=json.loads, default={}, help='e.g. {"imbalance": 3}')
    args = ap.parse_args()
    signature = serve_ray.PromptSignature.from_checkpoint(embedded_model_path())
    for oracle in (False, True):
        runs = np.array(
            [
                one_run(signature, s, args.per_domain, args.in_flight, oracle, args.router_kwargs)
                for s in range(args.seeds)
            ]
        )
        name = "oracle (knows the domain)" if oracle else "HotSetAffinityRouter"
        print(
            f"{name:26s} specialisation mean {runs.mean():.3f}, 10th percentile "
            f"{np.percentile(runs, 10):.3f}, min {runs.min():.3f}; runs under 0.6: "
            f"{(runs < 0.6).mean():.1%}, under 0.65: {(runs < 0.65).mean():.1%}"
        )


if __name__ == "__main__":
    main()
