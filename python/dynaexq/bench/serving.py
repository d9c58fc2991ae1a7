"""Serving benchmark: every policy at equal device bytes under 1 / 8 / 32 concurrent
requests, through the server's own continuous-batching scheduler (in process) or over
HTTP against a running `dynaexq serve` (`url`).

Each level runs a closed loop: `concurrency` clients each send a request, wait for its
last token, and send the next, until `requests` have been served. Every request has the
same prompt length and generates exactly `max_tokens` tokens (greedy, EOS ignored), so
policies do the same work. Reported per (policy, level): generated tokens/s over the
level's wall time, TTFT and TPOT p50/p99, expert transitions and bytes moved, and for
offload the time the forward pass waited for experts.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch


@dataclass
class Sample:
    ttft: float
    tpot: float | None
    tokens: int
    latency: float


@dataclass
class LevelResult:
    policy: str
    concurrency: int
    requests: int
    errors: int
    tokens_per_s: float
    ttft_p50: float
    ttft_p99: float
    tpot_p50: float | None
    tpot_p99: float | None
    transitions: int = 0
    bytes_moved: int = 0
    expert_wait_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def _pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def prompts_from_tokens(streams: list[np.ndarray], count: int, length: int) -> list[list[int]]:
    """`count` prompts of `length` tokens taken in turn from the streams (a mixed load)."""
    out = []
    for i in range(count):
        s = streams[i % len(streams)]
        start = (i // len(streams)) * length * 3 % max(1, len(s) - length)
        out.append([int(t) for t in s[start : start + length]])
    return out


async def _closed_loop(submit, prompts: list[list[int]], concurrency: int) -> list[Sample]:
    """Run `prompts` with `concurrency` clients; `submit(prompt)` yields token arrival
    times (an async iterator)."""
    queue = list(reversed(prompts))
    samples: list[Sample] = []

    async def client() -> None:
        while queue:
            prompt = queue.pop()
            t0 = time.perf_counter()
            times: list[float] = []
            async for _ in submit(prompt):
                times.append(time.perf_counter())
            if not times:
                continue
            tpot = (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else None
            samples.append(Sample(times[0] - t0, tpot, len(times), times[-1] - t0))

    await asyncio.gather(*(client() for _ in range(concurrency)))
    return samples


def _summarize(
    policy: str, concurrency: int, samples: list[Sample], wall: float, n: int
) -> LevelResult:
    tokens = sum(s.tokens for s in samples)
    tpots = [s.tpot for s in samples if s.tpot is not None]
    return LevelResult(
        policy=policy,
        concurrency=concurrency,
        requests=len(samples),
        errors=n - len(samples),
        tokens_per_s=tokens / wall if wall > 0 else 0.0,
        ttft_p50=_pct([s.ttft for s in samples], 50) or 0.0,
        ttft_p99=_pct([s.ttft for s in samples], 99) or 0.0,
        tpot_p50=_pct(tpots, 50),
        tpot_p99=_pct(tpots, 99),
    )


def bench_in_process(
    policy: str,
    *,
    model: Path | None,
    budget: int | None,
    tiers: str,
    levels: list[int],
    requests_per_level: int,
    prompt_tokens: int,
    max_tokens: int,
    prompts: list[list[int]],
    calibration: list[np.ndarray] | None = None,
    pcie_gbs: float = 25.0,
    device: torch.device | str = "cpu",
) -> list[LevelResult]:
    """One policy, every concurrency level, through the server's scheduler (on `device`:
    float32 on the CPU, the GPU's bf16 on CUDA)."""
    from dynaexq.runtime.load import load
    from dynaexq.serve.scheduler import Scheduler, SequenceSpec

    context = prompt_tokens + max_tokens
    import torch

    dev = torch.device(device)
    dtype = "float32" if dev.type == "cpu" else "auto"
    if policy == "full":
        engine = load(model, dtype=dtype, device=dev)
    else:
        engine = load(
            model,
            budget=budget,
            policy=policy,
            tiers=tiers,
            calibration=calibration,
            dtype=dtype,
            device=dev,
            batch=max(levels),
            context=context,
            lockstep=False,  # as served: copies publish when they land, nothing waits
            progress=False,
        )
    runtime = getattr(engine, "precision", None)
    if runtime is not None:  # offload: the modelled host-to-device link
        runtime.policy = replace(runtime.policy, pcie_gbs=pcie_gbs)
    results = []
    for level in levels:
        scheduler = Scheduler(
            engine, max_batch=level, max_queue=1 << 16, max_context=context, max_prefill_tokens=4096
        )
        scheduler.start()
        before = runtime.snapshot() if runtime is not None else None

        async def submit(prompt: list[int], scheduler: Scheduler = scheduler):
            req = scheduler.submit(
                [SequenceSpec(tuple(prompt), max_new_tokens=max_tokens, stream_text=True)]
            )
            while True:
                ev = await req.events.get()
                if isinstance(ev, BaseException):
                    raise ev
                for _ in ev.token_ids:
                    yield None
                if ev.finish_reason is not None:
                    return

        chosen = prompts[:requests_per_level]
        t0 = time.perf_counter()
        samples = asyncio.run(_closed_loop(submit, chosen, level))
        wall = time.perf_counter() - t0
        scheduler.stop(drain=True, timeout=60)
        r = _summarize(policy, level, samples, wall, len(chosen))
        if runtime is not None:
            if hasattr(runtime, "flush"):
                runtime.flush()
            after = runtime.snapshot()
            r.transitions = sum(after["transitions"].values()) - sum(before["transitions"].values())
            r.bytes_moved = after["bytes_moved"]["h2d"] - before["bytes_moved"]["h2d"]
            r.expert_wait_s = after["expert_wait_seconds"] - before["expert_wait_seconds"]
        results.append(r)
    return results


def bench_url(
    url: str,
    *,
    levels: list[int],
    prompts: list[list[int]],
    requests_per_level: int,
    max_tokens: int,
    model: str | None = None,
) -> list[LevelResult]:
    """The same closed loop against a running server, with the official `openai` client
    (streaming /v1/completions, token-id prompts, EOS ignored)."""
    import openai

    base = url.rstrip("/") + "/v1"
    results = []
    for level in levels:

        async def run(level: int = level) -> tuple[list[Sample], float]:
            client = openai.AsyncOpenAI(base_url=base, api_key="unused", max_retries=0)
            name = model or (await client.models.list()).data[0].id

            async def submit(prompt: list[int]):
                stream = await client.completions.create(
                    model=name,
                    prompt=prompt,
                    max_tokens=max_tokens,
                    temperature=0,
                    stream=True,
                    extra_body={"ignore_eos": True},
                )
                async for chunk in stream:
                    if chunk.choices and chunk.choices[0].text:
                        yield None

            t0 = time.perf_counter()
            s = await _closed_loop(submit, prompts[:requests_per_level], level)
            wall = time.perf_counter() - t0
            await client.close()
            return s, wall

        samples, wall = asyncio.run(run())
        results.append(_summarize("server", level, samples, wall, requests_per_level))
    return results


def write_bench_report(results: list[LevelResult], out: Path, header: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    lines = [
        "# dynaexq bench",
        "",
        header,
        "",
        "| policy | concurrency | requests | errors | tokens/s | TTFT p50 | TTFT p99 | "
        "TPOT p50 | TPOT p99 | transitions | MB moved | expert wait s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def ms(x: float | None) -> str:
        return "-" if x is None else f"{1000 * x:.1f} ms"

    for r in results:
        lines.append(
            f"| {r.policy} | {r.concurrency} | {r.requests} | {r.errors} | "
            f"{r.tokens_per_s:.1f} | {ms(r.ttft_p50)} | {ms(r.ttft_p99)} | {ms(r.tpot_p50)} | "
            f"{ms(r.tpot_p99)} | {r.transitions} | {r.bytes_moved / 1e6:.2f} | "
            f"{r.expert_wait_s:.3f} |"
        )
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for policy in dict.fromkeys(r.policy for r in results):
        rows = [r for r in results if r.policy == policy]
        xs = [r.concurrency for r in rows]
        axes[0].plot(xs, [r.tokens_per_s for r in rows], "o-", label=policy)
        axes[1].plot(xs, [1000 * (r.tpot_p50 or np.nan) for r in rows], "o-", label=policy)
    for ax, title in zip(axes, ("generated tokens/s", "TPOT p50 (ms)"), strict=True):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent requests")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "bench.png", dpi=110)
    plt.close(fig)
    lines += ["", "![throughput and TPOT](bench.png)", ""]
    path = out / "bench.md"
    path.write_text("\n".join(lines))
    (out / "bench.json").write_text(json.dumps([asdict(r) for r in results], indent=1))
    return path
