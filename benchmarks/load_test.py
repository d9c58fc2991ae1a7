"""Load test: N concurrent clients for M seconds against an OpenAI-compatible server.

Each client sends streaming /v1/completions requests back to back (the official `openai`
async client) and records latency, time to first token, tokens and errors. The report:
requests served, errors by kind, p50/p99 of latency, TTFT and time per output token,
generated tokens/s and requests/s over the run, plus the server's own /stats deltas
(steps, expert transitions, bytes moved) when it is a dynaexq server.

    python benchmarks/load_test.py --url http://127.0.0.1:8000 --clients 8 --duration 60
    # or start `dynaexq serve` for the run (on a free loopback port) and stop it after:
    python benchmarks/load_test.py --serve "--model path/to/ckpt --max-batch 16" -c 8 -d 60
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

PROMPTS = [
    "The quick brown fox",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the sea,",
    "int main(void) {",
    "Mixture-of-experts models route each token to",
    "The capital of France is",
    "import numpy as np\n\ndef normalize(x):",
    "In a few words, the reason the sky is blue is",
]


@dataclass
class Sample:
    ok: bool
    latency: float = 0.0
    ttft: float | None = None
    tokens: int = 0
    error: str | None = None


@dataclass
class Report:
    url: str
    model: str
    clients: int
    duration_s: float
    max_tokens: int
    requests: int = 0
    errors: int = 0
    error_kinds: dict[str, int] = field(default_factory=dict)
    tokens: int = 0
    tokens_per_s: float = 0.0
    requests_per_s: float = 0.0
    latency_p50_s: float | None = None
    latency_p99_s: float | None = None
    ttft_p50_s: float | None = None
    ttft_p99_s: float | None = None
    tpot_p50_s: float | None = None
    tpot_p99_s: float | None = None
    server: dict[str, Any] = field(default_factory=dict)


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in [0, 100]); None for no values."""
    if not values:
        return None
    s = sorted(values)
    k = max(0, min(len(s) - 1, int(round(q / 100 * len(s) + 0.5)) - 1))
    return s[k]


def get_json(url: str) -> dict[str, Any] | None:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return json.loads(r.read())
    except (OSError, ValueError):
        return None


async def client_loop(
    client: Any, model: str, args: argparse.Namespace, idx: int, deadline: float
) -> list[Sample]:
    samples: list[Sample] = []
    i = idx
    while time.perf_counter() < deadline:
        prompt = PROMPTS[i % len(PROMPTS)]
        i += args.clients
        start = time.perf_counter()
        ttft, tokens = None, 0
        try:
            stream = await client.completions.create(
                model=model,
                prompt=prompt,
                max_tokens=args.max_tokens,
                temperature=args.temperature,
                stream=True,
                stream_options={"include_usage": True},
                extra_body={"ignore_eos": True} if args.ignore_eos else None,
            )
            async for chunk in stream:
                if ttft is None and chunk.choices and chunk.choices[0].text:
                    ttft = time.perf_counter() - start
                if chunk.usage is not None:
                    tokens = chunk.usage.completion_tokens
            samples.append(Sample(True, time.perf_counter() - start, ttft, tokens))
        except Exception as e:  # every failure is a data point, never the end of the run
            status = getattr(e, "status_code", None)
            kind = f"{type(e).__name__}" + (f" {status}" if status else "")
            samples.append(Sample(False, time.perf_counter() - start, error=kind))
            if status == 429:
                await asyncio.sleep(0.05)  # the queue is full: back off a little
    return samples


async def run_load(args: argparse.Namespace, url: str) -> Report:
    import openai

    client = openai.AsyncOpenAI(
        base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=args.timeout
    )
    model = args.model
    if model is None:
        models = await client.models.list()
        model = models.data[0].id
    before = get_json(f"{url}/stats")
    start = time.perf_counter()
    deadline = start + args.duration
    per_client = await asyncio.gather(
        *(client_loop(client, model, args, i, deadline) for i in range(args.clients))
    )
    wall = time.perf_counter() - start
    after = get_json(f"{url}/stats")
    await client.close()

    samples = [s for group in per_client for s in group]
    good = [s for s in samples if s.ok]
    rep = Report(url, model, args.clients, wall, args.max_tokens)
    rep.requests = len(good)
    rep.errors = len(samples) - len(good)
    for s in samples:
        if not s.ok and s.error:
            rep.error_kinds[s.error] = rep.error_kinds.get(s.error, 0) + 1
    rep.tokens = sum(s.tokens for s in good)
    rep.tokens_per_s = rep.tokens / wall
    rep.requests_per_s = rep.requests / wall
    lat = [s.latency for s in good]
    ttft = [s.ttft for s in good if s.ttft is not None]
    tpot = [
        (s.latency - s.ttft) / (s.tokens - 1) for s in good if s.ttft is not None and s.tokens > 1
    ]
    rep.latency_p50_s, rep.latency_p99_s = percentile(lat, 50), percentile(lat, 99)
    rep.ttft_p50_s, rep.ttft_p99_s = percentile(ttft, 50), percentile(ttft, 99)
    rep.tpot_p50_s, rep.tpot_p99_s = percentile(tpot, 50), percentile(tpot, 99)
    if before and after:
        rep.server = {
            "steps": after["steps"] - before["steps"],
            "generated_tokens": after["generated_tokens"] - before["generated_tokens"],
            "requests_finished": after["requests_finished"] - before["requests_finished"],
            "max_batch": after.get("max_batch"),
        }
        rb, ra = before.get("runtime") or {}, after.get("runtime") or {}
        if ra:
            rep.server["policy"] = ra.get("policy")
            for key in ("transitions", "bytes_moved"):
                rep.server[key] = {
                    k: v - (rb.get(key) or {}).get(k, 0) for k, v in (ra.get(key) or {}).items()
                }
            rep.server["expert_wait_s"] = ra.get("expert_wait_seconds", 0.0) - rb.get(
                "expert_wait_seconds", 0.0
            )
    return rep


def start_server(serve_args: str, log: Path) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "dynaexq.cli", "serve", "--host", "127.0.0.1", "--port", "0"]
    cmd += ["--log-level", "warning", *shlex.split(serve_args)]
    f = open(log, "w")  # noqa: SIM115 (lives as long as the server)
    proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None:
        m = re.search(r"on http://127\.0\.0\.1:(\d+)/v1", log.read_text())
        if m:
            url = f"http://127.0.0.1:{m.group(1)}"
            health = get_json(f"{url}/health")
            if health and health.get("status") == "ok":
                return proc, url
        time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"the server did not start:\n{log.read_text()}")


def fmt(x: float | None, scale: float = 1.0, unit: str = "s") -> str:
    return (
        "-"
        if x is None
        else f"{x * scale:.3f} {unit}"
        if unit == "s"
        else f"{x * scale:.1f} {unit}"
    )


def print_report(rep: Report) -> None:
    print(
        f"load test: {rep.clients} clients x {rep.duration_s:.1f} s against {rep.url} "
        f"(model {rep.model}, max_tokens {rep.max_tokens})"
    )
    print(f"  requests served   {rep.requests}   ({rep.requests_per_s:.2f}/s)")
    kinds = ", ".join(f"{k}: {v}" for k, v in sorted(rep.error_kinds.items()))
    print(f"  errors            {rep.errors}" + (f"   ({kinds})" if kinds else ""))
    print(f"  generated tokens  {rep.tokens}   ({rep.tokens_per_s:.1f} tokens/s)")
    print(f"  latency   p50 {fmt(rep.latency_p50_s)}   p99 {fmt(rep.latency_p99_s)}")
    print(f"  TTFT      p50 {fmt(rep.ttft_p50_s)}   p99 {fmt(rep.ttft_p99_s)}")
    print(
        f"  TPOT      p50 {fmt(rep.tpot_p50_s, 1e3, 'ms')}   p99 {fmt(rep.tpot_p99_s, 1e3, 'ms')}"
    )
    if rep.server:
        print(f"  server    {json.dumps(rep.server)}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default=None, help="server base URL (without /v1)")
    p.add_argument(
        "--serve",
        default=None,
        metavar="ARGS",
        help="start `dynaexq serve ARGS` on a free loopback port for the run instead of --url",
    )
    p.add_argument("-c", "--clients", type=int, default=8, help="concurrent clients")
    p.add_argument("-d", "--duration", type=float, default=60.0, help="seconds to run")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens per request")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument(
        "--no-ignore-eos",
        dest="ignore_eos",
        action="store_false",
        help="let requests end at EOS (default: always generate max-tokens, a dynaexq extension)",
    )
    p.add_argument("--model", default=None, help="model id (default: the server's first)")
    p.add_argument("--timeout", type=float, default=300.0, help="per-request timeout, seconds")
    p.add_argument("--json", type=Path, default=None, help="also write the report as JSON here")
    args = p.parse_args(argv)
    if (args.url is None) == (args.serve is None):
        p.error("give exactly one of --url and --serve")
    if args.clients < 1 or args.duration <= 0 or args.max_tokens < 1:
        p.error("--clients, --duration and --max-tokens must be positive")

    proc = None
    url = args.url.rstrip("/") if args.url else ""
    if args.serve is not None:
        log = Path(tempfile.mkdtemp(prefix="dynaexq-load-")) / "server.log"
        proc, url = start_server(args.serve, log)
        print(f"started dynaexq serve {args.serve} at {url} (log: {log})", file=sys.stderr)
    try:
        rep = asyncio.run(run_load(args, url))
    finally:
        if proc is not None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(120)
            except subprocess.TimeoutExpired:
                proc.kill()
    print_report(rep)
    if args.json is not None:
        args.json.write_text(json.dumps(asdict(rep), indent=2))
    return 0 if rep.requests > 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
