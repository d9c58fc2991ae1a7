"""Figures of one device budget for KV pages and expert precision (issue 19).

- `project`: concurrent sequences at a fixed budget for Qwen3-30B-A3B (bf16 KV: 96 KiB a
  token) on 24 and 32 GB cards, from the same accounting `dynaexq.load` uses: a contiguous
  cache reserved for the longest context, pages sized by each request's real length
  with the experts' bytes fixed, and pages that may also take the hot experts' bytes.
- `measure`: the real scheduler on the embedded model at one budget, three ways:
  contiguous (the budget's KV as max-batch x context rows), paged with a fixed split
  (the same KV bytes as pages, no lending) and paged on the shared budget (a small KV
  floor; hot experts are lent to pages under load and taken back after). Each runs a
  low-load phase (one request at a time), a high-load phase (many at once) and low load
  again, and reports
  the peak of concurrent sequences, throughput, preemptions, the bytes that changed use,
  the routed mass served at the high tier (the runtime's telemetry) per phase, and the
  gap recovered on text of the tier map published at the end of each phase (each map
  held by a static runtime and scored like `dynaexq eval` on held-out text that neither
  calibration nor the prompts used: `score_maps`).

    python -m dynaexq.bench.kv_share project
    python -m dynaexq.bench.kv_share measure --json docs/results/kv/embedded.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from dynaexq.model.config import ModelConfig
from dynaexq.model.paged_kv import kv_bytes_per_token
from dynaexq.quant import expert_nbytes, parse_tier
from dynaexq.runtime.budget import fixed_memory

GIB = 1024**3


@dataclass(frozen=True)
class ProjectedRow:
    card: str
    context: int  # the longest request the server accepts
    request_tokens: int  # what requests really hold (prompt + generated)
    kv_bytes_fixed_split: int  # KV bytes when 20% of the experts are hot
    contiguous: int  # sequences: KV reserved at `context` each
    paged: int  # sequences: pages of `request_tokens` each, same KV bytes
    paged_shared: int  # sequences: pages that may also take the hot experts' bytes
    hot_share_idle: float  # hot share of the shared budget with one request running
    pages_per_lent_slot: int  # whole pages a lent high-tier slot holds beside its guest


def project(
    config: ModelConfig,
    cards: dict[str, float],
    *,
    contexts: tuple[int, ...] = (4096, 32768),
    request_tokens: tuple[int, ...] = (1024, 4096),
    tiers: tuple[str, str] = ("int2", "bf16"),
    hot_share: float = 0.2,
    page_tokens: int = 16,
    reserve_gib: float = 1.0,
    in_flight: int = 4,
    chunk: int = 512,
) -> list[ProjectedRow]:
    """Concurrent sequences on each card (GiB less `reserve_gib`): the budget holds the
    non-expert weights, the workspace, every expert at the low tier and the staging
    slots; a fixed split keeps `hot_share` of each layer's experts at the high tier and
    gives the rest to KV; the shared budget keeps one full context of pages as its floor
    and can lend every high-tier slot, whose bytes past the low-tier slot it hosts hold
    whole pages (from a token boundary: the remainder stays unused, as in
    `SharedKvArena`)."""
    h, i = config.hidden_size, config.moe_intermediate_size
    lo, hi = (expert_nbytes(parse_tier(t), h, i, 256) for t in tiers)
    layers, experts = len(config.moe_layers), config.num_experts
    fixed = fixed_memory(config, dtype_bytes=2, batch=1, context=0, chunk=chunk)
    per_token = kv_bytes_per_token(config, 2)
    hot = int(hot_share * experts) * layers
    least = fixed.total + layers * experts * lo + in_flight * (lo + hi)
    rows = []
    for card, gib in cards.items():
        budget = int((gib - reserve_gib) * GIB)
        kv_fixed = budget - least - hot * (hi - lo)
        kv_shared = budget - least
        for context in contexts:
            for tokens in (t for t in request_tokens if t <= context):
                page = -(-tokens // page_tokens) * page_tokens * per_token
                idle_kv = -(-context // page_tokens) * page_tokens * per_token
                idle_hot = max(0, min(layers * experts, (kv_shared - idle_kv) // (hi - lo)))
                # Physically: the floor's pages, then whole pages in every lent slot.
                per_slot = ((hi - lo) // per_token - 1) // page_tokens
                pages = idle_kv // (page_tokens * per_token) + idle_hot * per_slot
                request_pages = -(-tokens // page_tokens)
                rows.append(
                    ProjectedRow(
                        card=card,
                        context=context,
                        request_tokens=tokens,
                        kv_bytes_fixed_split=max(0, kv_fixed),
                        contiguous=max(0, kv_fixed // (context * per_token)),
                        paged=max(0, kv_fixed // page),
                        paged_shared=max(0, pages // request_pages),
                        hot_share_idle=idle_hot / (layers * experts),
                        pages_per_lent_slot=per_slot,
                    )
                )
    return rows


def projection_markdown(name: str, config: ModelConfig, rows: list[ProjectedRow]) -> str:
    per_token = kv_bytes_per_token(config, 2)
    lines = [
        f"{name}: {per_token // 1024} KiB of bf16 KV per token; tiers int2/bf16; fixed split "
        "= 20% of each layer's experts at bf16; pages of 16 tokens.",
        "",
        "| card | max context | request tokens | KV bytes (fixed split) | contiguous | paged "
        "| paged, shared budget | pages per lent slot | hot share at low load (shared) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.card} | {r.context} | {r.request_tokens} | "
            f"{r.kv_bytes_fixed_split / GIB:.2f} GiB | {r.contiguous} | {r.paged} | "
            f"{r.paged_shared} | {r.pages_per_lent_slot} | {100 * r.hot_share_idle:.0f}% |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# Measured on the embedded model
# ---------------------------------------------------------------------------------------
@dataclass
class PhaseResult:
    requests: int
    peak_running: int
    mean_running: float  # time-averaged running sequences
    seconds: float
    generated_tokens: int
    mass_hi_share: float  # routed mass served at the high tier, tokens-weighted over steps
    preemptions: int
    failed: int
    # The published tier map ([layers][experts] store tiers) when the phase ended, the
    # time-averaged count of high-tier experts over the phase (sampled), and the gap
    # recovered (log-perplexity, %) of that map on held-out text (`score_maps`).
    tier_map: list[list[int]] | None = None
    hot_mean: float | None = None
    hot_min: int | None = None
    hot_end: int | None = None
    gap_recovered: float | None = None
    log_ppl: float | None = None


@dataclass
class ModeResult:
    mode: str
    budget_bytes: int
    hot_experts_at_start: int
    low: PhaseResult
    high: PhaseResult
    after: PhaseResult  # low load again, once the high load has passed
    moved_to_kv_bytes: int = 0
    moved_to_experts_bytes: int = 0
    # (seconds since start, KV bytes, expert bytes, running sequences), sampled
    split: list[tuple[float, int, int, int]] | None = None


def _heldout_prompts(n: int, length: int) -> list[tuple[int, ...]]:
    import numpy as np

    from dynaexq.engine import EMBEDDED_MODEL_DIR

    streams = [np.load(p) for p in sorted((EMBEDDED_MODEL_DIR / "heldout").glob("*.npy"))]
    # Past the first 16384 tokens of each stream (the runtime's default calibration).
    out = []
    for k in range(n):
        s = streams[k % len(streams)]
        start = 20000 + 997 * k
        out.append(tuple(int(t) for t in s[start : start + length]))
    return out


def _mass_share(records: list[Any]) -> float:
    tokens = sum(r.tokens for r in records)
    return sum(r.tokens * r.mass_hi_share for r in records) / max(1, tokens)


async def _phase(
    sched: Any,
    runtime: Any,
    prompts: list[tuple[int, ...]],
    new: int,
    at_once: bool,
    split: list[tuple[float, int, int, int]],
    t_start: float,
) -> PhaseResult:
    from dynaexq.serve.scheduler import SequenceSpec

    first_step = len(runtime.telemetry.records)
    pre = sched.preemptions
    peak = 0
    samples: list[int] = []
    hot: list[int] = []
    top = runtime.tiers - 1
    t0 = time.perf_counter()

    async def one(p: tuple[int, ...]) -> int:
        req = sched.submit([SequenceSpec(p, new)])
        n = 0
        while True:
            ev = await asyncio.wait_for(req.events.get(), 600)
            if isinstance(ev, BaseException):
                return -1
            n += len(ev.token_ids)
            if ev.finish_reason is not None:
                return n

    async def watch(done: asyncio.Event) -> None:
        nonlocal peak
        budget = getattr(sched, "kv_budget", None)
        while not done.is_set():
            running = sched.running
            peak = max(peak, running)
            samples.append(running)
            if len(samples) % 10 == 0:
                hot.append(int((runtime.tier_map() == top).sum()))
            if budget is not None and len(samples) % 10 == 0:
                snap = budget.snapshot()
                now = time.perf_counter() - t_start
                split.append((round(now, 3), snap["kv_bytes"], snap["expert_bytes"], running))
            await asyncio.sleep(0.001)

    done = asyncio.Event()
    watcher = asyncio.create_task(watch(done))
    if at_once:
        counts = await asyncio.gather(*(one(p) for p in prompts))
    else:
        counts = [await one(p) for p in prompts]
    done.set()
    await watcher
    failed = sum(1 for c in counts if c < 0)
    tier_map = runtime.tier_map()
    hot.append(int((tier_map == top).sum()))
    return PhaseResult(
        requests=len(prompts),
        peak_running=peak,
        mean_running=sum(samples) / max(1, len(samples)),
        seconds=time.perf_counter() - t0,
        generated_tokens=sum(c for c in counts if c > 0),
        mass_hi_share=_mass_share(runtime.telemetry.records[first_step:]),
        preemptions=sched.preemptions - pre,
        failed=failed,
        tier_map=tier_map.tolist(),
        hot_mean=sum(hot) / len(hot),
        hot_min=min(hot),
        hot_end=hot[-1],
    )


def measure(
    *,
    batch: int = 4,
    context: int = 512,
    prompt_tokens: int = 64,
    new_tokens: int = 64,
    high_load: int = 24,
    after_requests: int = 12,
    page_tokens: int = 8,
    floor_tokens: int = 256,
    budget: str = "20%",
) -> list[ModeResult]:
    """The three ways on the embedded model at the budget of a `budget` hot map beside a
    contiguous cache of `batch` x `context` tokens (float32 on the CPU). Pages of 8
    tokens: the pages live in lent expert slots, and a 16-token page of this model
    (48 KiB) is larger than a bf16 expert (36 KiB)."""
    import torch

    from dynaexq.runtime.kv_share import KvShare
    from dynaexq.runtime.load import default_calibration, load_with_policy
    from dynaexq.serve.scheduler import Scheduler

    torch.set_num_threads(1)
    low_prompts = _heldout_prompts(4, prompt_tokens)
    high_prompts = _heldout_prompts(high_load, prompt_tokens)
    after_prompts = _heldout_prompts(after_requests, prompt_tokens)
    common = dict(policy="dynamic", dtype="float32", progress=False, lockstep=False, batch=batch)
    engine, dep = load_with_policy(
        budget=budget, context=context, calibration=default_calibration(None), **common
    )
    assert dep is not None and dep.plan.budget is not None and dep.calibration is not None
    nbytes = dep.plan.budget  # one budget for all three
    kv_tokens = batch * context
    modes: list[tuple[str, Any, KvShare | None]] = [("contiguous", engine, None)]
    fixed_split = KvShare(kv_tokens, kv_tokens, page_tokens)
    shared = KvShare(floor_tokens, 4 * kv_tokens, page_tokens)
    for name, share in (("paged, fixed split", fixed_split), ("paged, shared budget", shared)):
        e, _ = load_with_policy(
            budget=nbytes, context=context, calibration=dep.calibration, kv_share=share, **common
        )
        modes.append((name, e, share))
    results = []
    for name, e, share in modes:
        runtime = e.precision
        lend = share is not None and share.min_kv_tokens < share.max_kv_tokens
        sched = Scheduler(
            e,
            max_batch=batch if share is None else high_load,
            max_context=context,
            kv_share=share,
            kv_budget=getattr(e, "kv_budget", None) if share is not None else None,
            kv_lender=runtime if lend else None,
        )
        hot = int((runtime.tier_map() == runtime.tiers - 1).sum())

        split: list[tuple[float, int, int, int]] = []

        async def run(sched: Any = sched, runtime: Any = runtime, split: Any = split):
            sched.start()
            t = time.perf_counter()
            try:
                low = await _phase(sched, runtime, low_prompts, new_tokens, False, split, t)
                high = await _phase(sched, runtime, high_prompts, new_tokens, True, split, t)
                # Load gone: single requests again while the lent bytes go back.
                after = await _phase(sched, runtime, after_prompts, new_tokens, False, split, t)
                return low, high, after
            finally:
                sched.stop(drain=False, timeout=60)

        low, high, after = asyncio.run(run())
        stats = sched.kv_stats()
        results.append(
            ModeResult(
                mode=name,
                budget_bytes=nbytes,
                hot_experts_at_start=hot,
                low=low,
                high=high,
                after=after,
                moved_to_kv_bytes=stats.get("moved_to_kv_bytes", 0),
                moved_to_experts_bytes=stats.get("moved_to_experts_bytes", 0),
                split=split or None,
            )
        )
    return results


# ---------------------------------------------------------------------------------------
# Quality of a tier map on text
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TextSpec:
    """The text maps are scored on: the embedded model's held-out domains, each past its
    first `calibration_tokens` (the runtime's default calibration; the measured prompts
    start at token 20000), `tokens` per domain in `streams` parallel streams, read in
    windows of `window` tokens fed `chunk` at a time (`dynaexq eval`'s defaults)."""

    tokens: int = 2048
    calibration_tokens: int = 16384
    streams: int = 4
    window: int = 256
    chunk: int = 32
    domains: tuple[str, ...] | None = None  # None: every held-out domain

    def describe(self) -> str:
        return (
            f"{self.tokens} tokens of each held-out domain from token "
            f"{self.calibration_tokens} on ({self.streams} streams, window {self.window}, "
            f"chunk {self.chunk})"
        )


def _text_streams(spec: TextSpec) -> dict[str, Any]:
    from dynaexq.eval.run import embedded_domains
    from dynaexq.eval.stream import as_streams

    out = {}
    for name, toks in embedded_domains().items():
        if spec.domains is None or name in spec.domains:
            part = toks[spec.calibration_tokens :]
            out[name] = as_streams(part, spec.streams, spec.window, spec.tokens)
    return out


def _log_ppl(engine: Any, streams: dict[str, Any], spec: TextSpec) -> float:
    """Mean next-token loss (nats) over every scored token of every domain."""
    import numpy as np

    from dynaexq.eval.stream import evaluate_streams

    nll = [
        evaluate_streams(engine.model, s, window=spec.window, chunk=spec.chunk).nll
        for s in streams.values()
    ]
    return float(np.concatenate([n.reshape(-1) for n in nll]).mean())


def gap_recovered_pct(low: float, full: float, policy: float) -> float:
    """Gap recovered in % on log-perplexity: (low - policy) / (low - full), with `low`
    the static all-lowest-tier model's and `full` the full-precision model's."""
    from dynaexq.eval.stream import gap_recovered

    return 100.0 * gap_recovered(low, full, policy)


def score_maps(
    maps: list[Any], spec: TextSpec | None = None, dtype: str = "float32"
) -> tuple[list[float], float, float]:
    """Log-perplexity on `spec`'s text of each tier map ([layers, experts] store tiers,
    held exactly by a static-map runtime: `load_with_policy(tier_map=...)`), and of the
    baselines `dynaexq eval` uses: static (every expert at the lowest tier) and full.
    Returns (map log-ppls, static's, full's)."""
    import numpy as np

    from dynaexq.runtime.load import load_with_policy

    spec = spec or TextSpec()
    streams = _text_streams(spec)
    kw = dict(dtype=dtype, progress=False, batch=spec.streams, context=spec.window)
    full, _ = load_with_policy(policy="full", dtype=dtype)
    full_ppl = _log_ppl(full, streams, spec)
    del full
    # static: every expert at the lowest tier (any budget that holds them; the 100% map's)
    low, _ = load_with_policy(policy="static", budget="100%", chunk=spec.chunk, **kw)
    low_ppl = _log_ppl(low, streams, spec)
    del low
    out = []
    for m in maps:
        e, _ = load_with_policy(policy="static-map", tier_map=np.asarray(m), chunk=spec.chunk, **kw)
        out.append(_log_ppl(e, streams, spec))
    return out, low_ppl, full_ppl


def add_quality(results: list[ModeResult], spec: TextSpec | None = None) -> dict[str, Any]:
    """Score every phase's published map (`score_maps`) into its `gap_recovered` and
    `log_ppl`; returns the baselines and the text used."""
    spec = spec or TextSpec()
    phases = [p for r in results for p in (r.low, r.high, r.after) if p.tier_map is not None]
    ppl, low, full = score_maps([p.tier_map for p in phases], spec)
    for p, v in zip(phases, ppl, strict=True):
        p.log_ppl = v
        p.gap_recovered = gap_recovered_pct(low, full, v)
    return {"text": spec.describe(), "log_ppl_static_int2": low, "log_ppl_full": full}


def measured_markdown(
    results: list[ModeResult], page_tokens: int = 8, quality: dict[str, Any] | None = None
) -> str:
    lines = [
        f"Embedded model (float32, CPU), budget {results[0].budget_bytes / 2**20:.2f} MiB for "
        "everything; low load = 4 requests one at a time, high load = "
        f"{results[0].high.requests} at once, then {results[0].after.requests} one at a "
        f"time again; 64 prompt + 64 generated tokens each; pages of {page_tokens} tokens.",
        "",
        "| mode | hot experts at start | concurrent at high load: mean (peak) "
        "| tokens/s (high) | preemptions (high) | failed | routed mass at bf16: low load "
        "| high load | low load after | bytes moved to KV / back "
        "| gap recovered: low load | high load | low load after |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def gap(p: PhaseResult) -> str:
        return "-" if p.gap_recovered is None else f"{p.gap_recovered:.1f}%"

    for r in results:
        tps = r.high.generated_tokens / max(r.high.seconds, 1e-9)
        failed = r.low.failed + r.high.failed + r.after.failed
        lines.append(
            f"| {r.mode} | {r.hot_experts_at_start} | {r.high.mean_running:.1f} "
            f"({r.high.peak_running}) | {tps:.0f} | {r.high.preemptions} | {failed} | "
            f"{100 * r.low.mass_hi_share:.1f}% | {100 * r.high.mass_hi_share:.1f}% | "
            f"{100 * r.after.mass_hi_share:.1f}% | {r.moved_to_kv_bytes / 1024:.0f} KiB / "
            f"{r.moved_to_experts_bytes / 1024:.0f} KiB | {gap(r.low)} | {gap(r.high)} | "
            f"{gap(r.after)} |"
        )
    if quality is not None:
        lines += [
            "",
            f"Gap recovered: the tier map published at the end of each phase, held by a "
            f"static runtime, scored on {quality['text']}; (log-ppl of static all-int2 "
            f"{quality['log_ppl_static_int2']:.4f} - the map's) / (that - full bf16's "
            f"{quality['log_ppl_full']:.4f}). Hot experts over each phase (time-averaged / "
            "fewest / at its end):",
            "",
            "| mode | low load | high load | low load after |",
            "|---|---:|---:|---:|",
        ]

        def hot(p: PhaseResult) -> str:
            if p.hot_mean is None:
                return "-"
            return f"{p.hot_mean:.0f} / {p.hot_min} / {p.hot_end}"

        for r in results:
            lines.append(f"| {r.mode} | {hot(r.low)} | {hot(r.high)} | {hot(r.after)} |")
    for r in results:
        if r.split and r.mode.endswith("shared budget"):
            lines += [
                "",
                f"The split over time ({r.mode}):",
                "",
                "```",
                *split_plot(r.split),
                "```",
            ]
    return "\n".join(lines)


def split_plot(split: list[tuple[float, int, int, int]], rows: int = 24) -> list[str]:
    """A text plot of the budget split: one line per time slice, KV bytes as '#' and
    expert bytes as '=' on one scale."""
    step = max(1, len(split) // rows)
    picked = split[::step]
    top = max(kv + ex for _, kv, ex, _ in picked) or 1
    width = 60
    out = [f"{'t (s)':>7}  {'KV':>9}  {'experts':>9}  run  # = KV, = = experts"]
    for t, kv, ex, running in picked:
        a = round(width * kv / top)
        b = round(width * ex / top)
        out.append(
            f"{t:7.2f}  {kv / 1024:7.0f}Ki  {ex / 1024:7.0f}Ki  {running:3d}  {'#' * a}{'=' * b}"
        )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dynaexq.bench.kv_share")
    sub = parser.add_subparsers(dest="what", required=True)
    sub.add_parser("project", help="Qwen3-30B-A3B on 24 and 32 GB cards (markdown)")
    m = sub.add_parser("measure", help="the scheduler on the embedded model (markdown)")
    m.add_argument("--json", type=Path, default=None, help="also write the raw results")
    m.add_argument("--high-load", type=int, default=24)
    m.add_argument("--page-tokens", type=int, default=8)
    m.add_argument(
        "--text-tokens",
        type=int,
        default=2048,
        help="tokens of each held-out domain the phases' tier maps are scored on (0: skip)",
    )
    args = parser.parse_args(argv)
    if args.what == "project":
        from dynaexq.runtime.memory import QWEN3_30B_A3B_CONFIG

        config = ModelConfig.from_dict(dict(QWEN3_30B_A3B_CONFIG), source="Qwen3-30B-A3B")
        rows = project(config, {"24 GB": 24e9 / GIB, "32 GB": 32e9 / GIB})
        print(projection_markdown("Qwen3-30B-A3B", config, rows))
        return 0
    results = measure(high_load=args.high_load, page_tokens=args.page_tokens)
    quality = None
    if args.text_tokens > 0:
        quality = add_quality(results, TextSpec(tokens=args.text_tokens))
    print(measured_markdown(results, args.page_tokens, quality))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        raw: Any = [asdict(r) for r in results]
        if quality is not None:
            raw = {"quality": quality, "modes": raw}
        args.json.write_text(json.dumps(raw, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
