"""The scheduler on the paged KV cache: admission by pages, prefix pages shared between
requests, preemption of the newest sequence when pages run out (recomputed later, never
failed), and a budget shared with the precision runtime, which lends top-tier expert bytes
to the KV pages under load and takes them back when the load passes."""

from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("transformers")
pytestmark = pytest.mark.timeout(600)

import dynaexq  # noqa: E402
from dynaexq.model.testing import make_hf_model, save_checkpoint, train_tiny_tokenizer  # noqa: E402
from dynaexq.runtime.kv_share import KvShare  # noqa: E402
from dynaexq.serve.metrics import ServerMetrics  # noqa: E402
from dynaexq.serve.scheduler import GenerationRequest, Scheduler, SequenceSpec  # noqa: E402
from dynaexq.tokenizer import Tokenizer  # noqa: E402

TEXTS = [
    "def add(a, b):\n    return a + b\n",
    "The quick brown fox jumps over the lazy dog. ",
    "int main(void) { return 0; }\n",
    "Mixture-of-experts models route each token to a few experts. ",
] * 20
PROMPTS = [
    "The quick",
    "def add(a, b):\n    return",
    "M",
    "int main(void) { return 0; }\nint main(void) {",
    "experts route",
    "a + b",
]


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    path = tmp_path_factory.mktemp("kv_model")
    train_tiny_tokenizer(path, TEXTS, vocab_size=200)
    save_checkpoint(make_hf_model(seed=3, vocab_size=Tokenizer(path).vocab_size), path)
    return dynaexq.load(path, dtype="float32", device="cpu")


def spec(engine, prompt: str, max_new: int) -> SequenceSpec:
    return SequenceSpec(tuple(engine.encode(prompt)), max_new)


async def drain(req: GenerationRequest) -> list[int]:
    ids: list[int] = []
    while True:
        ev = await asyncio.wait_for(req.events.get(), 120)
        assert not isinstance(ev, BaseException), ev
        ids.extend(ev.token_ids)
        if ev.finish_reason is not None:
            return ids


def run_with(engine, body, **kw):
    async def main():
        sched = Scheduler(engine, metrics=ServerMetrics(), **kw)
        sched.start()
        try:
            return sched, await body(sched)
        finally:
            sched.stop(drain=False, timeout=30)

    return asyncio.run(main())


def expected(engine, prompt: str, max_new: int) -> list[int]:
    return engine.generate(prompt, max_new_tokens=max_new, ignore_eos=True).token_ids


def test_page_pressure_preempts_and_recomputes_without_changing_outputs(engine) -> None:
    """64 tokens of KV for six requests of 20-49 tokens each: most of them cannot run
    together, the newest are preempted and recomputed, and every greedy output is still
    exactly what engine.generate gives for the prompt alone."""
    lengths = [30, 24, 36, 18, 28, 33]

    async def body(sched):
        reqs = [sched.submit([spec(engine, p, n)]) for p, n in zip(PROMPTS, lengths, strict=True)]
        return [await drain(r) for r in reqs]

    share = KvShare(min_kv_tokens=64, max_kv_tokens=64, page_tokens=4)
    sched, got = run_with(engine, body, max_batch=6, max_context=96, kv_share=share)
    for p, n, ids in zip(PROMPTS, lengths, got, strict=True):
        assert ids == expected(engine, p, n), p
    stats = sched.kv_stats()
    assert stats["preemptions"] > 0, stats
    assert stats["pages_used"] == 0 and stats["kv_bytes"] == 0, stats
    metrics = sched.metrics.render().decode()
    assert "dynaexq_kv_preemptions_total" in metrics


def test_shared_prompt_prefix_pages_are_reused(engine) -> None:
    system = "int main(void) { return 0; }\n" * 3
    prompts = [system + "The quick", system + "a + b", system + "experts route"]

    async def body(sched):
        first = sched.submit([SequenceSpec(tuple(engine.encode(prompts[0])), 40, stream_text=True)])
        # Once the first prompt is decoding, its pages are published: the others share them.
        ev = await asyncio.wait_for(first.events.get(), 120)
        assert not isinstance(ev, BaseException), ev
        rest = [sched.submit([spec(engine, p, 8)]) for p in prompts[1:]]
        out = [ev.token_ids + await drain(first)]
        return out + [await drain(r) for r in rest]

    share = KvShare(min_kv_tokens=512, max_kv_tokens=512, page_tokens=4)
    sched, got = run_with(engine, body, max_batch=4, max_context=192, kv_share=share)
    for p, n, ids in zip(prompts, [40, 8, 8], got, strict=True):
        want = expected(engine, p, n)
        # Shared pages were computed in another batch: equal up to float rounding, so
        # compare the tokens, which a rounding-level difference does not flip here.
        assert ids == want, p
    assert sched.kv_stats()["prefix_hit_pages"] > 0


def test_finished_prompts_pages_are_reused_later_and_evicted_under_pressure(engine) -> None:
    """A finished request's full prompt pages stay cached (no budget held, counted free):
    the same prompt later takes them instead of computing them, with engine.generate's
    greedy output; requests that need the pages evict them, oldest chain tails first."""
    prompt = PROMPTS[3]  # 45 tokens: 11 full pages of 4
    share = KvShare(min_kv_tokens=64, max_kv_tokens=64, page_tokens=4)

    async def idle(sched):
        """The stats once the finished request's sequence has left (just after its
        last event)."""
        for _ in range(500):
            if sched.running == 0:
                break
            await asyncio.sleep(0.01)
        return sched.kv_stats()

    async def body(sched):
        first = await drain(sched.submit([spec(engine, prompt, 8)]))
        after_first = await idle(sched)
        second = await drain(sched.submit([spec(engine, prompt, 8)]))
        after_second = await idle(sched)
        # 14 pages for a different prompt: the 5 free ones, then 9 evicted.
        other = await drain(sched.submit([spec(engine, PROMPTS[1], 30)]))
        return first, second, other, after_first, after_second, await idle(sched)

    sched, got = run_with(engine, body, max_batch=2, max_context=96, kv_share=share)
    first, second, other, after_first, after_second, end = got
    assert first == second == expected(engine, prompt, 8)
    assert other == expected(engine, PROMPTS[1], 30)
    assert after_first["pages_used"] == 0 and after_first["pages_cached"] == 11
    assert after_first["pages_free"] == 16 and after_first["kv_bytes"] == 0
    assert after_second["prefix_hit_pages"] - after_first["prefix_hit_pages"] == 11
    assert end["pages_evicted"] >= 9 and end["pages_used"] == 0
    assert sched.preemptions == 0


def test_requests_larger_than_the_kv_bounds_are_refused(engine) -> None:
    share = KvShare(min_kv_tokens=16, max_kv_tokens=32, page_tokens=4)

    async def body(sched):
        with pytest.raises(ValueError, match="max-kv-tokens"):
            sched.submit([spec(engine, PROMPTS[0], 40)])
        return None

    run_with(engine, body, max_batch=2, max_context=96, kv_share=share)
    with pytest.raises(ValueError, match="max_kv_tokens"):
        KvShare(min_kv_tokens=64, max_kv_tokens=32)


def _dynamic_engine(tmp_path_factory, share: KvShare, hot_per_layer: int):
    """The tiny model under the dynamic policy (int2 / bf16) on a budget shared with the KV
    pages: every expert at int2, `hot_per_layer` of each layer at bf16, the staging slots,
    and the KV floor."""
    import numpy as np
    from dynaexq.checkpoint import Checkpoint
    from dynaexq.runtime.budget import fixed_memory
    from dynaexq.runtime.load import load_with_policy
    from dynaexq.runtime.policy import Policy
    from dynaexq.runtime.store import TierStore, tiered_checkpoint_for

    path = tmp_path_factory.mktemp("kv_dynamic_model")
    train_tiny_tokenizer(path, TEXTS, vocab_size=200)
    save_checkpoint(make_hf_model(seed=3, vocab_size=Tokenizer(path).vocab_size), path)
    cache = tmp_path_factory.mktemp("kv_tiered")
    tiers = ("int2", "bf16")
    store = TierStore.from_tiered(tiered_checkpoint_for(path, tiers, cache_dir=cache))
    config = Checkpoint(path).config
    fixed = fixed_memory(config, dtype_bytes=4, batch=4, context=64, chunk=16)
    floor = share.floor_bytes(config, 4)
    lo, hi = store.slot_bytes
    k = Policy("dynamic").controller.in_flight
    layers, experts = len(store.layers), store.experts
    experts_bytes = layers * (experts * lo + hot_per_layer * (hi - lo)) + k * (lo + hi)
    scratch = share.page_bytes(config, 4)  # the paged cache's scratch page
    budget = fixed.total - fixed.kv_cache + floor + scratch + experts_bytes
    calibration = [np.random.default_rng(9).integers(0, 128, size=1024)]
    engine, dep = load_with_policy(
        path,
        policy="dynamic",
        budget=budget,
        tiers=tiers,
        calibration=calibration,
        batch=4,
        context=64,
        chunk=16,
        progress=False,
        cache_dir=cache,
        lockstep=False,
        kv_share=share,
    )
    assert dep.plan.per_layer == (experts - hot_per_layer, hot_per_layer)
    engine.deployment = dep  # type: ignore[attr-defined]
    return engine, hi - lo


def test_long_requests_borrow_expert_bytes_and_give_them_back(tmp_path_factory) -> None:
    """Short requests run with the KV floor; long ones arrive: the scheduler asks the
    runtime for bytes, hot experts are demoted and their bytes become pages (only once the
    demotions are published and the old blocks reclaimed), nothing fails; when the load has
    passed the bytes go back and the controller promotes experts again."""
    # A lent bf16 slot (4608 B) holds one 4-token page beside its int2 guest (1536 B): the
    # 12 top-tier slots add 48 tokens to the floor's 64, room for the longest request.
    share = KvShare(min_kv_tokens=64, max_kv_tokens=400, page_tokens=4)
    engine, delta = _dynamic_engine(tmp_path_factory, share, hot_per_layer=6)
    runtime, budget = engine.precision, engine.kv_budget
    start = budget.snapshot()
    # At rest the pages may use their floor only: the rest holds experts and staging.
    assert start["kv_headroom"] == share.floor_bytes(engine.config, 4), start
    seen = {"lent": 0, "kv": 0, "experts": start["expert_bytes"]}

    async def watch(stop: asyncio.Event) -> None:
        while not stop.is_set():
            seen["lent"] = max(seen["lent"], runtime.kv_lent)
            snap = budget.snapshot()
            seen["kv"] = max(seen["kv"], snap["kv_bytes"])
            seen["experts"] = min(seen["experts"], snap["expert_bytes"])
            await asyncio.sleep(0.001)

    def requests(sched, prompts, n):
        return [sched.submit([SequenceSpec(tuple(engine.encode(p)), n)]) for p in prompts]

    async def body(sched):
        stop = asyncio.Event()
        watcher = asyncio.create_task(watch(stop))
        short = requests(sched, PROMPTS[:2], 12)
        long = requests(sched, PROMPTS[2:], 60)
        done = [await drain(r) for r in short + long]
        # The load has passed: short requests one at a time (within the floor) give the
        # controller steps to take the slots back and promote.
        for _ in range(6):
            done += [await drain(r) for r in requests(sched, PROMPTS[:1], 24)]
        stop.set()
        await watcher
        return done

    sched, done = run_with(
        engine,
        body,
        max_batch=6,
        max_context=160,
        kv_share=share,
        kv_budget=budget,
        kv_lender=runtime,
    )
    # Every request ran to its length (none failed, the preempted ones were recomputed).
    assert [len(ids) for ids in done] == [12, 12] + [60] * 4 + [24] * 6
    assert sched.preemptions > 0
    end = budget.snapshot()
    # The split moved to KV: pages held more than the floor and the experts' headroom
    # allowed, paid for by lent top-tier slots.
    assert seen["lent"] > 0 and end["moved_to_kv_bytes"] >= delta, (seen, end)
    assert seen["kv"] > start["kv_headroom"], (seen, start)
    # ... and back: nothing is lent any more and the experts took bytes the pages freed.
    assert runtime.kv_lent == 0, runtime.kv_lent
    assert end["moved_to_experts_bytes"] > 0, end
    assert end["expert_bytes"] > seen["experts"], (seen, end)
    assert end["charged_bytes"] <= end["limit"] and end["high_water_bytes"] <= end["limit"]
    assert sched.kv_stats()["pages_used"] == 0


def test_lent_expert_slots_physically_become_the_pages(tmp_path_factory) -> None:
    """One arena: the expert pool's allocation is the only memory for experts and KV, it
    fits the budget, and the pages handed out after lending lie inside the lent top-tier
    slots' bytes, never in a live expert block. Writing keys and values there leaves
    every expert's bytes as they were and gives the contiguous cache's logits; when the
    pages are free again the slots go back to the experts."""
    import time

    import torch
    from dynaexq import KvPagePool
    from dynaexq.model.paged_kv import PagedKVCache
    from dynaexq.model.qwen3_moe import KVCache

    share = KvShare(min_kv_tokens=16, max_kv_tokens=400, page_tokens=4)
    engine, _ = _dynamic_engine(tmp_path_factory, share, hot_per_layer=6)
    runtime, budget, dep = engine.precision, engine.kv_budget, engine.deployment
    pool, arena = runtime.pool, runtime.kv_arena
    g = arena.geometry
    # Experts + KV are reserved once, within what the budget leaves after the fixed state.
    room = dep.plan.budget - (dep.fixed.total - dep.fixed.kv_cache)
    assert pool.total_bytes <= room, (pool.total_bytes, room)
    pages = KvPagePool(g.page_tokens, g.page_bytes, arena.pages, budget, online=(0, g.floor_pages))
    cache = PagedKVCache.over_arena(
        engine.config,
        arena.buffer(),
        g.page_tokens,
        torch.float32,
        scratch_page=arena.scratch_page,
        page_start=arena.page_start,
        owner=pool,
    )
    assert cache.buffer.data_ptr() == pool.arena_address and cache.nbytes == pool.total_bytes
    runtime.attach_kv_pages(pages)

    def expert_blocks():
        out = {}
        for li in range(runtime.num_layers):
            for e in range(runtime.experts):
                b = runtime.table.published(li, e).block
                out[(li, e)] = (pool.address(b), b.nbytes, pool.read(b))
        return out

    # Lend two slots per layer and wait for their demotions to land and free the slots.
    assert runtime.lend_to_kv(4 * g.page_bytes) > 0
    deadline = time.monotonic() + 60
    while runtime.lend_in_flight and time.monotonic() < deadline:
        runtime.settle()
        time.sleep(0.005)
    top = arena.host
    lent = pool.lent(top)
    assert len(lent) == 4 and pages.stats()["online"] == g.floor_pages + 4 * arena.pages_per_slot()
    # A sequence longer than the floor: its pages past the floor come from lent slots.
    prompt = [
        int(t) for t in torch.randint(1, 100, (20,), generator=torch.Generator().manual_seed(5))
    ]
    pages.open(0)
    pages.reserve(0, len(prompt) + 8)
    table = pages.block_table(0)
    beyond = [p for p in table if p > arena.scratch_page]
    assert len(beyond) == len(table) - g.floor_pages > 0
    ranges = [pool.lent_range(top, j) for j in lent]
    base = pool.arena_address
    before = expert_blocks()
    for p in beyond:
        lo, hi = cache.page_address(p), cache.page_address(p) + g.page_bytes
        assert any(base + o <= lo and hi <= base + o + n for o, n in ranges), p
        for addr, nbytes, _ in before.values():
            assert hi <= addr or addr + nbytes <= lo, (p, addr)
    # Keys and values written into those pages: the experts' bytes are untouched and the
    # logits are the contiguous cache's.
    ids = torch.tensor([prompt])
    pos = torch.arange(len(prompt)).unsqueeze(0)
    slab = KVCache.allocate(engine.config, 1, 64, torch.float32, "cpu")
    model = engine.model
    want = model(ids, pos, slab)[:, -1]
    got = model(ids, pos, cache.view([table]))[:, -1]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for step in range(8):
        nxt = want.argmax(-1, keepdim=True)
        p = torch.tensor([[len(prompt) + step]])
        want, got = model(nxt, p, slab)[:, -1], model(nxt, p, cache.view([table]))[:, -1]
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    after = expert_blocks()
    assert all(after[k][2] == before[k][2] for k in before), "a KV write reached an expert"
    # Held pages keep their slots lent (a slot whose page is free may come back at once);
    # once all are free, every slot comes back to the experts.
    held = {j for j in lent if set(range(*arena.slot_pages(j))) & set(table)}
    runtime.reclaim_from_kv()
    assert held and held <= set(pool.lent(top))
    pages.close(0)
    deadline = time.monotonic() + 60
    while pool.lent(top) and time.monotonic() < deadline:
        runtime.reclaim_from_kv()
        runtime.settle()
        time.sleep(0.005)
    assert pool.lent(top) == [] and runtime.kv_lent == 0
    assert pages.stats()["online"] == g.floor_pages
    snap = budget.snapshot()
    assert snap["charged_bytes"] <= snap["limit"] and snap["kv_bytes"] == 0


def test_serve_wires_the_paged_cache_to_the_runtime_budget(tmp_path_factory) -> None:
    """`dynaexq serve --kv-cache paged` as the app builds it: the scheduler's pages come
    from the runtime's shared budget, the runtime lends to them, /metrics exports them."""
    from dynaexq.cli import main
    from dynaexq.serve.app import ServerConfig, create_app
    from dynaexq.serve.runtime import RuntimeSpec, build_runtime

    path = tmp_path_factory.mktemp("kv_serve_model")
    train_tiny_tokenizer(path, TEXTS, vocab_size=200)
    save_checkpoint(make_hf_model(seed=3, vocab_size=Tokenizer(path).vocab_size), path)
    argv = ["serve", "--model", str(path), "--port", "0", "--max-kv-tokens", "64"]
    assert main(argv) == 2  # the bounds belong to the paged cache
    share = KvShare(min_kv_tokens=64, max_kv_tokens=256, page_tokens=8)
    engine, stats = build_runtime(
        RuntimeSpec(
            path,
            "dynamic",
            "50%",
            "float32",
            "cpu",
            batch=2,
            context=64,
            tiers="int2,bf16",
            calibration=tuple(TEXTS[:8]),
            kv_share=share,
        )
    )
    app = create_app(engine, stats, ServerConfig("m", max_batch=2, max_context=64, kv_share=share))
    sched = app.state.scheduler
    assert sched.paged and sched.kv_budget is engine.kv_budget
    assert sched._lender is engine.precision
    # The pages are views of the expert pool's arena: no KV memory of their own.
    pool = engine.precision.pool
    assert sched._arena.buffer.data_ptr() == pool.arena_address
    assert sched._arena.nbytes == pool.total_bytes and sched._arena.owner is pool
    snap = engine.kv_budget.snapshot()
    assert snap["kv_floor"] == share.floor_bytes(engine.config, 4) and snap["expert_bytes"] > 0
    body = sched.metrics.render().decode()
    for name in ("dynaexq_kv_pages{", "dynaexq_budget_bytes{", "dynaexq_budget_moved_bytes"):
        assert name in body, name


def test_a_request_the_kv_share_can_never_hold_fails_clearly(engine) -> None:
    """Nothing runs, no lender can free bytes and the budget leaves the pages less than the
    request needs: it gets an error instead of waiting forever; the next one still runs."""
    from dynaexq import DeviceBudget

    share = KvShare(min_kv_tokens=8, max_kv_tokens=64, page_tokens=4)
    page = share.page_bytes(engine.config, 4)
    budget = DeviceBudget(16 * page, kv_floor=2 * page, expert_floor=13 * page)

    async def body(sched):
        big = sched.submit([spec(engine, PROMPTS[0], 20)])
        ev = await asyncio.wait_for(big.events.get(), 60)
        small = sched.submit([spec(engine, PROMPTS[2], 4)])
        return ev, await drain(small)

    sched, (ev, small) = run_with(
        engine, body, max_batch=2, max_context=96, kv_share=share, kv_budget=budget
    )
    assert isinstance(ev, Exception) and "KV share" in str(ev), ev
    assert small == expected(engine, PROMPTS[2], 4)


def test_qwen3_next_pages_its_attention_layers(tmp_path_factory) -> None:
    """Qwen3-Next on the paged cache: pages for its full-attention layers, the linear
    layers' state in rows that move with the sequences; under page pressure sequences are
    preempted and recomputed (state rebuilt from position 0), and every greedy output is
    what engine.generate gives for the prompt alone."""
    path = tmp_path_factory.mktemp("kv_next_model")
    train_tiny_tokenizer(path, TEXTS, vocab_size=200)
    vocab = Tokenizer(path).vocab_size
    save_checkpoint(make_hf_model(seed=21, architecture="qwen3_next", vocab_size=vocab), path)
    engine = dynaexq.load(path, dtype="float32", device="cpu")
    # Early sequences finish first, so later rows (and their state) move down.
    lengths = [6, 20, 10, 2, 30, 40]

    async def body(sched):
        reqs = [sched.submit([spec(engine, p, n)]) for p, n in zip(PROMPTS, lengths, strict=True)]
        return [await drain(r) for r in reqs]

    share = KvShare(min_kv_tokens=48, max_kv_tokens=48, page_tokens=4)
    sched, got = run_with(
        engine, body, max_batch=6, max_context=96, kv_share=share, max_prefill_tokens=8
    )
    for p, n, ids in zip(PROMPTS, lengths, got, strict=True):
        assert ids == expected(engine, p, n), p
    assert sched.kv_stats()["preemptions"] > 0
    assert sched.kv_stats()["pages_used"] == 0
    # Only the attention layer's KV is paged.
    per_token = 2 * len(engine.config.attention_layers) * engine.config.num_key_value_heads
    assert share.page_bytes(engine.config, 4) == 4 * per_token * engine.config.head_dim * 4
