"""The replica deployment: one engine and its continuous-batching scheduler, which
publishes its hot experts and the routing it served (`record_routing_stats`)."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Sequence
from dataclasses import fields
from typing import Any

import numpy as np
from ray import serve

from dynaexq.serve.ray.options import RayServeOptions, max_context_of


def encode_specs(specs: Sequence[Any]) -> list[dict[str, Any]]:
    """SequenceSpecs as plain dicts; a grammar (xgrammar CompiledGrammar, not picklable)
    travels as its JSON."""
    out = []
    for s in specs:
        d = {f.name: getattr(s, f.name) for f in fields(s)}
        g = d.pop("grammar")
        d["grammar_json"] = g.serialize_json() if g is not None else None
        out.append(d)
    return out


class ReplicaServer:
    """One engine and its continuous-batching scheduler (a Ray Serve replica)."""

    def __init__(self, options: dict[str, Any]) -> None:
        import torch

        from dynaexq.serve.metrics import ServerMetrics
        from dynaexq.serve.runtime import build_runtime
        from dynaexq.serve.scheduler import Scheduler

        opts = RayServeOptions.from_args(options)
        torch.set_num_threads(opts.threads or max(1, int(opts.num_cpus)))
        self.max_context = max_context_of(opts)
        self.engine, self.stats = build_runtime(opts.runtime_spec(self.max_context))
        self.metrics = ServerMetrics(self.stats)
        self.scheduler = Scheduler(
            self.engine,
            max_batch=opts.max_batch,
            max_queue=opts.max_queue,
            max_context=self.max_context,
            max_prefill_tokens=opts.max_prefill_tokens,
            metrics=self.metrics,
            cuda_graphs=opts.cuda_graphs,
            recalibrate_tokens=opts.recalibrate_tokens,
            recalibrate_on=opts.recalibrate_on,
        )
        self.scheduler.start()
        self.drain_timeout = opts.drain_timeout
        try:
            self.replica_id = serve.get_replica_context().replica_id.unique_id
        except Exception:  # outside Ray Serve (unit use)
            self.replica_id = f"local-{id(self):x}"
        self.requests = 0
        self._grammar_info: Any = None
        self._lock = threading.Lock()
        config = self.engine.config
        self._layers = list(config.moe_layers)
        self._first = self._layers[0]
        self._mass = np.zeros((len(self._layers), config.num_experts))  # routed, total
        self._hi_mass = np.zeros(len(self._layers))
        self._profile = np.zeros(config.num_experts)  # first layer, decayed
        self._hot: np.ndarray | None = None  # [layers, experts] bool: at the highest tier
        self._refresh_hot()
        self.engine.add_routing_hook(self._observe)

    # routing telemetry (model worker thread)
    def _refresh_hot(self) -> None:
        rt = getattr(self.engine, "precision", None)
        if rt is None or not hasattr(rt, "tier_map"):
            self._hot = None  # every expert at the compute dtype
            return
        self._hot = rt.tier_map() == rt.tiers - 1

    def _observe(self, layer: int, expert_ids: Any, router_probs: Any) -> None:
        li = self._layers.index(layer)
        if layer == self._first:
            self._refresh_hot()  # once per forward: what this forward is served from
        ids = expert_ids.reshape(-1).cpu().numpy()
        mass = router_probs.gather(1, expert_ids).float().reshape(-1).cpu().numpy()
        with self._lock:
            np.add.at(self._mass[li], ids, mass)
            hot = self._hot
            self._hi_mass[li] += (
                float(mass.sum()) if hot is None else float(mass[hot[li][ids]].sum())
            )
            if layer == self._first:
                step = np.zeros_like(self._profile)
                np.add.at(step, ids, mass)
                total = step.sum()
                if total > 0:
                    self._profile = 0.9 * self._profile + 0.1 * step / total

    def summary(self) -> dict[str, Any]:
        """This replica's figures: hot sets, routed mass served at the highest tier."""
        with self._lock:
            mass = self._mass.sum()
            hi = float(self._hi_mass.sum())
            profile = self._profile.copy()
        hot = self._hot
        snap = self.stats.runtime_snapshot() if self.stats is not None else None
        return {
            "replica": self.replica_id,
            "requests": self.requests,
            "running": self.scheduler.running,
            "queued": self.scheduler.queue_depth,
            "steps": self.scheduler.steps,
            "generated_tokens": self.scheduler.generated_tokens,
            "routed_mass": float(mass),
            "hi_mass": hi,
            "hi_mass_share": hi / mass if mass > 0 else None,
            "hot": None if hot is None else [np.flatnonzero(r).tolist() for r in hot],
            "profile": [round(float(v), 5) for v in profile],
            "runtime": None if snap is None else snap.to_json(),
        }

    def record_routing_stats(self) -> dict[str, Any]:
        """Ray Serve calls this every `request_routing_stats_period_s`; the router reads it."""
        s = self.summary()
        return {k: s[k] for k in ("replica", "hot", "profile", "running", "queued")}

    def check_health(self) -> None:
        if not self.scheduler.alive:
            raise RuntimeError("the model worker is not running")

    def _grammar(self, text: str | None) -> Any:
        if text is None:
            return None
        import xgrammar

        if self._grammar_info is None:
            from dynaexq.serve.chat import end_of_turn_ids
            from dynaexq.serve.grammar import Grammars

            tok = self.engine.tokenizer
            assert tok is not None  # the ingress compiles grammars only with a tokenizer
            stops = set(self.engine.eos_token_ids) | end_of_turn_ids(tok)
            grammars = Grammars(tok, self.engine.config.vocab_size, stops)
            self._grammar_info = grammars.json_object().tokenizer_info
        return xgrammar.CompiledGrammar.deserialize_json(text, self._grammar_info)

    async def generate(self, job: dict[str, Any]) -> AsyncIterator[tuple[Any, ...]]:
        """Stream ("events", [SequenceEvent], None) items, the last with this replica's
        summary in place of None; failures are
        ("error", kind, message) items (kind: queue_full, shutting_down, invalid, failed)."""
        from dynaexq.serve.scheduler import (
            GenerationError,
            QueueFullError,
            SequenceSpec,
            ShuttingDownError,
        )

        try:
            specs = []
            for d in job["specs"]:
                d = dict(d)
                grammar = self._grammar(d.pop("grammar_json"))
                specs.append(SequenceSpec(**d, grammar=grammar))
            handle = self.scheduler.submit(specs)
        except QueueFullError as e:
            yield ("error", "queue_full", str(e))
            return
        except ShuttingDownError as e:
            yield ("error", "shutting_down", str(e))
            return
        except (ValueError, TypeError) as e:
            yield ("error", "invalid", str(e))
            return
        self.requests += 1
        left = len(specs)
        try:
            while left:
                batch = [await handle.events.get()]
                while not handle.events.empty():
                    batch.append(handle.events.get_nowait())
                events: list[Any] = []
                for item in batch:
                    if isinstance(item, BaseException):
                        if events:
                            yield ("events", events)
                        down = isinstance(item, ShuttingDownError)
                        message = str(item)
                        if not isinstance(item, GenerationError | ShuttingDownError):
                            message = f"generation failed: {type(item).__name__}: {item}"
                        yield ("error", "shutting_down" if down else "failed", message)
                        return
                    events.append(item)
                    if item.finish_reason is not None:
                        left -= 1
                # The last batch carries this replica's summary, so the ingress knows who
                # served the request before it answers.
                yield ("events", events, None if left else self.summary())
        finally:
            handle.cancel()  # no-op when finished; frees the rows when the caller left

    def __del__(self) -> None:
        sched = getattr(self, "scheduler", None)
        if sched is not None:
            sched.stop(False, 5.0)
