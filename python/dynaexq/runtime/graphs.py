"""Decode under a CUDA graph: one captured step for a fixed batch over one KV cache.

The captured step is the model's whole decode forward with the precision runtime's
device executor: routing, the device-side sums, the grouped kernels reading the expert
table image. What happens between steps stays on the host, outside the graph
(`PrecisionRuntime.graph_step_begin` / `graph_step_end`): finished transitions publish,
the controller plans, the table is pinned and its image copied to the device ahead of the
replay. A switch of precision therefore changes the image the kernels read, not the
graph. The step reads every key slot of the cache (`key_slots` = its capacity, the
positions mask the rest), so one graph serves every position.

    graph = DecodeGraph(engine, cache, batch)
    logits = graph.step(next_ids, positions)   # [batch, vocab], a view that the next step reuses
"""

from __future__ import annotations

import torch


class DecodeGraph:
    """A decode step of `batch` rows over `cache`, captured once and replayed.

    `key_slots`: the key slots every step reads (default: the cache's capacity); the
    warm-up and capture write only the cache's last slot. `pool`: a CUDA graph memory
    pool shared with other graphs that never replay at the same time."""

    def __init__(
        self, engine, cache, batch: int, warmup: int = 2, key_slots: int | None = None, pool=None
    ) -> None:
        rt = getattr(engine, "precision", None)
        if engine.device.type != "cuda" or rt is None or not hasattr(rt, "begin_capture"):
            raise ValueError("CUDA graphs need an engine on a CUDA device with a budget")
        self.engine, self.rt, self.cache, self.batch = engine, rt, cache, batch
        self.capacity = int(cache.capacity)
        self.key_slots = self.capacity if key_slots is None else int(key_slots)
        dev = engine.device
        self.ids = torch.zeros(batch, 1, dtype=torch.long, device=dev)
        # Warm-up and capture write the last slot, which no position reaches before it is
        # written for real.
        self.pos = torch.full((batch, 1), self.capacity - 1, dtype=torch.long, device=dev)
        model = engine.model
        with torch.inference_mode():
            # Lazy initialisation (kernels, library handles) before the capture, on the
            # compute stream: the table's use marks are ordered on that stream.
            for _ in range(warmup):
                model(self.ids, self.pos, cache, key_slots=self.key_slots)
            self.graph = torch.cuda.CUDAGraph()
            rt.begin_capture()
            try:
                with torch.cuda.graph(self.graph, pool=pool, capture_error_mode="thread_local"):
                    out = model(self.ids, self.pos, cache, key_slots=self.key_slots)
                    self.logits = out[:, 0]
            finally:
                self.log = rt.end_capture()

    def step(self, next_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """One decode step: next_ids [batch] at positions [batch]; logits [batch, vocab]."""
        self.ids.copy_(next_ids.view(-1, 1))
        self.pos.copy_(positions.view(-1, 1))
        self.rt.graph_step_begin()
        self.graph.replay()
        self.rt.graph_step_end(self.log)
        return self.logits


# Batch sizes that get a graph of their own: a batch decodes under the smallest bucket
# that holds it, the rows past it inert (their outputs dropped).
BUCKETS = (1, 2, 4, 8, 16, 32)


def bucket_for(rows: int, buckets: tuple[int, ...] = BUCKETS) -> int | None:
    """The smallest bucket holding `rows` live rows; None past the largest (eager)."""
    return next((b for b in buckets if b >= rows), None)


def capacity_for(tokens: int) -> int:
    """Key slots of a bucket's cache: a power of two (at least 64), so that one graph
    serves requests of similar lengths and a longer one captures a new graph once."""
    return max(64, 1 << (max(1, tokens) - 1).bit_length())


def graphs_unavailable(engine) -> str | None:
    """Why CUDA graphs cannot decode for `engine` (None: they can)."""
    rt = getattr(engine, "precision", None)
    if engine.device.type != "cuda":
        return f"CUDA graphs need a CUDA device (the engine runs on {engine.device})"
    if rt is None or not hasattr(rt, "begin_capture"):
        return (
            "CUDA graphs need the precision runtime's device executor (a --budget with "
            "policy static, static-map or dynamic)"
        )
    if type(engine.model).__name__ != "Qwen3MoeForCausalLM":
        return f"CUDA graphs decode Qwen3-MoE models only, not {type(engine.model).__name__}"
    return None


class BucketedGraphs:
    """Decode graphs of an engine, one per batch bucket, captured when a batch first
    needs its bucket and reused by later calls; each owns a KV cache of its bucket's
    rows (recaptured with a larger cache when a request outgrows it).

    `graph(engine, cache, batch)` builds a captured step (`DecodeGraph`; tests pass an
    eager stand-in with the same `step`)."""

    def __init__(self, engine, buckets: tuple[int, ...] = BUCKETS, graph=DecodeGraph) -> None:
        self.engine, self.buckets, self._make = engine, buckets, graph
        self.graphs: dict[int, object] = {}
        self.captures = 0

    def fits(self, rows: int) -> bool:
        """Whether `rows` sequences decode under a graph (not past the largest bucket)."""
        return bucket_for(rows, self.buckets) is not None

    def begin(self, prefill_cache, rows: int, capacity: int) -> GraphSession | None:
        """A decode session for `rows` sequences whose prompts are in `prefill_cache`
        (its first `rows` rows, slots up to its capacity); None when `rows` is past the
        largest bucket."""
        bucket = bucket_for(rows, self.buckets)
        if bucket is None:
            return None
        graph = self.graphs.get(bucket)
        if graph is None or graph.capacity < capacity:  # type: ignore[attr-defined]
            self.graphs.pop(bucket, None)
            eng = self.engine
            cache = eng.model.allocate_cache(bucket, capacity_for(capacity), eng.dtype, eng.device)
            graph = self.graphs[bucket] = self._make(eng, cache, bucket)
            self.captures += 1
        n = prefill_cache.capacity
        for dst, src in zip(graph.cache.keys + graph.cache.values,  # type: ignore[attr-defined]
                            prefill_cache.keys + prefill_cache.values, strict=True):  # fmt: skip
            dst[:rows, :, :n].copy_(src[:rows])
        return GraphSession(graph, rows)


class GraphSession:
    """One generate call's decode through a bucket's graph: live sequences keep their
    graph rows (a finished one's row turns inert), and every inert row repeats the first
    live row's token and position, so it routes like a real token and writes only its
    own cache row."""

    def __init__(self, graph, rows: int) -> None:
        self.graph = graph
        self.rows = list(range(rows))  # the graph row of every live sequence
        self._index: torch.Tensor | None = None

    def keep(self, keep: list[int]) -> None:
        """Only the live sequences at positions `keep` go on."""
        self.rows = [self.rows[r] for r in keep]
        self._index = None

    def step(self, next_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """next_ids, positions [live] -> logits [live, vocab]."""
        b = self.graph.batch
        if self._index is None:
            self._index = torch.tensor(self.rows, device=next_ids.device)
        ids = next_ids[:1].expand(b).clone()
        pos = positions[:1].expand(b).clone()
        ids[self._index] = next_ids
        pos[self._index] = positions
        return self.graph.step(ids, pos)[self._index]


class SlabGraphs:
    """Decode graphs of a continuous-batching scheduler over its KV slab (`serve.scheduler`
    without a paged cache): one per (batch bucket, key-slot bucket), captured when a step
    first needs it, all in one memory pool (they replay one at a time).

    The graph of bucket b runs the slab's first b rows; the decoding rows are rows
    0..n-1. Rows n..b-1 may be prefilling or free, so an inert row writes only the slab's
    last slot (the position no prefill reaches: a prompt is shorter than the context),
    which its own sequence writes for real before it reads it. It repeats the first live
    row's token, so it routes like a real token. Key slots come in powers of two (at
    least 64, at most the context), so a step reads about twice its longest row at most.

    `graph(engine, cache, batch, key_slots=, pool=)` builds a captured step (`DecodeGraph`;
    tests pass an eager stand-in with the same `step`)."""

    def __init__(self, engine, slab, max_batch: int, graph=DecodeGraph) -> None:
        self.engine, self.slab, self._make = engine, slab, graph
        self.context = int(slab.capacity)
        self.buckets = tuple(b for b in BUCKETS if b < max_batch) + (max_batch,)
        self.graphs: dict[tuple[int, int], object] = {}
        self._pool = torch.cuda.graph_pool_handle() if graph is DecodeGraph else None

    @property
    def captures(self) -> int:
        return len(self.graphs)

    def key_slots_for(self, longest: int) -> int:
        """The key-slot bucket of a step whose rows reach `longest` slots."""
        return min(self.context, capacity_for(longest))

    def step(self, next_ids: torch.Tensor, positions: torch.Tensor, longest: int) -> torch.Tensor:
        """Decode rows 0..n-1 of the slab (next_ids, positions [n]; `longest`: the most key
        slots a row reads) -> logits [n, vocab], a view the next step reuses."""
        n = next_ids.shape[0]
        bucket = bucket_for(n, self.buckets)
        if bucket is None:
            raise ValueError(f"{n} rows are more than the slab's {self.buckets[-1]}")
        key = (bucket, self.key_slots_for(longest))
        graph = self.graphs.get(key)
        if graph is None:
            cache = self.slab.rows(0, bucket)
            graph = self._make(self.engine, cache, bucket, key_slots=key[1], pool=self._pool)
            self.graphs[key] = graph
        if bucket == n:
            return graph.step(next_ids, positions)  # type: ignore[attr-defined]
        ids = next_ids[:1].expand(bucket).clone()
        pos = torch.full(
            (bucket,), self.context - 1, dtype=positions.dtype, device=positions.device
        )
        ids[:n] = next_ids
        pos[:n] = positions
        return graph.step(ids, pos)[:n]  # type: ignore[attr-defined]
