"""Prometheus metrics of the server (prometheus-client, one registry per app).

Serving metrics are updated by the model worker and the request handlers; the expert
runtime's figures (tier map, transitions, bytes moved, pool occupancy, expert wait) are
read from its `RuntimeStats` provider at scrape time by a custom collector, so the runtime
never has to know about Prometheus.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from dynaexq.serve.runtime import RuntimeStats

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Seconds. TTFT spans queueing + prefill; TPOT is per generated token after the first.
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class _TokenRate:
    """Generated tokens per second over a sliding window."""

    def __init__(self, window: float = 10.0) -> None:
        self.window = window
        self._events: collections.deque[tuple[float, int]] = collections.deque()
        self._lock = threading.Lock()

    def add(self, n: int, now: float) -> None:
        with self._lock:
            self._events.append((now, n))
            self._trim(now)

    def _trim(self, now: float) -> None:
        while self._events and self._events[0][0] < now - self.window:
            self._events.popleft()

    def rate(self, now: float | None = None) -> float:
        now = time.perf_counter() if now is None else now
        with self._lock:
            self._trim(now)
            return sum(n for _, n in self._events) / self.window


class RuntimeStatsCollector(Collector):
    """Exports a `RuntimeStats` snapshot as Prometheus metric families."""

    def __init__(self, provider: RuntimeStats) -> None:
        self.provider = provider

    def collect(self) -> Iterator[Metric]:
        snap = self.provider.runtime_snapshot()
        tiers = GaugeMetricFamily(
            "dynaexq_experts", "experts per MoE layer and tier (tier map)", labels=["layer", "tier"]
        )
        for layer, counts in sorted(snap.tier_counts.items()):
            for tier, n in sorted(counts.items()):
                tiers.add_metric([str(layer), tier], n)
        yield tiers
        trans = CounterMetricFamily(
            "dynaexq_transitions", "completed precision transitions", labels=["kind"]
        )
        for kind, n in sorted(snap.transitions.items()):
            trans.add_metric([kind], n)
        yield trans
        yield GaugeMetricFamily(
            "dynaexq_transitions_in_flight",
            "precision transitions in flight",
            value=snap.transitions_in_flight,
        )
        moved = CounterMetricFamily(
            "dynaexq_transfer_bytes", "bytes copied by the transfer engine", labels=["direction"]
        )
        for direction, n in sorted(snap.bytes_moved.items()):
            moved.add_metric([direction], n)
        yield moved
        pool = GaugeMetricFamily(
            "dynaexq_pool_bytes", "expert pool bytes per tier", labels=["tier", "state"]
        )
        for tier, n in sorted(snap.pool_used_bytes.items()):
            pool.add_metric([tier, "used"], n)
        for tier, n in sorted(snap.pool_capacity_bytes.items()):
            pool.add_metric([tier, "capacity"], n)
        yield pool
        yield GaugeMetricFamily(
            "dynaexq_pool_occupancy_ratio",
            "used / reserved expert pool bytes",
            value=snap.pool_occupancy,
        )
        yield CounterMetricFamily(
            "dynaexq_expert_wait_seconds",
            "time the forward pass waited for experts (offload)",
            value=snap.expert_wait_seconds,
        )
        if snap.budget_bytes is not None:
            yield GaugeMetricFamily(
                "dynaexq_budget_bytes", "device byte budget for experts", value=snap.budget_bytes
            )
        info = GaugeMetricFamily("dynaexq_policy_info", "the expert policy", labels=["policy"])
        info.add_metric([snap.policy], 1)
        yield info


class KvStatsCollector(Collector):
    """The paged KV cache and the budget it shares with the experts, read at scrape time
    (`Scheduler.kv_stats`)."""

    def __init__(self, stats: Callable[[], dict[str, int]]) -> None:
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        s = self.stats()
        if not s:
            return
        pages = GaugeMetricFamily(
            "dynaexq_kv_pages",
            "KV pages by state (free: a reservation could take them now, cached ones "
            "included; cached: finished prompts' pages kept for reuse; online: in the KV "
            "head or in expert slots lent to the cache)",
            labels=["state"],
        )
        for state in ("used", "free", "shared", "cached", "online", "capacity"):
            pages.add_metric([state], s[f"pages_{state}"])
        yield pages
        split = GaugeMetricFamily(
            "dynaexq_budget_bytes", "bytes of the shared device budget by use", labels=["use"]
        )
        split.add_metric(["kv"], s["kv_bytes"])
        split.add_metric(["experts"], s["expert_bytes"])
        split.add_metric(["limit"], s["budget_bytes"])
        yield split
        moved = CounterMetricFamily(
            "dynaexq_budget_moved_bytes",
            "bytes one use gave back that the other took next",
            labels=["to"],
        )
        moved.add_metric(["kv"], s["moved_to_kv_bytes"])
        moved.add_metric(["experts"], s["moved_to_experts_bytes"])
        yield moved
        yield CounterMetricFamily(
            "dynaexq_kv_prefix_hit_pages",
            "KV pages reused from a shared prefix",
            value=s["prefix_hit_pages"],
        )
        yield CounterMetricFamily(
            "dynaexq_kv_evicted_pages",
            "cached prefix pages evicted for a reservation",
            value=s["pages_evicted"],
        )


class ServerMetrics:
    def __init__(self, runtime: RuntimeStats | None = None) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            "dynaexq_requests",
            "HTTP requests answered, by endpoint and status code",
            ["endpoint", "code"],
            registry=r,
        )
        self.prompt_tokens = Counter(
            "dynaexq_prompt_tokens", "prompt tokens of admitted requests", registry=r
        )
        self.generated_tokens = Counter("dynaexq_generated_tokens", "tokens generated", registry=r)
        self.ttft = Histogram(
            "dynaexq_time_to_first_token_seconds",
            "arrival to first generated token (queueing + prefill)",
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.tpot = Histogram(
            "dynaexq_time_per_output_token_seconds",
            "mean time per generated token after the first, per sequence",
            buckets=TPOT_BUCKETS,
            registry=r,
        )
        self.request_latency = Histogram(
            "dynaexq_request_latency_seconds",
            "arrival to last token of a request",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.step_seconds = Histogram(
            "dynaexq_step_seconds",
            "duration of one model forward step",
            ["kind"],
            buckets=STEP_BUCKETS,
            registry=r,
        )
        self.step_rows = Counter(
            "dynaexq_step_rows",
            "sequences (decode) or prompt tokens (prefill) processed",
            ["kind"],
            registry=r,
        )
        self.queue_depth = Gauge(
            "dynaexq_queue_depth", "requests waiting for a batch slot", registry=r
        )
        self.running = Gauge(
            "dynaexq_running_sequences", "sequences in the running batch", registry=r
        )
        self.tokens_per_second = Gauge(
            "dynaexq_tokens_per_second",
            "generated tokens per second over the last 10 s",
            registry=r,
        )
        self.preemptions = Counter(
            "dynaexq_kv_preemptions",
            "sequences preempted for KV pages (recomputed later)",
            registry=r,
        )
        self._rate = _TokenRate()
        self.tokens_per_second.set_function(self._rate.rate)
        if runtime is not None:
            r.register(RuntimeStatsCollector(runtime))

    def bind_scheduler(
        self, queue_depth: Callable[[], float], running: Callable[[], float]
    ) -> None:
        self.queue_depth.set_function(queue_depth)
        self.running.set_function(running)

    def bind_kv(self, stats: Callable[[], dict[str, int]]) -> None:
        """Export the paged KV cache's pages and budget split (`Scheduler.kv_stats`)."""
        self.registry.register(KvStatsCollector(stats))

    def observe_step(self, kind: str, seconds: float, rows: int) -> None:
        self.step_seconds.labels(kind).observe(seconds)
        self.step_rows.labels(kind).inc(rows)

    def add_generated(self, n: int, now: float) -> None:
        self.generated_tokens.inc(n)
        self._rate.add(n, now)

    def tokens_rate(self) -> float:
        return self._rate.rate()

    def render(self) -> bytes:
        return generate_latest(self.registry)
