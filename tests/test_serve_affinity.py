"""`SignatureClusters`, the affinity router's clusters of request signatures (no Ray):
two kinds of signatures routed greedily by their own affinity end on two replicas, each
replica keeps the kind it was serving through refits, a dead replica loses its cluster,
bad settings are refused."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("scipy")

from dynaexq.serve.affinity import SignatureClusters  # noqa: E402

DIM = 16


def kinds(rng: np.random.Generator, n: int, spread: float = 0.6) -> tuple[np.ndarray, np.ndarray]:
    """n signatures of two kinds: routing mass on experts 0-7 or 8-15, with noise."""
    kind = rng.integers(0, 2, n)
    base = np.zeros((2, DIM))
    base[0, :8], base[1, 8:] = 1.0, 1.0
    x = base[kind] + spread * rng.random((n, DIM))
    return x / x.sum(1, keepdims=True), kind


def greedy(clusters: SignatureClusters, x: np.ndarray, replicas: list[str]) -> list[str]:
    """Route each signature to the replica of highest affinity (alternate while none)."""
    sent = []
    for i, s in enumerate(x):
        aff = clusters.affinity(s)
        r = max(replicas, key=lambda r: aff.get(r, 0.0)) if aff else replicas[i % len(replicas)]
        clusters.observe(s, r)
        sent.append(r)
    return sent


@pytest.mark.parametrize("seed", range(5))
def test_two_kinds_end_on_two_replicas(seed: int) -> None:
    rng = np.random.default_rng(seed)
    clusters = SignatureClusters(seed=seed)
    x, kind = kinds(rng, 400)
    sent = greedy(clusters, x, ["a", "b"])
    late = range(200, 400)
    home = {k: max("ab", key=[sent[i] for i in late if kind[i] == k].count) for k in (0, 1)}
    assert home[0] != home[1]
    right = np.mean([sent[i] == home[kind[i]] for i in late])
    assert right > 0.95, right
    # fresh signatures: each kind's affinity is highest for its replica
    y, ykind = kinds(rng, 100)
    got = [max(clusters.affinity(s).items(), key=lambda kv: kv[1])[0] for s in y]
    assert np.mean([g == home[k] for g, k in zip(got, ykind, strict=True)]) > 0.95


def test_a_replica_keeps_its_kind_through_refits() -> None:
    rng = np.random.default_rng(3)
    clusters = SignatureClusters(refit_every=4)
    x, kind = kinds(rng, 300)
    for s, k in zip(x, kind, strict=True):  # kind 0 always to "b": the clusters follow
        clusters.observe(s, "b" if k == 0 else "a")
    for s, k in zip(x[:50], kind[:50], strict=True):
        aff = clusters.affinity(s)
        assert max(aff, key=aff.__getitem__) == ("b" if k == 0 else "a")


def test_no_clusters_before_enough_signatures_nor_with_one_replica() -> None:
    rng = np.random.default_rng(0)
    clusters = SignatureClusters(min_per_cluster=4, refit_every=1)
    x, _ = kinds(rng, 20)
    for s in x[:7]:
        clusters.observe(s, "a")
    assert clusters.affinity(x[0]) == {}  # one replica: nothing to tell apart
    for i, s in enumerate(x[:7]):
        clusters.observe(s, "ab"[i % 2])
    assert set(clusters.affinity(x[0])) == {"a", "b"}


def test_a_dead_replica_loses_its_cluster_and_a_new_one_gets_one() -> None:
    rng = np.random.default_rng(1)
    clusters = SignatureClusters(refit_every=2)
    x, kind = kinds(rng, 200)
    for s, k in zip(x, kind, strict=True):
        clusters.observe(s, "ab"[k])
    clusters.forget("b")
    assert clusters.replicas == ["a"] and set(clusters.affinity(x[0])) <= {"a"}
    clusters.set_replicas(["a", "c"])
    sent = greedy(clusters, x[:100], ["a", "c"])
    assert set(sent) == {"a", "c"} and set(clusters.affinity(x[0])) == {"a", "c"}


@pytest.mark.parametrize(
    "kw", [{"window": 1}, {"refit_every": 0}, {"min_per_cluster": 0}, {"restarts": 0}]
)
def test_bad_settings_are_refused(kw: dict) -> None:
    with pytest.raises(ValueError):
        SignatureClusters(**kw)
