"""Which replica a kind of request belongs to: k-means over recent request signatures.

A request's signature (`dynaexq.serve.ray.PromptSignature`) is its approximate routing on
the first MoE layer. The last `window` signatures are split into one cluster per replica
by k-means, started from each replica's mean signature in the window, so cluster i stays
replica i's: a replica keeps serving the kind of text it was serving, and its hot experts
can follow that kind.

Why a fit over the window and not one decayed profile per replica (the first router):
a profile made of a replica's own last few requests is noisy and its errors feed back
(a request sent to the wrong replica pulls that profile towards it). On two interleaved
domains such profiles swapped meaning or collapsed onto one replica: in
`benchmarks/sim_affinity_router.py` (the Ray test's traffic, 4 requests in flight over 2
replicas) one run in six stayed under 0.65 specialisation, one in twenty here. Lloyd's
iterations over hundreds of signatures move each centroid to the middle of the kind it
already holds and hand the requests near the border to the nearest one.
"""

from __future__ import annotations

import warnings
from collections import deque
from collections.abc import Hashable, Sequence

import numpy as np
from scipy.cluster.vq import kmeans2


class SignatureClusters:
    """Clusters of request signatures, one per replica.

    `observe(signature, replica)` after each routed request; `affinity(signature)` gives,
    per replica with a cluster, the cosine of the signature with that replica's centroid,
    both centred on the window's mean signature (in [-1, 1]). A fit every `refit_every`
    requests once the window holds `min_per_cluster` signatures per replica.
    """

    def __init__(
        self,
        window: int = 256,
        refit_every: int = 8,
        min_per_cluster: int = 4,
        restarts: int = 4,
        seed: int = 0,
    ) -> None:
        if window < 2 or refit_every < 1 or min_per_cluster < 1 or restarts < 1:
            raise ValueError("window must be >= 2; refit_every, min_per_cluster, restarts >= 1")
        self.refit_every = refit_every
        self.min_per_cluster = min_per_cluster
        self.restarts = restarts
        self._signatures: deque[np.ndarray] = deque(maxlen=window)
        self._sent_to: deque[Hashable] = deque(maxlen=window)
        self._replicas: list[Hashable] = []  # the live replicas, in the order first seen
        self._since_fit = 0
        self._rng = np.random.default_rng(seed)
        self.centroids: dict[Hashable, np.ndarray] = {}  # per replica
        self.mean: np.ndarray | None = None  # the window's mean signature

    @property
    def replicas(self) -> list[Hashable]:
        return list(self._replicas)

    def set_replicas(self, replicas: Sequence[Hashable]) -> None:
        """The live replicas (a new set is fitted at the next request)."""
        live = [r for r in self._replicas if r in replicas]
        live += [r for r in replicas if r not in live]
        if live != self._replicas:
            self._replicas = live
            self.centroids = {r: c for r, c in self.centroids.items() if r in live}
            self._since_fit = self.refit_every

    def forget(self, replica: Hashable) -> None:
        self.set_replicas([r for r in self._replicas if r != replica])

    def observe(self, signature: Sequence[float] | np.ndarray, replica: Hashable) -> None:
        if replica not in self._replicas:
            self.set_replicas([*self._replicas, replica])
        self._signatures.append(np.asarray(signature, dtype=np.float64))
        self._sent_to.append(replica)
        self._since_fit += 1
        if self._since_fit >= self.refit_every:
            self._fit()

    def affinity(self, signature: Sequence[float] | np.ndarray) -> dict[Hashable, float]:
        if self.mean is None:
            return {}
        a = np.asarray(signature, dtype=np.float64) - self.mean
        na = float(np.linalg.norm(a))
        out = {}
        for replica, c in self.centroids.items():
            b = c - self.mean
            nb = float(np.linalg.norm(b))
            out[replica] = float(a @ b) / (na * nb) if na > 0 and nb > 0 else 0.0
        return out

    def _fit(self) -> None:
        k = len(self._replicas)
        if k < 2 or len(self._signatures) < k * self.min_per_cluster:
            return
        self._since_fit = 0
        x = np.stack(self._signatures)
        groups = [np.array([s == r for s in self._sent_to]) for r in self._replicas]
        with warnings.catch_warnings():  # an empty cluster: kept where it started
            warnings.simplefilter("ignore")
            if all(g.any() for g in groups):
                start = np.stack([x[g].mean(axis=0) for g in groups])
                centroids, _ = kmeans2(x, start, minit="matrix", seed=self._rng)
            else:  # a replica with nothing in the window: the best of a few fresh starts
                centroids = self._fresh(x, k)
        self.centroids = dict(zip(self._replicas, centroids, strict=True))
        self.mean = x.mean(axis=0)

    def _fresh(self, x: np.ndarray, k: int) -> np.ndarray:
        best: tuple[float, np.ndarray] | None = None
        for _ in range(self.restarts):
            c, labels = kmeans2(x, k, minit="++", seed=self._rng)
            inertia = float(((x - c[labels]) ** 2).sum())
            if best is None or inertia < best[0]:
                best = (inertia, c)
        assert best is not None
        return best[1]
