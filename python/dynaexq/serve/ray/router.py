"""The affinity router (Ray Serve's pluggable request router): a request goes to the
replica whose hot experts and cluster of recent signatures fit its own signature best,
within a bound on load imbalance."""

from __future__ import annotations

import random
from collections import OrderedDict
from typing import Any

import numpy as np
from ray.serve.config import RequestRouterConfig
from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from dynaexq.serve.affinity import SignatureClusters


def _job_of(pending: PendingRequest | None) -> dict[str, Any] | None:
    if pending is None or not pending.args:
        return None
    job = pending.args[0]
    return job if isinstance(job, dict) and "specs" in job else None


class HotSetAffinityRouter(RequestRouter):
    """Sends a request to the replica whose hot experts (published through
    `record_routing_stats`) and recent traffic best fit its signature, among the replicas
    whose load is within `imbalance` requests of the least loaded; else the least loaded.

    Score of replica r for signature s (the first MoE layer's approximate routing):
    hot_weight * (share of s on r's first-layer hot experts) + profile_weight * centred
    cosine of s with r's cluster of recent signatures (`SignatureClusters`: k-means over
    the last `window` requests, one cluster per replica) - balance_weight * r's recent
    share of the traffic (so that an idle replica attracts the next new kind of request).
    A session header keeps a session on its replica while the load allows.
    """

    def initialize_state(  # type: ignore[override]
        self,
        imbalance: int = 2,
        hot_weight: float = 1.0,
        profile_weight: float = 1.0,
        balance_weight: float = 0.5,
        decay: float = 0.9,
        window: int = 256,
        max_sessions: int = 65536,
        **_: Any,
    ) -> None:
        self.imbalance = imbalance
        self.hot_weight = hot_weight
        self.profile_weight = profile_weight
        self.balance_weight = balance_weight
        self.decay = decay
        self.max_sessions = max_sessions
        self._clusters = SignatureClusters(window=window)
        self._share: dict[ReplicaID, float] = {}
        self._sessions: OrderedDict[str, ReplicaID] = OrderedDict()
        self._choice: dict[str, ReplicaID] = {}

    def _state(self) -> None:
        if not hasattr(self, "_clusters"):
            self.initialize_state()

    def _load(self, r: RunningReplica) -> int:
        q = self._replica_queue_len_cache.get(r.replica_id)
        if q is None:
            stats = r.routing_stats or {}
            q = int(stats.get("running", 0)) + int(stats.get("queued", 0))
        return q

    def _score(self, r: RunningReplica, sig: np.ndarray) -> float:
        score = 0.0
        hot = (r.routing_stats or {}).get("hot")
        if hot:
            first = np.asarray(hot[0], dtype=np.int64)
            if first.size:
                score += self.hot_weight * float(sig[first].sum() / max(sig.sum(), 1e-9))
            # (every expert hot: the same for every replica)
        near = self._clusters.affinity(sig).get(r.replica_id)
        if near is not None:
            score += self.profile_weight * near
        score -= self.balance_weight * self._share.get(r.replica_id, 0.0)
        return score

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        self._state()
        if pending_request is not None:
            pending_request.routing_context.should_backoff = True
        if not candidate_replicas:
            return []
        self._clusters.set_replicas([r.replica_id for r in candidate_replicas])
        loads = {r.replica_id: self._load(r) for r in candidate_replicas}
        tie = {r.replica_id: random.random() for r in candidate_replicas}
        by_load = sorted(candidate_replicas, key=lambda r: (loads[r.replica_id], tie[r.replica_id]))
        job = _job_of(pending_request)
        if job is None:
            return [[r] for r in by_load]
        least = loads[by_load[0].replica_id]
        eligible = [r for r in by_load if loads[r.replica_id] <= least + self.imbalance]
        best: RunningReplica | None = None
        session = job.get("session")
        if session and session in self._sessions:
            sticky = self._sessions[session]
            best = next((r for r in eligible if r.replica_id == sticky), None)
        sig = job.get("signature")
        if best is None and sig is not None:
            s = np.asarray(sig, dtype=np.float64)
            best = max(eligible, key=lambda r: (self._score(r, s), -loads[r.replica_id]))
        if best is None:
            best = by_load[0]
        assert pending_request is not None
        self._choice[pending_request.metadata.internal_request_id] = best.replica_id
        return [[best]] + [[r] for r in by_load if r is not best]

    def on_request_routed(
        self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any
    ) -> None:
        self._state()
        self._choice.pop(pending_request.metadata.internal_request_id, None)
        job = _job_of(pending_request)
        if job is None:
            return
        d = self.decay
        self._share.setdefault(replica_id, 0.0)
        for rid, share in self._share.items():
            self._share[rid] = d * share + (1 - d) * (rid == replica_id)
        sig = job.get("signature")
        if sig is not None:
            self._clusters.observe(sig, replica_id)
        session = job.get("session")
        if session:
            self._sessions[session] = replica_id
            self._sessions.move_to_end(session)
            while len(self._sessions) > self.max_sessions:
                self._sessions.popitem(last=False)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self._state()
        self._clusters.forget(replica_id)
        self._share.pop(replica_id, None)
        for k in [k for k, v in self._sessions.items() if v == replica_id]:
            del self._sessions[k]


RouterConfig: Any = RequestRouterConfig
