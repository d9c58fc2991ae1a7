"""Continuous batching: one model worker thread, sequences join and leave at step granularity.

Every generated sequence (one "choice" of a request) owns one row of a KV-cache slab that
is allocated once at start: [max_batch, kv_heads, max_context, head_dim] per layer. The
rows are kept in two contiguous regions so that the model always sees a plain slice (a
view, no copy) of the slab as its cache:

    rows [0, n_decode)           decoding: one token per step each
    rows [n_decode, n_rows)      prefilling, in admission order (chunked prompts)

One iteration of the worker:
 1. admit queued requests while their sequences fit in the free rows;
 2. prefill: up to `max_prefill_tokens` prompt tokens of the prefilling rows, front first,
    as one padded forward; rows whose prompt is complete sample their first token and
    become the front of the decode region (a boundary move, no copy);
 3. decode: one forward for all decoding rows, sample, emit;
 4. drop finished or cancelled rows, compacting the regions (copy of a row's used slots).

With a paged KV cache (`kv_share`), rows own pages instead of slab rows: a request is
admitted when pages for its prompts (plus one page of reserve per sequence) are
available, reusing published prefix pages (a finished prompt's pages stay cached until
a reservation evicts them); before each decode step every row grows by a page when it
needs one. Under pressure the scheduler first asks the precision runtime to lend
top-tier expert slots (`lend_to_kv`: demotions, published before their slots become
pages), then preempts the newest sequence, which is recomputed later (its prompt and
generated tokens prefilled again) rather than failed. When pressure has passed, lent
slots go back to the experts (`reclaim_from_kv`). With the runtime's budget the pages are
views of its expert pool's arena (`runtime.kv_share.SharedKvArena`): the floor pages at
its head, the others inside lent slots. Moving a row is then free (no copy).

Prefill chunks and decode steps alternate, so a long prompt never stalls the running
batch for more than one chunk. Tokens, text pieces and finish reasons go back to the
asyncio side through `loop.call_soon_threadsafe`.

Log-probabilities (`SequenceSpec.logprobs`) are those of the distribution each token was
actually drawn from: sampling: the model's logits / temperature, restricted by top-k,
top-p and a grammar, renormalised; greedy (temperature 0): the model's distribution at
temperature 1 (restricted by a grammar when there is one), whose most likely token is
the one picked. Prompt log-probabilities (`prompt_logprobs`, for `echo`) are the model's
own distribution at temperature 1 over the prompt's next tokens, from the prefill itself.
A grammar (`SequenceSpec.grammar`, an xgrammar `CompiledGrammar`) masks every token it
does not allow before sampling, and ends the sequence ("stop") when it is complete.
Text is detokenized incrementally (`IncrementalDetokenizer`): O(1) work per token.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from dynaexq.generation import filter_logits
from dynaexq.serve.detokenize import IncrementalDetokenizer

if TYPE_CHECKING:
    from dynaexq._core import DeviceBudget
    from dynaexq.engine import Engine
    from dynaexq.runtime.graphs import SlabGraphs
    from dynaexq.runtime.kv_share import KvShare
    from dynaexq.serve.metrics import ServerMetrics

log = logging.getLogger("dynaexq.serve")
PROMPT_SCORE_ROWS = 256  # prompt positions scored per log-softmax (echo)


class KvLender(Protocol):
    """The expert side of a budget shared with the KV pages (the precision runtime)."""

    def lend_to_kv(self, nbytes: int) -> int:
        """Begin releasing at least `nbytes` of expert bytes; returns the bytes begun."""
        ...

    def reclaim_from_kv(self) -> int:
        """Take back lent bytes the budget can hold again; returns the bytes."""
        ...

    def settle(self) -> None:
        """Land finished copies now (between steps)."""
        ...

    @property
    def lend_in_flight(self) -> bool: ...


# Iterations without page pressure before lent bytes go back to the experts.
RECLAIM_AFTER_CALM_STEPS = 8


class QueueFullError(Exception):
    """Too many requests are waiting; the client should retry later (HTTP 429)."""


class ShuttingDownError(Exception):
    """The server is draining and accepts no new work (HTTP 503)."""


class GenerationError(Exception):
    """The model worker failed while running this request (HTTP 500)."""


@dataclass(frozen=True)
class SequenceSpec:
    """What one generated sequence asks for."""

    prompt_ids: tuple[int, ...]
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    eos_ids: frozenset[int] = frozenset()
    stream_text: bool = False  # produce text pieces as tokens arrive (else text at the end)
    # Log-probabilities of the generated tokens with this many alternatives (None: none).
    logprobs: int | None = None
    # Log-probabilities of the prompt's tokens (echo) with this many alternatives; with it
    # max_new_tokens may be 0 (score the prompt, generate nothing).
    prompt_logprobs: int | None = None
    # Constrained decoding: an xgrammar CompiledGrammar every generated token must follow.
    grammar: Any = None


@dataclass(frozen=True)
class TokenLogprob:
    """A token's log-probability and the most likely tokens at its position."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token id, log-probability), most likely first


@dataclass
class SequenceEvent:
    """New output of sequence `index` of a request."""

    index: int
    token_ids: list[int]
    text: str
    finish_reason: str | None  # None while running, else "stop" or "length"
    logprobs: list[TokenLogprob] | None = None  # one per token id, when asked for
    # In the sequence's first event, when asked for: one per prompt token (None for the
    # first, which nothing predicts).
    prompt_logprobs: list[TokenLogprob | None] | None = None


class GenerationRequest:
    """One submitted request: several sequences sharing a result queue."""

    _ids = itertools.count()

    def __init__(self, specs: Sequence[SequenceSpec], loop: asyncio.AbstractEventLoop) -> None:
        self.id = next(self._ids)
        self.specs = list(specs)
        self.loop = loop
        self.events: asyncio.Queue[SequenceEvent | BaseException] = asyncio.Queue()
        self.arrival = time.perf_counter()
        self.cancelled = False  # set from the event loop, read by the worker
        self.unfinished = len(self.specs)

    def cancel(self) -> None:
        """Stop generating (client went away); the worker frees the rows at its next step."""
        self.cancelled = True

    # called on the worker thread
    def _post(self, item: SequenceEvent | BaseException) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            self.cancelled = True


@dataclass(eq=False)
class _Sequence:
    request: GenerationRequest
    index: int
    spec: SequenceSpec
    prefilled: int = 0  # prompt tokens already in the cache
    generated: list[int] = field(default_factory=list)
    sent_chars: int = 0
    posted: int = 0  # tokens already reported to the request
    generator: torch.Generator | None = None
    first_token_at: float | None = None
    finished: bool = False
    detok: IncrementalDetokenizer | None = None
    searched: int = 0  # text already searched for stop strings
    stopped_at: int | None = None  # where a stop string cut the text
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None
    prompt_posted: bool = False
    matcher: Any = None  # xgrammar GrammarMatcher
    kv_id: int = -1  # the page pool's id of this sequence (paged KV)
    admitted: int = 0  # admission order (the newest is preempted first)
    # After a preemption: the tokens to prefill again (the prompt and every generated
    # token but the last, which the next decode step feeds).
    resume: tuple[int, ...] | None = None

    @property
    def prefill_ids(self) -> tuple[int, ...]:
        return self.resume if self.resume is not None else self.spec.prompt_ids

    @property
    def cached(self) -> int:
        """Slots of this row's cache that hold real keys/values."""
        if self.prefilled < len(self.prefill_ids):
            return self.prefilled
        return len(self.spec.prompt_ids) + max(len(self.generated) - 1, 0)


class Scheduler:
    """Owns the model worker thread; `submit` is called from the event loop."""

    def __init__(
        self,
        engine: Engine,
        *,
        max_batch: int = 32,
        max_queue: int = 256,
        max_context: int | None = None,
        max_prefill_tokens: int = 1024,
        metrics: ServerMetrics | None = None,
        kv_share: KvShare | None = None,
        kv_budget: DeviceBudget | None = None,
        kv_lender: KvLender | None = None,
        cuda_graphs: bool = False,
        graph_step: Callable[..., Any] | None = None,
        recalibrate_tokens: int = 0,
        recalibrate_on: str = "first",
    ) -> None:
        """cuda_graphs=True: decode steps replay a CUDA graph per batch and key-slot bucket
        (`runtime.graphs.SlabGraphs`) when the engine can (a CUDA device, the precision
        runtime's device executor, Qwen3-MoE) and the KV cache is the slab; else they stay
        eager, with a warning. `graph_step` replaces the captured step (tests: an eager
        stand-in), and then the engine's checks are skipped.

        recalibrate_tokens > 0 (a dynamic policy): once the finished sequences hold this
        many tokens (prompts and generated), the precision runtime is calibrated again on
        them between two steps (`runtime.recalibrate`): once (`recalibrate_on` "first"),
        or again on each next as many ("window"); else a warning."""
        from dynaexq.runtime.policy import SERVED_RECALIBRATION_TRIGGERS

        if recalibrate_on not in SERVED_RECALIBRATION_TRIGGERS:
            raise ValueError(f"recalibrate_on must be first or window, got {recalibrate_on!r}")
        if max_batch < 1 or max_queue < 0 or max_prefill_tokens < 1:
            raise ValueError("max_batch and max_prefill_tokens must be >= 1, max_queue >= 0")
        config = engine.config
        limit = config.max_position_embeddings
        self.max_context = min(max_context or limit, limit)
        if self.max_context < 2:
            raise ValueError(f"max_context must be >= 2, got {self.max_context}")
        self.engine = engine
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.max_prefill_tokens = max_prefill_tokens
        self.metrics = metrics
        self._tokenizer = engine.tokenizer
        self._decode = engine.tokenizer.decode if engine.tokenizer is not None else None
        self.kv_share = kv_share
        self.preemptions = 0
        self._preempted: list[_Sequence] = []  # waiting to be recomputed, oldest first
        self._admissions = itertools.count()
        self._calm_steps = 0
        self._lender = kv_lender
        self._state_slab: Any = None  # paged Qwen3-Next: the linear layers' state rows
        if kv_share is None:
            # All KV memory (and any recurrent state) is reserved here, once, in the
            # model's own cache type (a KVCache; Qwen3-Next's HybridCache).
            self._slab = engine.model.allocate_cache(
                max_batch, self.max_context, engine.dtype, engine.device
            )
        else:
            self._setup_pages(kv_share, kv_budget)
        # Tokens still to serve before the next recalibration (None: off, or done).
        self._recal_pending: int | None = None
        self._recal_every = recalibrate_tokens if recalibrate_on == "window" else None
        self._served: list[np.ndarray] = []
        self.recalibrations = 0
        if recalibrate_tokens > 0:
            dep = getattr(engine, "deployment", None)
            if dep is not None and dep.policy.name == "dynamic":
                self._recal_pending = recalibrate_tokens
            else:
                log.warning("recalibration needs the dynamic policy; not recalibrating")
        self.graphs: SlabGraphs | None = None
        if cuda_graphs or graph_step is not None:
            self.graphs = self._decode_graphs(graph_step)
        self._rows: list[_Sequence] = []
        self._n_decode = 0
        self._waiting: collections.deque[GenerationRequest] = collections.deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._drain = True
        self._thread: threading.Thread | None = None
        self.steps = 0
        self.generated_tokens = 0
        self.requests_finished = 0

    def _setup_pages(self, share: KvShare, budget: DeviceBudget | None) -> None:
        from dynaexq._core import DeviceBudget, KvPagePool
        from dynaexq.model.paged_kv import PagedKVCache

        config = self.engine.config
        # Qwen3-Next: pages for its attention layers, rows of a state slab (capacity 0)
        # for the recurrent and convolution state of its linear layers. A shared prefix
        # would need that state at the prefix's end, which is not kept: no sharing there.
        self._share_prefixes = config.model_type != "qwen3_next"
        if config.model_type == "qwen3_next":
            self._state_slab = self.engine.model.allocate_cache(
                self.max_batch, 0, self.engine.dtype, self.engine.device
            )
        dtype_bytes = torch.empty((), dtype=self.engine.dtype).element_size()
        page_bytes = share.page_bytes(config, dtype_bytes)
        if budget is None:  # nothing to share with: a tracker of the KV bounds alone
            budget = DeviceBudget(
                share.ceiling_bytes(config, dtype_bytes),
                kv_floor=share.floor_bytes(config, dtype_bytes),
            )
        self.kv_budget = budget
        self._kv_ids = itertools.count()
        # The runtime whose pool arena holds the pages (when the budget is its tracker).
        runtime = getattr(self.engine, "precision", None)
        mine = budget is getattr(self.engine, "kv_budget", None)
        shared = getattr(runtime, "kv_arena", None) if mine else None
        if shared is not None and shared.geometry.page_bytes == page_bytes:
            # The pages live in the expert pool's arena: the floor pages online from the
            # start, the lent slots' pages as the runtime lends them.
            self._pages = KvPagePool(
                share.page_tokens,
                page_bytes,
                shared.pages,
                budget,
                online=(0, shared.geometry.floor_pages),
            )
            self._arena = PagedKVCache.over_arena(
                config,
                shared.buffer(),
                share.page_tokens,
                self.engine.dtype,
                page_start=shared.page_start,
                scratch_page=shared.scratch_page,
                owner=shared.pool,
            )
            self._kv_own_bytes = shared.geometry.head_bytes
            runtime.attach_kv_pages(self._pages)  # type: ignore[union-attr]
            if share.min_kv_tokens < share.max_kv_tokens and shared.pages_per_slot() == 0:
                log.warning(
                    "a KV page of %d tokens (%d B) does not fit in a lent top-tier expert "
                    "slot beside the lowest-tier slot it hosts: no expert bytes can become "
                    "pages; lower --kv-page-tokens",
                    share.page_tokens,
                    page_bytes,
                )
            return
        self._pages = KvPagePool(share.page_tokens, page_bytes, share.pages, budget)
        self._arena = PagedKVCache.allocate(
            config, share.pages, share.page_tokens, self.engine.dtype, self.engine.device
        )
        self._kv_own_bytes = self._arena.nbytes

    def _decode_graphs(self, graph_step: Callable[..., Any] | None) -> SlabGraphs | None:
        from dynaexq.runtime.graphs import DecodeGraph, SlabGraphs, graphs_unavailable

        why = None if graph_step is not None else graphs_unavailable(self.engine)
        if why is None and self.kv_share is not None:
            why = "CUDA graphs decode over the contiguous KV cache, not the paged one"
        if why is not None:
            log.warning("%s; decoding eagerly", why)
            return None
        return SlabGraphs(self.engine, self._slab, self.max_batch, graph_step or DecodeGraph)

    @property
    def paged(self) -> bool:
        return self.kv_share is not None

    @property
    def kv_cache_bytes(self) -> int:
        """Bytes reserved for the KV cache: max_batch sequences of max_context tokens, or
        (paged) the page arena, of which the shared budget lets pages use their share; with
        the pages in the expert pool's arena, only its head (lent pages are pool bytes)."""
        if self.kv_share is None:
            return int(self._slab.nbytes)
        state = 0 if self._state_slab is None else self._state_slab.nbytes
        return int(self._kv_own_bytes + state)

    def kv_stats(self) -> dict[str, int]:
        """Pages used / free, preemptions and the budget split (paged KV; empty otherwise).
        Read from the HTTP threads: the pool and the tracker lock themselves."""
        if self.kv_share is None:
            return {}
        pages = self._pages.stats()
        snap = self.kv_budget.snapshot()
        return {
            "page_tokens": pages["page_tokens"],
            "pages_used": pages["used"],
            "pages_free": pages["available"],
            "pages_capacity": pages["capacity"],
            "pages_online": pages["online"],
            "pages_cached": pages["cached"],
            "pages_evicted": pages["evicted"],
            "pages_shared": pages["shared"],
            "prefix_hit_pages": pages["prefix_hit_pages"],
            "preemptions": self.preemptions,
            "kv_bytes": snap["kv_bytes"],
            "expert_bytes": snap["expert_bytes"],
            "budget_bytes": snap["limit"],
            "moved_to_kv_bytes": snap["moved_to_kv_bytes"],
            "moved_to_experts_bytes": snap["moved_to_experts_bytes"],
        }

    # -- event-loop side ------------------------------------------------------------------
    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._rows)

    @property
    def preempted(self) -> int:
        """Sequences waiting to be recomputed after a preemption."""
        return len(self._preempted)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def accepting(self) -> bool:
        return not self._stopping and self.alive

    def submit(self, specs: Sequence[SequenceSpec]) -> GenerationRequest:
        """Queue a request; raises QueueFullError or ShuttingDownError."""
        if not specs:
            raise ValueError("a request needs at least one sequence")
        if len(specs) > self.max_batch:
            raise ValueError(f"{len(specs)} sequences exceed the batch size {self.max_batch}")
        for s in specs:
            need = len(s.prompt_ids) + s.max_new_tokens
            least = 0 if s.prompt_logprobs is not None else 1
            if not s.prompt_ids or s.max_new_tokens < least or need > self.max_context:
                raise ValueError(f"sequence needs {need} slots, context is {self.max_context}")
            if self.kv_share is not None and need > self.kv_share.max_kv_tokens:
                raise ValueError(
                    f"sequence needs {need} tokens of KV, more than --max-kv-tokens "
                    f"({self.kv_share.max_kv_tokens})"
                )
        request = GenerationRequest(specs, asyncio.get_running_loop())
        with self._cond:
            if self._stopping or not self.alive:
                raise ShuttingDownError("the server is shutting down")
            # Requests the worker will admit at its next step (they fit in free rows) are
            # not queued; the limit applies to those that have to wait for rows.
            free = self.max_batch - len(self._rows)
            queued = 0
            for other in self._waiting:
                if queued == 0 and len(other.specs) <= free:
                    free -= len(other.specs)
                else:
                    queued += 1
            if queued >= self.max_queue and len(specs) > free:
                raise QueueFullError(
                    f"the server is busy: {queued} requests are waiting for a batch slot "
                    f"(limit {self.max_queue}); retry later"
                )
            self._waiting.append(request)
            self._cond.notify()
        return request

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="dynaexq-model", daemon=True)
        self._thread.start()

    def stop(self, drain: bool = True, timeout: float | None = None) -> bool:
        """Stop accepting work; with drain, finish what is queued and running first.

        Returns True if the worker ended within the timeout."""
        with self._cond:
            self._stopping = True
            self._drain = drain
            self._cond.notify()
        if self._thread is None:
            return True
        self._thread.join(timeout)
        if self._thread.is_alive() and drain:  # drain took too long: cancel the rest
            with self._cond:
                self._drain = False
                self._cond.notify()
            self._thread.join(5.0)
        return not self._thread.is_alive()

    # -- worker side ----------------------------------------------------------------------
    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._cond:
                idle = not self._rows and not self._waiting and not self._preempted
                if idle and self.kv_share is not None and self._lender is not None:
                    self._lender.reclaim_from_kv()  # no load: lent bytes go back to experts
                while (
                    not self._rows and not self._waiting and not self._preempted
                ) and not self._stopping:
                    self._cond.wait()
                if self._stopping and not self._drain:
                    self._fail_all(ShuttingDownError("the server shut down"))
                    return
                if self._stopping and not self._rows and not self._waiting and not self._preempted:
                    return
                if self.kv_share is not None and self._lender is not None:
                    self._lender.settle()  # lent bytes that landed become admittable
                self._admit()
                if not self._rows and (self._waiting or self._preempted):
                    self._wait_for_pages()
                    continue
            try:
                self._iteration()
            except Exception as e:  # never let one bad step kill the server
                log.exception("model step failed; failing the running requests")
                self._fail_all(GenerationError(f"generation failed: {type(e).__name__}: {e}"))

    def _admit(self) -> None:
        """Move preempted sequences, then queued requests, into free rows (called with
        the lock held); paged: only while their pages can be reserved."""
        while self._preempted:
            seq = self._preempted[0]
            if seq.request.cancelled:
                self._preempted.pop(0)
                continue
            if len(self._rows) + 1 > self.max_batch or not self._take_pages([seq]):
                return  # the oldest preempted goes first: nothing overtakes it
            self._preempted.pop(0)
            self._rows.append(seq)
        while self._waiting:
            req = self._waiting[0]
            if req.cancelled:
                self._waiting.popleft()
                continue
            if len(self._rows) + len(req.specs) > self.max_batch:
                break
            seqs = [_Sequence(req, i, spec) for i, spec in enumerate(req.specs)]
            if self.kv_share is not None and not self._take_pages(seqs):
                break
            self._waiting.popleft()
            for seq in seqs:
                spec = seq.spec
                if spec.seed is not None and spec.temperature > 0:
                    seq.generator = torch.Generator(device=self.engine.device)
                    seq.generator.manual_seed(spec.seed)
                if self._tokenizer is not None:
                    seq.detok = IncrementalDetokenizer(self._tokenizer)
                if spec.grammar is not None:
                    import xgrammar

                    seq.matcher = xgrammar.GrammarMatcher(
                        spec.grammar, terminate_without_stop_token=True
                    )
                seq.admitted = next(self._admissions)
                self._rows.append(seq)

    # -- paged KV: pages, pressure, preemption ----------------------------------------------
    def _take_pages(self, seqs: list[_Sequence]) -> bool:
        """Open the sequences in the page pool, share their published prefix pages and
        reserve the rest of what they prefill, keeping a page of reserve each when others
        run (alone, a sequence may use every page); all or none. On shortage, ask the
        lender for the bytes and report False."""
        from dynaexq._core import PoolExhausted

        pool = self._pages
        opened: list[_Sequence] = []
        try:
            need = 0
            for seq in seqs:
                seq.kv_id = next(self._kv_ids)
                pool.open(seq.kv_id)
                opened.append(seq)
                tokens = seq.prefill_ids
                if self._share_prefixes and seq.spec.prompt_logprobs is None and not seq.resume:
                    seq.prefilled = pool.share_prefix(seq.kv_id, list(tokens))
                need += pool.pages_short(seq.kv_id, len(tokens))
            if self._rows:
                need += len(seqs)  # a page of growth each, beside the running rows
            if need > pool.available:
                raise PoolExhausted(f"{need} pages needed, {pool.available} available")
            for seq in seqs:
                pool.reserve(seq.kv_id, len(seq.prefill_ids))
            return True
        except PoolExhausted:
            for seq in opened:
                pool.close(seq.kv_id)
                seq.prefilled = 0
            self._ask_lender(need if opened else 1)
            return False

    def _ask_lender(self, pages: int) -> bool:
        """Ask the precision runtime to lend the bytes of `pages` pages (or more); True if
        bytes are on their way (now or from an earlier ask)."""
        self._calm_steps = 0
        if self._lender is None:
            return False
        # Short of pages the pool can hand out now: free or cached, online and in budget.
        short = (pages - self._pages.available) * self._pages.page_bytes
        if short > 0 and self._lender.lend_to_kv(short) > 0:
            return True
        return self._lender.lend_in_flight

    def _wait_for_pages(self) -> None:
        """Nothing runs and the head of the queue does not fit: wait for lent bytes to
        land, or fail it if nothing can ever make room (called with the lock held)."""
        if self._lender is not None and self._lender.lend_in_flight:
            self._cond.wait(0.002)
            return
        head = self._preempted[0].request if self._preempted else self._waiting.popleft()
        if self._preempted:
            self._preempted.pop(0)
        head.cancelled = True  # its other sequences, if any, go too
        head._post(self._kv_too_small())

    def _kv_too_small(self) -> GenerationError:
        return GenerationError(
            "the KV share of the budget cannot hold this request even with nothing else "
            f"running ({self._pages.available} pages free of {self._pages.capacity}); "
            "raise --min-kv-tokens or the budget"
        )

    def _grow_for_decode(self) -> None:
        """Give every decoding row the page its next token needs; under pressure ask the
        lender, then preempt the newest sequence until the rest fit."""
        from dynaexq._core import PoolExhausted

        r = 0
        while r < self._n_decode:
            seq = self._rows[r]
            try:
                self._pages.reserve(seq.kv_id, seq.cached + 1)
                r += 1
                continue
            except PoolExhausted:
                pass
            lending = self._ask_lender(1)
            if len(self._rows) == 1 and not lending:
                # Alone, and nothing will ever free a page: recomputing it would only
                # run into the same wall again.
                self._rows[0].request.cancelled = True
                self._rows[0].request._post(self._kv_too_small())
                self._remove_row(0)
                continue
            newest = max(range(len(self._rows)), key=lambda i: self._rows[i].admitted)
            self._preempt(newest)
            r = 0  # rows moved; reserving again is a no-op for rows that have their page

    def _preempt(self, row: int) -> None:
        """Take a row out (its pages freed) to be recomputed when pages are free again."""
        seq = self._rows[row]
        self._remove_row(row)
        seq.prefilled = 0
        if seq.generated:
            seq.resume = seq.spec.prompt_ids + tuple(seq.generated[:-1])
        elif not seq.prompt_posted:
            seq.prompt_logprobs = None  # scored again from the start
        self.preemptions += 1
        if self.metrics is not None:
            self.metrics.preemptions.inc()
        at = next(
            (i for i, s in enumerate(self._preempted) if s.admitted > seq.admitted),
            len(self._preempted),
        )
        self._preempted.insert(at, seq)

    def _maybe_reclaim(self) -> None:
        """After a calm spell, lent bytes the budget can hold go back to the experts."""
        if self._lender is None or self._preempted or self._waiting:
            self._calm_steps = 0
            return
        self._calm_steps += 1
        if self._calm_steps >= RECLAIM_AFTER_CALM_STEPS:
            self._lender.reclaim_from_kv()
            self._calm_steps = 0

    def _iteration(self) -> None:
        self._drop(lambda s: s.request.cancelled)
        if self._n_decode < len(self._rows):
            t0 = time.perf_counter()
            n = self._prefill()
            if self.metrics is not None:
                self.metrics.observe_step("prefill", time.perf_counter() - t0, n)
            self._drop(lambda s: s.finished)
        if self.kv_share is not None:
            self._grow_for_decode()
            self._maybe_reclaim()
        if self._n_decode:
            t0 = time.perf_counter()
            n = self._decode_step()
            if self.metrics is not None:
                self.metrics.observe_step("decode", time.perf_counter() - t0, n)
            self._drop(lambda s: s.finished)
        self.steps += 1
        if self._recal_pending is not None and self._recal_pending <= 0:
            self._recalibrate()

    def _recalibrate(self) -> None:
        from dynaexq.runtime.recalibrate import recalibrate

        served, self._served, self._recal_pending = self._served, [], self._recal_every
        t0 = time.perf_counter()
        try:
            recalibrate(self.engine, self.engine.deployment, served)  # type: ignore[attr-defined]
        except ValueError as e:  # too little text: serving goes on with the old one
            log.warning("recalibration skipped: %s", e)
            return
        self.recalibrations += 1
        log.info(
            "recalibrated on %d served tokens in %.1f s",
            sum(len(x) for x in served),
            time.perf_counter() - t0,
        )

    def _cache_view(self, start: int, stop: int) -> Any:
        """Rows start..stop-1 of the slab as views (a KVCache, or the model's own type),
        or (paged) the pages of those rows."""
        if self.kv_share is not None:
            rows = self._rows[start:stop]
            pages = self._arena.view([self._pages.block_table(s.kv_id) for s in rows])
            if self._state_slab is not None:
                from dynaexq.model.qwen3_next import PagedHybridView

                return PagedHybridView(self._state_slab.rows(start, stop), pages)
            return pages
        return self._slab.rows(start, stop)

    def _prefill(self) -> int:
        """One chunked-prefill forward over the front of the prefill region."""
        budget = self.max_prefill_tokens
        chunks: list[tuple[_Sequence, int, int]] = []  # (seq, start, length)
        for seq in self._rows[self._n_decode :]:
            if budget == 0:
                break
            start = seq.prefilled
            length = min(len(seq.prefill_ids) - start, budget)
            chunks.append((seq, start, length))
            budget -= length
        device = self.engine.device
        k, longest = len(chunks), max(c[2] for c in chunks)
        ids = torch.zeros(k, longest, dtype=torch.long)
        lengths = torch.tensor([c[2] for c in chunks])
        starts = torch.tensor([c[1] for c in chunks])
        for r, (seq, start, length) in enumerate(chunks):
            ids[r, :length] = torch.tensor(seq.prefill_ids[start : start + length])
        offsets = torch.arange(longest).unsqueeze(0)
        # Padding writes into the row's own future slots (overwritten before they are read);
        # clamp so it stays inside the slab.
        positions = (starts.unsqueeze(1) + offsets).clamp(max=self.max_context - 1)
        mask = offsets < lengths.unsqueeze(1)
        first = self._n_decode
        # Rows that score their prompt (echo) need the logits of every position.
        scoring = any(_scores_prompt(c[0]) for c in chunks)
        out = self.engine.model(
            ids.to(device),
            positions.to(device),
            self._cache_view(first, first + k),
            mask.to(device),
            logits_index=None if scoring else (lengths - 1).to(device),
        )
        logits = out[torch.arange(k), (lengths - 1).to(device)] if scoring else out[:, 0]
        done_rows: list[int] = []
        for r, (seq, start, length) in enumerate(chunks):
            if _scores_prompt(seq):
                self._score_prompt(seq, out[r, :length], start)
            seq.prefilled += length
            if seq.prefilled == len(seq.prefill_ids):
                done_rows.append(r)
        # Completed prompts are a prefix of the chunk list (only the last chunk can be
        # partial), so they are already the front of the prefill region.
        assert done_rows == list(range(len(done_rows)))
        if done_rows:
            seqs = [chunks[r][0] for r in done_rows]
            self._n_decode += len(seqs)
            # A recomputed sequence already drew its next token: it just decodes on.
            sample = [
                r for r, s in enumerate(seqs) if s.spec.max_new_tokens > 0 and s.resume is None
            ]
            for s in seqs:
                if s.spec.max_new_tokens == 0:  # the prompt scored, nothing to generate
                    self._finish_without_tokens(s)
                if self.kv_share is not None and self._share_prefixes and s.resume is None:
                    self._pages.publish(s.kv_id, list(s.spec.prompt_ids))
                s.resume = None
            if sample:
                self._sample_and_emit([seqs[r] for r in sample], logits[sample])
        return int(lengths.sum())

    def _score_prompt(self, seq: _Sequence, logits: torch.Tensor, start: int) -> None:
        """Log-probabilities of the prompt tokens that positions start.. predict."""
        prompt = seq.spec.prompt_ids
        if seq.prompt_logprobs is None:
            seq.prompt_logprobs = [None]  # the first token: nothing predicts it
        n = min(len(logits), len(prompt) - 1 - start)  # the last position predicts no prompt
        top_n = seq.spec.prompt_logprobs or 0
        # A slice of positions at a time: float32 log-probabilities of a long chunk over a
        # large vocabulary would otherwise take gigabytes at once.
        for a in range(0, max(n, 0), PROMPT_SCORE_ROWS):
            b = min(n, a + PROMPT_SCORE_ROWS)
            lp = torch.log_softmax(logits[a:b].float(), dim=-1)
            targets = torch.tensor(prompt[start + 1 + a : start + 1 + b], device=lp.device)
            chosen = lp.gather(1, targets.unsqueeze(1))[:, 0].tolist()
            tops: list[tuple[tuple[int, float], ...]] = [()] * (b - a)
            if top_n:
                values, idx = lp.topk(top_n, dim=-1)
                tops = [
                    tuple(zip(i, v, strict=True))
                    for i, v in zip(idx.tolist(), values.tolist(), strict=True)
                ]
            seq.prompt_logprobs += [
                TokenLogprob(t, c, top)
                for t, c, top in zip(targets.tolist(), chosen, tops, strict=True)
            ]

    def _finish_without_tokens(self, seq: _Sequence) -> None:
        seq.finished = True
        now = time.perf_counter()
        self._finish_metrics(seq, now)
        seq.prompt_posted = True
        seq.request._post(
            SequenceEvent(seq.index, [], "", "length", [], prompt_logprobs=seq.prompt_logprobs)
        )

    def _decode_step(self) -> int:
        n = self._n_decode
        seqs = self._rows[:n]
        device = self.engine.device
        last = torch.tensor([s.generated[-1] for s in seqs], device=device).unsqueeze(1)
        pos = torch.tensor([s.cached for s in seqs], device=device).unsqueeze(1)
        # Key slots from the host's own counts: the mask needs no read of the device.
        key_slots = max(s.cached for s in seqs) + 1
        if self.graphs is not None:
            logits = self.graphs.step(last.view(-1), pos.view(-1), key_slots)
        else:
            view = self._cache_view(0, n)
            logits = self.engine.model(last, pos, view, key_slots=key_slots)[:, 0]
        self._sample_and_emit(seqs, logits)
        return n

    def _sample_and_emit(self, seqs: list[_Sequence], logits: torch.Tensor) -> None:
        masked = [r for r, s in enumerate(seqs) if s.matcher is not None]
        if masked:
            import xgrammar

            logits = logits.float().clone()
            bitmask = xgrammar.allocate_token_bitmask(1, logits.shape[-1])
            for r in masked:
                seqs[r].matcher.fill_next_token_bitmask(bitmask)
                row = logits[r : r + 1]
                xgrammar.apply_token_bitmask_inplace(row, bitmask.to(row.device))
        tokens = logits.argmax(dim=-1)
        dists: list[torch.Tensor | None] = [None] * len(seqs)
        for r, seq in enumerate(seqs):
            spec = seq.spec
            if spec.temperature > 0:
                row = filter_logits(
                    logits[r : r + 1].float() / spec.temperature, spec.top_k, spec.top_p
                )
                probs = row.softmax(-1)[0]
                if bool(torch.isfinite(probs).all()):  # else keep the argmax, never fail
                    tokens[r] = torch.multinomial(probs, 1, generator=seq.generator)[0]
                    dists[r] = row[0]
        now = time.perf_counter()
        for r, (seq, tok) in enumerate(zip(seqs, tokens.tolist(), strict=True)):
            if seq.spec.logprobs is not None:
                sampled = dists[r]
                dist = sampled if sampled is not None else logits[r].float()
                seq.logprobs.append(_token_logprob(dist, int(tok), seq.spec.logprobs))
            if seq.matcher is not None and not seq.matcher.accept_token(int(tok)):
                log.warning("grammar refused token %d it allowed; ending the sequence", tok)
                seq.matcher = None
            self._advance(seq, int(tok), now)
        if self.metrics is not None:
            self.metrics.add_generated(len(seqs), now)

    def _advance(self, seq: _Sequence, tok: int, now: float) -> None:
        spec = seq.spec
        seq.generated.append(tok)
        self.generated_tokens += 1
        if seq.first_token_at is None:
            seq.first_token_at = now
            if self.metrics is not None:
                self.metrics.ttft.observe(now - seq.request.arrival)
        reason: str | None = None
        if tok in spec.eos_ids:
            reason = "stop"
        if seq.matcher is not None and seq.matcher.is_terminated():
            reason = "stop"  # the grammar is complete
        text = ""
        if seq.detok is not None:
            seq.detok.step(tok)
            full = seq.detok.text
            if spec.stop and seq.stopped_at is None:
                # Only the new text (and a stop string's length before it) can hold a new match.
                longest = max(len(x) for x in spec.stop)
                begin = max(0, seq.searched - longest + 1)
                cuts = [i for x in spec.stop if (i := full.find(x, begin)) >= 0]
                seq.searched = len(full)
                if cuts:
                    seq.stopped_at = min(cuts)
                    reason = "stop"
            if reason is None and len(seq.generated) >= spec.max_new_tokens:
                reason = "length"
            if reason is None:
                if spec.stream_text:
                    # Hold back what could still turn into a stop string.
                    hold = max((len(x) for x in spec.stop), default=1) - 1
                    ready = len(full) - hold
                    if ready > seq.sent_chars:
                        text = full[seq.sent_chars : ready]
                        seq.sent_chars = ready
            else:
                if seq.stopped_at is not None:
                    full = full[: seq.stopped_at]
                elif self._decode is not None:
                    # Once at the end: the whole decode, so that a trailing incomplete
                    # character shows as the tokenizer's replacement, as decode() gives it.
                    full = self._decode(seq.generated)
                text = full[seq.sent_chars :]
                seq.sent_chars = max(len(full), seq.sent_chars)
        elif reason is None and len(seq.generated) >= spec.max_new_tokens:
            reason = "length"
        if reason is not None:
            seq.finished = True
            self._finish_metrics(seq, now)
        if spec.stream_text or reason is not None:
            new, start = seq.generated[seq.posted :], seq.posted
            seq.posted = len(seq.generated)
            event = SequenceEvent(seq.index, new, text, reason)
            if spec.logprobs is not None:
                event.logprobs = seq.logprobs[start : seq.posted]
            if not seq.prompt_posted:
                seq.prompt_posted = True
                event.prompt_logprobs = seq.prompt_logprobs
            seq.request._post(event)

    def _finish_metrics(self, seq: _Sequence, now: float) -> None:
        if self._recal_pending is not None:  # served text, for the recalibration
            served = np.asarray((*seq.spec.prompt_ids, *seq.generated), dtype=np.int64)
            self._served.append(served)
            self._recal_pending -= len(served)
        req = seq.request
        req.unfinished -= 1
        if req.unfinished == 0:
            self.requests_finished += 1
        if self.metrics is None:
            return
        n = len(seq.generated)
        if n > 1 and seq.first_token_at is not None:
            self.metrics.tpot.observe((now - seq.first_token_at) / (n - 1))
        if req.unfinished == 0:
            self.metrics.request_latency.observe(now - req.arrival)

    def _drop(self, condition: Callable[[_Sequence], bool]) -> None:
        """Remove the rows matching `condition`, keeping both regions contiguous."""
        while True:
            victims = [r for r, s in enumerate(self._rows) if condition(s)]
            if not victims:
                return
            self._remove_row(victims[-1])

    def _remove_row(self, row: int) -> None:
        gone = self._rows[row]
        hole = row
        if row < self._n_decode:
            last = self._n_decode - 1
            if row != last:
                self._move_row(last, row)
            self._n_decode -= 1
            hole = last
        for r in range(hole + 1, len(self._rows)):  # shift the prefill region down by one
            self._move_row(r, r - 1)
        self._rows.pop()
        if self.kv_share is not None:
            self._pages.close(gone.kv_id)

    def _move_row(self, src: int, dst: int) -> None:
        seq = self._rows[src]
        if seq.cached and self.kv_share is None:
            self._slab.copy_row(src, dst, seq.cached)
        elif self._state_slab is not None:  # paged: KV stays in its pages, state moves
            self._state_slab.copy_row(src, dst, 0)
        self._rows[dst] = seq

    def _fail_all(self, error: BaseException) -> None:
        with self._cond:
            waiting = list(self._waiting)
            self._waiting.clear()
        failed = {s.request for s in (*self._rows, *self._preempted)} | set(waiting)
        for req in failed:
            req._post(error)
        if self.kv_share is not None:
            for seq in self._rows:
                self._pages.close(seq.kv_id)
        self._rows.clear()
        self._preempted.clear()
        self._n_decode = 0


def _scores_prompt(seq: _Sequence) -> bool:
    """Whether this prefill scores the prompt (echo): not when it recomputes."""
    return seq.spec.prompt_logprobs is not None and seq.resume is None


def _token_logprob(dist: torch.Tensor, token: int, top_n: int) -> TokenLogprob:
    """The token's log-probability under `dist` (logits [V], -inf for excluded tokens) and
    the `top_n` most likely tokens (excluded ones are never listed)."""
    lp = torch.log_softmax(dist.float(), dim=-1)
    top: tuple[tuple[int, float], ...] = ()
    if top_n:
        values, idx = lp.topk(min(top_n, lp.shape[-1]))
        top = tuple(
            (i, v) for i, v in zip(idx.tolist(), values.tolist(), strict=True) if v > -math.inf
        )
    return TokenLogprob(token, float(lp[token]), top)
