"""Figures for dynaexq on Ray Serve (CPU, loopback only, bounded loops).

    python examples/ray/bench_ray.py affinity [N [ROUTER_KWARGS_JSON [ROUTERS]]]
                                                # affinity vs Ray's default router, mixed domains
    python examples/ray/bench_ray.py scaling    # throughput, p50/p99 at 1 vs 2 replicas

Prints one JSON object per run. Starts its own small Ray instance (num_cpus=2, no
dashboard) and shuts it down.
"""

from __future__ import annotations

import http.client
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

HOST, PORT = "127.0.0.1", 8437
DOMAINS = ("python", "c")


def windows(domain: str, n: int, length: int, seed: int) -> list[list[int]]:
    from dynaexq.engine import embedded_model_path

    data = np.load(embedded_model_path() / "heldout" / f"{domain}.npy").astype(np.int64)
    rng = np.random.default_rng(seed)
    return [data[o : o + length].tolist() for o in rng.integers(0, len(data) - length, n)]


def post(path: str, body: dict[str, Any], timeout: float = 120) -> tuple[int, dict, Any]:
    conn = http.client.HTTPConnection(HOST, PORT, timeout=timeout)
    try:
        conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        r = conn.getresponse()
        raw = r.read()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, json.loads(raw)
    finally:
        conn.close()


def get(path: str) -> Any:
    conn = http.client.HTTPConnection(HOST, PORT, timeout=30)
    try:
        conn.request("GET", path)
        return json.loads(conn.getresponse().read())
    finally:
        conn.close()


def deploy(**options: Any) -> None:
    from dynaexq.serve.ray import build_app
    from ray import serve

    serve.run(build_app(options), name="dynaexq", route_prefix="/", blocking=False)


def score(ids: list[int]) -> tuple[str, float, int]:
    """Echo-score a window: (replica, summed NLL, scored tokens)."""
    status, headers, body = post(
        "/v1/completions",
        {"model": "dynaexq-embedded", "prompt": ids, "max_tokens": 0, "echo": True, "logprobs": 0},
    )
    assert status == 200, body
    lps = [v for v in body["choices"][0]["logprobs"]["token_logprobs"] if v is not None]
    return headers.get("x-dynaexq-replica", "?"), -float(sum(lps)), len(lps)


def affinity_run(
    router: str, requests: int, concurrency: int, length: int, kwargs: dict[str, Any]
) -> dict[str, Any]:
    from ray import serve

    deploy(
        replicas=2, num_cpus=1, threads=1, policy="dynamic", budget="20%", router=router,
        max_batch=4, max_queue=8, max_context=256, routing_stats_period_s=1.0,
        router_kwargs=kwargs if router == "affinity" else {},
    )  # fmt: skip
    per = requests // len(DOMAINS)
    traffic = []
    ws = {d: windows(d, per, length, seed=k) for k, d in enumerate(DOMAINS)}
    for i in range(per):  # interleaved: python, c, python, c, ...
        for d in DOMAINS:
            traffic.append((d, ws[d][i]))
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda t: (t[0], *score(t[1])), traffic))
    wall = time.perf_counter() - t0
    stats = get("/replicas")
    serve.delete("dynaexq")
    half = len(results) // 2
    out: dict[str, Any] = {"router": router, "requests": len(results), "wall_s": round(wall, 2)}
    for d in DOMAINS:
        mine = [r for r in results[half:] if r[0] == d]
        counts: dict[str, int] = {}
        for r in mine:
            counts[r[1]] = counts.get(r[1], 0) + 1
        top = max(counts, key=counts.__getitem__)
        out[f"{d}_top_replica"] = top
        out[f"{d}_top_replica_share"] = round(counts[top] / len(mine), 3)
        out[f"{d}_nll_per_token_2nd_half"] = round(
            sum(r[2] for r in mine) / sum(r[3] for r in mine), 4
        )
    reps = stats["replicas"]
    hot = [{(li, e) for li, row in enumerate(s["hot"]) for e in row} for s in reps.values()]
    if len(hot) == 2:
        out["hot_set_jaccard"] = round(len(hot[0] & hot[1]) / max(1, len(hot[0] | hot[1])), 3)
    out["hi_mass_share_per_replica"] = {
        k: round(v["hi_mass_share"], 4) for k, v in sorted(reps.items())
    }
    out["served_by"] = stats["served_by"]
    return out


def reference_nll(length: int, per: int) -> dict[str, float]:
    """In-process NLL per token of the same second-half windows: full precision, static-map."""
    import dynaexq
    import torch

    out = {}
    for policy in ("full", "static-map"):
        eng = dynaexq.load() if policy == "full" else dynaexq.load(budget="20%", policy=policy)
        for k, d in enumerate(DOMAINS):
            ws = windows(d, per, length, seed=k)[per // 2 :]
            logits = eng.forward(ws)
            lp = torch.log_softmax(logits[:, :-1], -1)
            tgt = torch.tensor(ws)[:, 1:]
            nll = -lp.gather(2, tgt.unsqueeze(-1)).sum() / tgt.numel()
            out[f"{policy}_{d}"] = round(float(nll), 4)
    return out


def scaling_run(replicas: int, threads: int, requests: int, concurrency: int) -> dict[str, Any]:
    from ray import serve

    deploy(
        replicas=replicas, num_cpus=2 / replicas, threads=threads, router="pow2",
        max_batch=8, max_queue=16, max_context=256,
    )  # fmt: skip
    prompts = [w[:32] for w in windows("prose", requests, 32, seed=7)]

    def one(ids: list[int]) -> tuple[float, int]:
        t = time.perf_counter()
        status, _, body = post(
            "/v1/completions",
            {"model": "dynaexq-embedded", "prompt": ids, "max_tokens": 32, "temperature": 0,
             "ignore_eos": True},
        )  # fmt: skip
        assert status == 200, body
        return time.perf_counter() - t, body["usage"]["completion_tokens"]

    one(prompts[0])  # warm
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        res = list(pool.map(one, prompts))
    wall = time.perf_counter() - t0
    serve.delete("dynaexq")
    lat = np.array([r[0] for r in res])
    return {
        "replicas": replicas,
        "threads_per_replica": threads,
        "requests": requests,
        "concurrency": concurrency,
        "tokens_per_s": round(sum(r[1] for r in res) / wall, 1),
        "requests_per_s": round(len(res) / wall, 2),
        "p50_s": round(float(np.percentile(lat, 50)), 3),
        "p99_s": round(float(np.percentile(lat, 99)), 3),
    }


def main() -> None:
    import ray
    from ray import serve

    which = sys.argv[1] if len(sys.argv) > 1 else "affinity"
    requests = int(sys.argv[2]) if len(sys.argv) > 2 else 96
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": HOST, "port": PORT})
    try:
        if which == "affinity":
            kwargs = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
            routers = sys.argv[4].split(",") if len(sys.argv) > 4 else ["affinity", "pow2"]
            for router in routers:
                run = affinity_run(router, requests, 4, 128, kwargs)
                print(json.dumps({**run, "router_kwargs": kwargs}), flush=True)
            if len(sys.argv) <= 4:
                print(json.dumps(reference_nll(128, requests // 2)), flush=True)
        else:
            # replicas x torch threads on the same 2 cores (1x1: one core left idle)
            for n, threads in ((1, 2), (2, 1), (1, 1)):
                print(json.dumps(scaling_run(n, threads, requests, 8)), flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
