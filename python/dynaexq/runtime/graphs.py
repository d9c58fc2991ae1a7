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
    """A decode step of `batch` rows over `cache`, captured once and replayed."""

    def __init__(self, engine, cache, batch: int, warmup: int = 2) -> None:
        rt = getattr(engine, "precision", None)
        if engine.device.type != "cuda" or rt is None or not hasattr(rt, "begin_capture"):
            raise ValueError("CUDA graphs need an engine on a CUDA device with a budget")
        self.engine, self.rt, self.cache, self.batch = engine, rt, cache, batch
        self.capacity = int(cache.capacity)
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
                model(self.ids, self.pos, cache, key_slots=self.capacity)
            self.graph = torch.cuda.CUDAGraph()
            rt.begin_capture()
            try:
                with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
                    self.logits = model(self.ids, self.pos, cache, key_slots=self.capacity)[:, 0]
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
