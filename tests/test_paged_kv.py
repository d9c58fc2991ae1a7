"""The paged KV cache gives the contiguous cache's logits: prefill and many decode steps,
rows of different lengths, rows leaving and joining, pages in any order, and prefix pages
shared between sequences (on the CPU; on the GPU too when one is present)."""

from __future__ import annotations

import dynaexq
import pytest
import torch
from dynaexq import DeviceBudget, KvPagePool
from dynaexq.model.paged_kv import PagedKVCache, kv_bytes_per_token
from dynaexq.model.qwen3_moe import KVCache
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

CAPACITY = 96


@pytest.fixture(scope="module")
def engine():
    return dynaexq.load(dtype="float32", device="cpu")


def _prompt(seed: int, n: int, vocab: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, vocab, (n,), generator=g).tolist()


def _prefill_args(prompts: list[list[int]], starts: list[int]):
    """ids, positions, token mask and last index of a padded prefill of prompts[r][starts[r]:]."""
    chunks = [p[s:] for p, s in zip(prompts, starts, strict=True)]
    longest = max(len(c) for c in chunks)
    ids = torch.zeros(len(chunks), longest, dtype=torch.long)
    for r, c in enumerate(chunks):
        ids[r, : len(c)] = torch.tensor(c)
    offsets = torch.arange(longest).unsqueeze(0)
    lengths = torch.tensor([len(c) for c in chunks])
    positions = torch.tensor(starts).unsqueeze(1) + offsets
    mask = offsets < lengths.unsqueeze(1)
    return ids, positions, mask, lengths - 1


class PagedRows:
    """Sequences on a page pool + paged cache, in the order the batch rows are given."""

    def __init__(self, engine, page_tokens: int, pages: int = 64) -> None:
        cfg = engine.config
        self.cache = PagedKVCache.allocate(cfg, pages, page_tokens, torch.float32, "cpu")
        page_bytes = PagedKVCache.page_bytes(cfg, page_tokens, 4)
        self.budget = DeviceBudget(page_bytes * pages)
        self.pool = KvPagePool(page_tokens, page_bytes, pages, self.budget)

    def view(self, seqs: list[int]):
        return self.cache.view([self.pool.block_table(s) for s in seqs])


def test_paged_equals_contiguous_through_leave_and_join(engine) -> None:
    model, vocab = engine.model, engine.config.vocab_size
    prompts = [_prompt(i, n, vocab) for i, n in enumerate([5, 19, 33, 11])]
    slab = model.allocate_cache(4, CAPACITY, torch.float32, "cpu")
    paged = PagedRows(engine, page_tokens=8)
    pool = paged.pool
    for s in range(3):
        pool.open(s)
    # Reserve the prompts' pages interleaved, so no row's pages are contiguous.
    for tokens in range(8, 41, 8):
        for s in range(3):
            pool.reserve(s, min(tokens, len(prompts[s])))
    assert pool.block_table(2) == [2, 4, 6, 7, 8]

    def step(ids, positions, rows, seqs, mask=None, last=None):
        a = model(ids, positions, slab.rows(*rows), mask, logits_index=last)
        b = model(ids, positions, paged.view(seqs), mask, logits_index=last)
        assert torch.equal(a, b), (a - b).abs().max()
        return a[:, -1 if last is None else 0]

    def decode(seqs: list[int], lengths: dict[int, int], tokens: dict[int, int], n: int):
        for _ in range(n):
            for s in seqs:
                pool.reserve(s, lengths[s] + 1)
            ids = torch.tensor([[tokens[s]] for s in seqs])
            pos = torch.tensor([[lengths[s]] for s in seqs])
            logits = step(ids, pos, (0, len(seqs)), seqs)
            for s, t in zip(seqs, logits.argmax(-1).tolist(), strict=True):
                tokens[s] = t
                lengths[s] += 1

    ids, positions, mask, last = _prefill_args(prompts[:3], [0, 0, 0])
    first = step(ids, positions, (0, 3), [0, 1, 2], mask, last)
    tokens = dict(enumerate(first.argmax(-1).tolist()))
    lengths = {s: len(prompts[s]) for s in range(3)}
    decode([0, 1, 2], lengths, tokens, 6)
    # Sequence 1 leaves: the slab compacts (row 2 -> row 1), its pages go back.
    slab.copy_row(2, 1, lengths[2])
    assert pool.close(1) > 0
    del lengths[1], tokens[1]
    decode([0, 2], lengths, tokens, 6)
    # Sequence 3 joins in slab row 2 and takes the freed pages.
    pool.open(3)
    pool.reserve(3, len(prompts[3]))
    ids, positions, mask, last = _prefill_args([prompts[3]], [0])
    tokens[3] = int(step(ids, positions, (2, 3), [3], mask, last).argmax(-1))
    lengths[3] = len(prompts[3])
    decode([0, 2, 3], lengths, tokens, 12)
    assert lengths == {0: 29, 2: 57, 3: 23}


def test_prefix_pages_are_shared_and_give_the_same_tokens(engine) -> None:
    model, vocab = engine.model, engine.config.vocab_size
    system = _prompt(7, 24, vocab)
    prompts = [system + _prompt(8, 5, vocab), system + _prompt(9, 9, vocab)]
    paged = PagedRows(engine, page_tokens=8)
    pool = paged.pool
    # Sequence 0 computes the whole prompt and publishes its full pages.
    pool.open(0)
    pool.reserve(0, len(prompts[0]))
    ids, positions, mask, last = _prefill_args([prompts[0]], [0])
    model(ids, positions, paged.view([0]), mask, logits_index=last)
    assert pool.publish(0, prompts[0]) == 3
    # Sequence 1 shares the three system pages and computes only its own tokens.
    pool.open(1)
    shared = pool.share_prefix(1, prompts[1])
    assert shared == 24 and pool.block_table(1) == pool.block_table(0)[:3]
    pool.reserve(1, len(prompts[1]))
    kv_before = paged.budget.snapshot()["kv_bytes"]
    ids, positions, mask, last = _prefill_args([prompts[1]], [shared])
    got = model(ids, positions, paged.view([1]), mask, logits_index=last)[:, 0]
    # Against the contiguous cache computing all of prompt 1.
    slab = KVCache.allocate(engine.config, 1, CAPACITY, torch.float32, "cpu")
    ids, positions, mask, last = _prefill_args([prompts[1]], [0])
    want = model(ids, positions, slab, mask, logits_index=last)[:, 0]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    tok_paged, tok_slab = int(got.argmax()), int(want.argmax())
    assert tok_paged == tok_slab
    n = len(prompts[1])
    for step in range(10):
        pool.reserve(1, n + step + 1)
        pos = torch.tensor([[n + step]])
        got = model(torch.tensor([[tok_paged]]), pos, paged.view([1]))[:, 0]
        want = model(torch.tensor([[tok_slab]]), pos, slab)[:, 0]
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        tok_paged, tok_slab = int(got.argmax()), int(want.argmax())
        assert tok_paged == tok_slab
    # The shared pages were counted once.
    page_bytes = pool.page_bytes
    assert kv_before == page_bytes * (pool.pages_for(len(prompts[0])) + 2)


@settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    page_tokens=st.sampled_from([1, 3, 4, 16]),
    lengths=st.lists(st.integers(1, 40), min_size=1, max_size=4),
    order=st.randoms(use_true_random=False),
    steps=st.integers(1, 6),
)
def test_any_page_order_gives_the_contiguous_logits(engine, page_tokens, lengths, order, steps):
    model, vocab = engine.model, engine.config.vocab_size
    prompts = [_prompt(100 + i, n, vocab) for i, n in enumerate(lengths)]
    paged = PagedRows(engine, page_tokens, pages=len(lengths) * (-(-(40 + steps) // page_tokens)))
    pool = paged.pool
    seqs = list(range(len(prompts)))
    for s in seqs:
        pool.open(s)
    # Grow the sequences one page at a time in a random interleaving.
    goals = {s: len(prompts[s]) + steps for s in seqs}
    while any(pool.tokens(s) < goals[s] for s in seqs):
        s = order.choice([s for s in seqs if pool.tokens(s) < goals[s]])
        pool.reserve(s, min(goals[s], pool.tokens(s) + page_tokens))
    slab = KVCache.allocate(engine.config, len(prompts), 40 + steps, torch.float32, "cpu")
    ids, positions, mask, last = _prefill_args(prompts, [0] * len(prompts))
    a = model(ids, positions, slab, mask, logits_index=last)[:, 0]
    b = model(ids, positions, paged.view(seqs), mask, logits_index=last)[:, 0]
    assert torch.equal(a, b)
    pos = torch.tensor([[n] for n in lengths])
    for _ in range(steps):
        nxt = a.argmax(-1, keepdim=True)
        a = model(nxt, pos, slab)[:, 0]
        b = model(nxt, pos, paged.view(seqs))[:, 0]
        assert torch.equal(a, b)
        pos = pos + 1


def test_bad_tables_and_sizes_are_refused(engine) -> None:
    cfg = engine.config
    with pytest.raises(ValueError, match="pages >= 1"):
        PagedKVCache.allocate(cfg, 0, 16, torch.float32, "cpu")
    cache = PagedKVCache.allocate(cfg, 4, 16, torch.float32, "cpu")
    with pytest.raises(ValueError, match=r"not the scratch page 4"):
        cache.view([[4]])
    with pytest.raises(ValueError, match=r"page ids must be in \[0, 5\)"):
        cache.view([[5]])
    assert cache.scratch_page == 4 and cache.pages == 4
    assert PagedKVCache.page_bytes(cfg, 16, 4) == 16 * kv_bytes_per_token(cfg, 4)
    assert cache.nbytes == 5 * PagedKVCache.page_bytes(cfg, 16, 4)


def test_flex_attention_over_pages_equals_gather_on_the_cpu(engine) -> None:
    """FlexAttention reads the arena in place under the inverse-block-table mask (eager on
    the CPU): the same logits as gather + SDPA and as the contiguous cache, for prefill
    of rows of different lengths and decode steps, pages in scattered order."""
    model, vocab = engine.model, engine.config.vocab_size
    prompts = [_prompt(40 + i, n, vocab) for i, n in enumerate([7, 30, 18])]
    cache = PagedKVCache.allocate(engine.config, 24, 8, torch.float32, "cpu")
    assert cache.backend == "gather"
    # Rows own interleaved, reversed pages: nothing contiguous.
    tables = [[20 - 3 * i - r for i in range(6)] for r in range(3)]
    slab = KVCache.allocate(engine.config, 3, 48, torch.float32, "cpu")
    ids, positions, mask, last = _prefill_args(prompts, [0, 0, 0])
    a = model(ids, positions, slab, mask, logits_index=last)[:, 0]
    b = model(ids, positions, cache.view(tables, backend="flex"), mask, logits_index=last)[:, 0]
    g = model(ids, positions, cache.view(tables), mask, logits_index=last)[:, 0]
    torch.testing.assert_close(b, g, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    pos = torch.tensor([[len(p)] for p in prompts])
    view = cache.view(tables, backend="flex")  # one view for every step: one mask each
    for _ in range(4):
        nxt = a.argmax(-1, keepdim=True)
        a = model(nxt, pos, slab)[:, 0]
        b = model(nxt, pos, view)[:, 0]
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        assert torch.equal(a.argmax(-1), b.argmax(-1))
        pos = pos + 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_paged_equals_contiguous_on_the_gpu() -> None:
    """On CUDA the paged cache attends through compiled FlexAttention by default."""
    engine = dynaexq.load(dtype="float32", device="cuda")
    model, vocab = engine.model, engine.config.vocab_size
    prompts = [_prompt(i, n, vocab) for i, n in enumerate([7, 30, 18])]
    cache = PagedKVCache.allocate(engine.config, 32, 16, torch.float32, "cuda")
    assert cache.backend == "flex" and cache.view([[0]]).fused_attention
    tables = [[3 * r + i for i in range(3)] for r in range(3)]
    slab = KVCache.allocate(engine.config, 3, 48, torch.float32, "cuda")
    ids, positions, mask, last = (t.cuda() for t in _prefill_args(prompts, [0, 0, 0]))
    a = model(ids, positions, slab, mask, logits_index=last)[:, 0]
    b = model(ids, positions, cache.view(tables), mask, logits_index=last)[:, 0]
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    pos = torch.tensor([[len(p)] for p in prompts], device="cuda")
    for _ in range(8):
        nxt = a.argmax(-1, keepdim=True)
        a, b = model(nxt, pos, slab)[:, 0], model(nxt, pos, cache.view(tables))[:, 0]
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        pos = pos + 1
