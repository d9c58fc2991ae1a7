"""Hypothesis state machine over the Python API of the pool and the expert table.

Invariants after every step: free + live = capacity per class, reserved bytes never exceed
the budget, live blocks never overlap and lie in their class region, the lowest free index
is handed out, every expert has exactly one published version (the one the model expects),
no block is reclaimed while leased or while a recorded use is outstanding, and a rollback
restores the old version.
"""

from __future__ import annotations

import pytest
from dynaexq import (
    Block,
    BlockInUse,
    DoubleFree,
    ExpertPool,
    ExpertTable,
    IllegalTransition,
    Lease,
    PoolExhausted,
    Transition,
)
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

SLOT_BYTES = {"lo": 300, "hi": 1000, "staging": 1000, "scratch": 100}
SLOTS = {"lo": 4, "hi": 1, "staging": 1, "scratch": 3}
EXPERTS = 3


class PoolMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.pool = ExpertPool(SLOT_BYTES, SLOTS, 256, budget=4096)
        self.table = ExpertTable(
            self.pool, [EXPERTS], [["lo", ["hi", "staging"]]], manual_fence=True
        )
        self.user: list[Block] = []
        self.stale: list[Block] = []
        # Model of each expert: (tier, version); in-flight transitions by ticket.
        self.published = [(0, 1)] * EXPERTS
        self.tickets: dict[int, tuple[int, int, Transition]] = {}
        self.dead: list[Transition] = []
        self.views: list[tuple[Block, memoryview]] = []
        self.leases: list[tuple[Lease, int, int]] = []
        self.used: set[int] = set()  # versions (by block offset) with a recorded use

    # --- plain pool ---------------------------------------------------------------
    @rule()
    def alloc_scratch(self) -> None:
        live = {b.index for b in self.user}
        free = [i for i in range(SLOTS["scratch"]) if i not in live]
        try:
            b = self.pool.alloc("scratch")
        except PoolExhausted:
            assert not free or self.pool.reserved_bytes + 256 > self.pool.budget
            return
        assert b.index == min(free)
        self.user.append(b)

    @precondition(lambda self: self.user)
    @rule(k=st.integers(0, 10))
    def free_scratch(self, k: int) -> None:
        b = self.user[k % len(self.user)]
        if any(v[0] == b for v in self.views):
            # A live view pins the block: freeing it would let the view write into
            # whatever reuses the slot.
            with pytest.raises(BlockInUse, match="view"):
                self.pool.free(b)
            return
        self.user.remove(b)
        self.pool.free(b)
        self.stale.append(b)

    @precondition(lambda self: self.user)
    @rule(k=st.integers(0, 10))
    def view_scratch(self, k: int) -> None:
        b = self.user[k % len(self.user)]
        self.views.append((b, self.pool.view(b)))

    @precondition(lambda self: self.views)
    @rule(k=st.integers(0, 10))
    def drop_view(self, k: int) -> None:
        _, view = self.views.pop(k % len(self.views))
        view.release()

    @precondition(lambda self: self.stale)
    @rule(k=st.integers(0, 10))
    def double_free(self, k: int) -> None:
        try:
            self.pool.free(self.stale[k % len(self.stale)])
        except DoubleFree:
            return
        raise AssertionError("double free accepted")

    # --- state machine --------------------------------------------------------------
    @rule(e=st.integers(0, EXPERTS - 1), tier=st.integers(0, 1), fail=st.booleans())
    def transition(self, e: int, tier: int, fail: bool) -> None:
        before = self.table.published(0, e)
        in_flight = any(x == e for x, _, _ in self.tickets.values())
        try:
            tr = self.table.begin(0, e, tier)
        except IllegalTransition:
            assert in_flight or self.published[e][0] == tier
            return
        except PoolExhausted:
            return
        assert not in_flight and self.published[e][0] != tier
        assert self.table.published(0, e) == before  # invisible until complete
        with pytest.raises(BlockInUse):  # the table's blocks have no writable view
            self.pool.view(tr.block)
        tr.write(bytes([(self.published[e][1] + 1) % 256]))
        self.tickets[tr.ticket] = (e, tier, tr)
        if fail:
            self.finish(tr.ticket, complete=False)

    def finish(self, ticket: int, complete: bool) -> None:
        e, tier, tr = self.tickets.pop(ticket)
        self.dead.append(tr)
        before = self.table.published(0, e)
        if complete:
            v = self.table.complete(tr)
            self.published[e] = (tier, self.published[e][1] + 1)
            assert (v.tier, v.version) == self.published[e]
        else:
            self.table.abort(tr)
            assert self.table.published(0, e) == before  # rollback keeps the old version

    @precondition(lambda self: self.tickets)
    @rule(k=st.integers(0, 10), complete=st.booleans())
    def finish_transition(self, k: int, complete: bool) -> None:
        self.finish(sorted(self.tickets)[k % len(self.tickets)], complete)

    @precondition(lambda self: self.dead)
    @rule(k=st.integers(0, 10), complete=st.booleans())
    def stale_ticket(self, k: int, complete: bool) -> None:
        tr = self.dead[k % len(self.dead)]
        with pytest.raises(IllegalTransition, match="already settled"):
            (self.table.complete if complete else self.table.abort)(tr)

    @precondition(lambda self: self.tickets)
    @rule(k=st.integers(0, 10), complete=st.booleans())
    def settle_a_description(self, k: int, complete: bool) -> None:
        # A careless caller settling a transition it did not begin (transition_of hands
        # out descriptions only): refused, and the owner's copy stays in flight.
        e, _, _ = self.tickets[sorted(self.tickets)[k % len(self.tickets)]]
        described = self.table.transition_of(0, e)
        assert described is not None and not described.owned
        with pytest.raises(IllegalTransition):
            (self.table.complete if complete else self.table.abort)(described)
        assert self.table.transition_of(0, e) is not None

    # --- leases ---------------------------------------------------------------------
    @rule(e=st.integers(0, EXPERTS - 1))
    def lease(self, e: int) -> None:
        lease = self.table.lease(0, e)
        v = lease.version
        assert (v.tier, v.version) == self.published[e]
        assert lease.view()[0] == v.version % 256 or v.version == 1
        self.leases.append((lease, e, v.version))

    @precondition(lambda self: self.leases)
    @rule(k=st.integers(0, 10))
    def release(self, k: int) -> None:
        lease, _, _ = self.leases.pop(k % len(self.leases))
        lease.release()

    @precondition(lambda self: self.leases)
    @rule(k=st.integers(0, 10))
    def record_use(self, k: int) -> None:
        lease, _, _ = self.leases[k % len(self.leases)]
        lease.record_use()
        self.used.add(lease.block.offset)

    @precondition(lambda self: self.leases)
    @rule(k=st.integers(0, 10))
    def free_leased(self, k: int) -> None:
        lease, _, _ = self.leases[k % len(self.leases)]
        try:
            self.pool.free(lease.block)
        except BlockInUse:
            return
        raise AssertionError("a leased block was freed")

    @rule()
    def signal(self) -> None:
        self.table.signal_uses()
        self.used.clear()

    @rule()
    def reclaim(self) -> None:
        leased = {lease.block.offset for lease, _, _ in self.leases}
        for b in self.table.reclaim():
            assert b.offset not in leased, "reclaimed a leased block"
            assert b.offset not in self.used, "reclaimed a block with an outstanding use"

    # --- invariants -------------------------------------------------------------------
    @invariant()
    def pool_invariants(self) -> None:
        stats = self.pool.stats()
        assert stats["reserved_bytes"] <= stats["budget"]
        for c in stats["classes"].values():
            assert c["free"] + c["live"] == c["capacity"]
        live = list(self.user) + self.table.retired()
        live += [self.table.published(0, e).block for e in range(EXPERTS)]
        for e in range(EXPERTS):
            tr = self.table.transition_of(0, e)
            if tr is not None:
                live.append(tr.block)
        assert len(live) == sum(c["live"] for c in stats["classes"].values())
        spans = []
        for b in live:
            start, size = self.pool.region(b.cls)
            assert start <= b.offset and b.offset + b.nbytes <= start + size
            spans.append((b.offset, b.offset + b.nbytes))
        spans.sort()
        for (_, end), (start, _) in zip(spans, spans[1:], strict=False):
            assert end <= start, "overlapping blocks"

    @invariant()
    def one_published_version_per_expert(self) -> None:
        for e in range(EXPERTS):
            v = self.table.published(0, e)
            assert (v.tier, v.version) == self.published[e]
            assert self.pool.is_live(v.block)

    @invariant()
    def leased_blocks_stay_live(self) -> None:
        for lease, _, version in self.leases:
            assert lease.version.version == version
            assert self.pool.is_live(lease.block)
            assert self.pool.readers(lease.block) >= 1

    def teardown(self) -> None:
        for lease, _, _ in self.leases:
            lease.release()
        for _, view in self.views:
            view.release()


PoolMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
TestPoolMachine = PoolMachine.TestCase
