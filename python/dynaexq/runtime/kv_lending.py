"""Lending expert bytes to the KV cache: the part of the precision runtime that trades
top-tier expert slots for KV pages of the shared device budget and takes them back.

`lend_to_kv` demotes the coldest top-tier experts and lowers the planner's top-tier
capacity; the bytes reach the shared budget only when the table reclaims the old blocks
(after the demotions are published and no reader holds them). `reclaim_from_kv` raises
the capacity again once the budget can hold it and promotes the hottest experts into it.
With the page geometry (`kv_pages`) the pages live in the pool's arena
(`kv_share.SharedKvArena`): a reclaimed top-tier slot is lent to the pool's pages
(`_lend_freed_slots`), and taken back only once its pages and its hosted lowest-tier slot
are free (`reclaim_from_kv` promotes the experts held there first).
"""

from __future__ import annotations

import numpy as np

from dynaexq._core import ExpertPool, KvPagePool
from dynaexq.runtime.kv_share import SharedKvArena


class KvLending:
    """Mixin of `PrecisionRuntime` (runtime/precision.py): its pool, table, plan, mover,
    transitions in flight (`busy`) and shared budget are the state these methods read."""

    def _kv_pool_layout(
        self, slot_bytes: dict[str, int], slots: dict[str, int], classes: list[list[str]]
    ) -> dict[str, object]:
        """The pool's shape on a budget shared with the KV pages (edits the class dicts;
        returns the pool's extra arguments). With the pages' geometry the arena holds them
        too: a head for the floor and scratch pages, and top-tier slots that can be lent,
        each hosting a lowest-tier slot (where a lending demotion's expert lives). Without
        it the sharing is counted only: room for every expert at the lowest tier."""
        if self.kv_budget is None:
            return {}
        lowest, top = f"t{self.real[0]}", f"t{self.real[-1]}"
        if lowest not in slot_bytes:
            slot_bytes[lowest] = self.plan.slot_bytes[self.real[0]]
        if self.kv_pages is None:
            slots[lowest] = self.num_layers * self.experts
        else:
            slots[lowest] = max(slots.get(lowest, 0), 1)
        if lowest not in classes[0]:
            classes[0].insert(0, lowest)
        if self.kv_pages is None:
            return {}
        lending = (top, lowest) if top != lowest else None
        return {"kv_head_bytes": self.kv_pages.head_bytes, "lending": lending}

    def _kv_arena_over(self, pool: ExpertPool, shape: dict[str, object]) -> SharedKvArena | None:
        if self.kv_pages is None or "kv_head_bytes" not in shape:
            return None
        lending = shape["lending"]
        host, guest = lending if isinstance(lending, tuple) else (None, None)
        return SharedKvArena(pool, self.kv_pages, host, guest)

    def attach_kv_pages(self, pages: KvPagePool) -> None:
        """The page pool over `kv_arena` that lent slots' pages go to (the scheduler's)."""
        self._kv_page_pool = pages
        self._lend_freed_slots()

    def _lend_freed_slots(self) -> None:
        """Lend free top-tier slots to the page pool until `_lend_target` are lent: a slot
        is free only once its demoted expert's old block was reclaimed (no reader)."""
        arena, pages = self.kv_arena, self._kv_page_pool
        if arena is None or pages is None or arena.host is None:
            return
        top = arena.host
        if len(self.pool.lent(top)) >= self._lend_target:
            return
        self.table.reclaim()
        while len(self.pool.lent(top)) < self._lend_target and self.pool.free_count(top) > 0:
            index, _, _ = self.pool.lend(top)
            pages.add_pages(*arena.slot_pages(index))
        if len(self.pool.lent(top)) < self._lend_target and not self._lend_keys:
            self._demote_over_capacity()
            if not self._lend_keys:
                # Nothing left to demote (the demotions freed staging slots, which are not
                # lendable): the rest of the intent cannot be met; reclaim returns it.
                self._lend_target = len(self.pool.lent(top))

    def _demote_over_capacity(self) -> None:
        """A lending demotion that failed (no lowest-tier slot free yet, a copy error)
        left its expert at the top tier beyond the lowered capacity: demote the coldest
        such experts again, layer by layer with the per-layer split."""
        if self.mover is None:
            return
        top = len(self.real) - 1
        current = self.table_map()
        for li, e, _, _ in self.busy.values():
            current[li, e] = 255
        cap = self._capacity()[self.real[-1]]
        scores = self._scores()
        if self.plan.per_layer is not None:
            rows = [[li] for li in range(self.num_layers)]
        else:
            rows = [list(range(self.num_layers))]
        for layers in rows:
            held = sorted(
                (float(scores[li, e]), li, e)
                for li in layers
                for e in range(self.experts)
                if current[li, e] == top
            )
            moving = sum(1 for li, _, to, _ in self.busy.values() if li in layers and to == top)
            for _, li, e in held[: max(0, len(held) + moving - cap)]:
                key = self.mover.request(li, e, 0)
                if key is not None:
                    self.busy[key] = (li, e, 0, False)
                    self._lend_keys.add(key)

    def _lend_unit(self) -> int:
        """Budget bytes one demotion from the top tier to the lowest gives back (no more
        than the pages a lent slot holds, when the pages live in the arena)."""
        unit = self.plan.slot_bytes[self.real[-1]] - self.plan.slot_bytes[self.real[0]]
        if self.kv_arena is not None:
            unit = min(unit, self.kv_arena.pages_per_slot() * self.kv_arena.geometry.page_bytes)
        return unit

    def lend_to_kv(self, nbytes: int) -> int:
        """Demote the coldest top-tier experts so that at least `nbytes` of the shared
        budget can become KV pages once their old blocks are reclaimed (demotions are
        published first; readers finish on the old blocks). Returns the bytes whose
        release has begun: 0 while an earlier lending is still landing, or when nothing
        more can be lent (no shared budget, no mover, or no top-tier expert left that is
        not already moving)."""
        unit = self._lend_unit()
        if self.kv_budget is None or self.mover is None or nbytes <= 0 or unit <= 0:
            return 0
        if self.lend_in_flight:  # the bytes asked for last time have not arrived yet
            return 0
        want = -(-nbytes // unit)
        top = self.real[-1]
        if self.plan.per_layer is not None:
            # The per-layer split keeps every layer's top tier the same size: lend one
            # slot of every layer at a time.
            rounds = min(-(-want // self.num_layers), self._capacity()[top])
            lent = self._request_moves(rounds, 0, 0, hottest=False, first=self._lendable())
            rounds = lent // self.num_layers
            self.kv_lent += rounds
            # Only whole rounds lower the capacity, so only they become pages (a partial
            # round's freed slots stay the experts').
            self._lend_target += rounds * self.num_layers
            self._lend_freed_slots()
            return rounds * self.num_layers * unit
        lent = self._request_moves(
            0, min(want, self._capacity()[top]), 0, hottest=False, first=self._lendable()
        )
        self.kv_lent += lent
        self._lend_target += lent
        self._lend_freed_slots()
        return lent * unit

    def _scores(self) -> np.ndarray:
        """[layers, experts] hotness: the tracker's, else the calibration prior."""
        if self.tracker is not None:
            scores = np.asarray(self.tracker.scores(), dtype=np.float32)
            return scores.reshape(self.num_layers, self.experts)
        return self.prior

    def _request_moves(
        self,
        per_layer: int,
        total: int,
        to: int,
        hottest: bool,
        first: set[tuple[int, int]] | None = None,
    ) -> int:
        """Request `to`-bound transitions of the hottest (or coldest) experts that sit at
        the other end of the tiers and are not moving: `per_layer` in every layer (per-layer
        split) or `total` over the model, the experts in `first` before the others.
        Returns the transitions requested."""
        assert self.mover is not None
        at = 0 if to == len(self.real) - 1 else len(self.real) - 1
        current = self.table_map()
        for li, e, _, _ in self.busy.values():
            current[li, e] = 255  # moving already: not a candidate
        scores = self._scores()
        order = (-scores if hottest else scores).astype(np.float64)
        for li, e in first or ():
            order[li, e] -= 1e30  # ahead of every other candidate
        if self.plan.per_layer is not None:
            ranked = [
                [int(e) for e in np.argsort(order[li], kind="stable") if current[li, e] == at]
                for li in range(self.num_layers)
            ]
            picks = [
                (li, r[k]) for k in range(per_layer) for li, r in enumerate(ranked) if k < len(r)
            ]
        else:
            flat = sorted(
                (float(order[li, e]), li, e)
                for li in range(self.num_layers)
                for e in range(self.experts)
                if current[li, e] == at
            )
            picks = [(li, e) for _, li, e in flat[:total]]
        requested = 0
        for li, e in picks:
            key = self.mover.request(li, e, to)
            if key is not None:
                self.busy[key] = (li, e, to, to > 0)
                if to == 0:
                    self._lend_keys.add(key)
                requested += 1
        return requested

    def reclaim_from_kv(self) -> int:
        """Take back lent top-tier slots that the shared budget can hold again (with room
        for one promotion's new block beside its old one) and promote the hottest
        lowest-tier experts into them at once (the transfer engine queues what exceeds its
        copies in flight). Returns the bytes of capacity taken back."""
        if self.kv_budget is None or self.kv_lent == 0:
            return 0
        group = self.num_layers if self.plan.per_layer is not None else 1
        unit = self._lend_unit() * group
        margin = self.plan.slot_bytes[self.real[-1]]
        if self.kv_arena is not None and self._kv_page_pool is not None:
            n = self._take_back_slots(group, margin)
        else:
            n = 0
            while n < self.kv_lent and self.kv_budget.fits("experts", (n + 1) * unit + margin):
                n += 1
        self.kv_lent -= n
        if n and self.mover is not None:
            self._request_moves(n, n, len(self.real) - 1, hottest=True, first=self._hosted())
        return n * unit

    def _take_back_slots(self, group: int, margin: int) -> int:
        """Take lent slots back from the page pool (pages and hosted slot free, the budget
        holding the expert it will get); returns the capacity units (`group` slots each:
        one per layer with the per-layer split) that can be planned again."""
        arena, pages = self.kv_arena, self._kv_page_pool
        assert arena is not None and pages is not None and arena.host is not None
        if self._lend_keys:  # lending still landing: let it finish first
            return 0
        top = arena.host
        # Lent in intent but not yet the pages' (their demotions did not free a slot).
        lent = self.pool.lent(top)
        spare = min(self._lend_target - len(lent), self.kv_lent * group - self._unlent)
        self._lend_target -= max(spare, 0)
        self._unlent += max(spare, 0)
        unit = self.plan.slot_bytes[self.real[-1]] - self.plan.slot_bytes[self.real[0]]
        taken = 0
        for index in reversed(lent):
            if self._unlent >= self.kv_lent * group:
                break
            a, b = arena.slot_pages(index)
            if not (pages.range_unheld(a, b) and self.pool.can_unlend(top, index)):
                continue
            if not self.kv_budget.fits("experts", (taken + 1) * unit + margin):
                break
            pages.remove_pages(a, b)
            self.pool.unlend(top, index)
            self._lend_target -= 1
            self._unlent += 1
            taken += 1
        self._free_guests(lent, taken)
        n = self._unlent // group
        self._unlent -= n * group
        return n

    def _free_guests(self, lent: list[int], taken: int) -> None:
        """Lent slots whose pages are free but whose hosted slot holds an expert cannot
        come back until it moves: promote such experts into the top-tier slots that are
        free now (taken back, their capacity not returned yet), so that the next call can
        take their hosts back. Without this every lent slot could wait on another."""
        arena, pages = self.kv_arena, self._kv_page_pool
        assert arena is not None and pages is not None and arena.host is not None
        if self.mover is None:
            return
        lowest, top = f"t{self.real[0]}", len(self.real) - 1
        regular = self.pool.region(lowest)[1] // self.pool.slot_bytes(lowest)
        room = self.pool.free_count(arena.host) - sum(1 for *_, up in self.busy.values() if up)
        if room <= 0:
            return
        waiting = {
            regular + j
            for j in lent
            if self.pool.lent_range(arena.host, j) is not None
            and pages.range_unheld(*arena.slot_pages(j))
            and not self.pool.can_unlend(arena.host, j)
        }
        moving = {(li, e) for li, e, _, _ in self.busy.values()}
        for li in range(self.num_layers):
            for e in range(self.experts):
                if room <= 0 or (li, e) in moving:
                    continue
                block = self.table.published(li, e).block
                if block.cls == lowest and block.index in waiting:
                    key = self.mover.request(li, e, top)
                    if key is not None:
                        self.busy[key] = (li, e, top, True)
                        room -= 1

    def _lendable(self) -> set[tuple[int, int]]:
        """Top-tier experts whose block is a lendable slot (not a staging one): demoting
        them frees a slot that can become pages."""
        return self._in_class(f"t{self.real[-1]}", 0) if self.kv_arena is not None else set()

    def _in_class(self, cls: str, first_index: int) -> set[tuple[int, int]]:
        """Experts whose published block is a slot of `cls` with index >= first_index."""
        out = set()
        for li in range(self.num_layers):
            for e in range(self.experts):
                block = self.table.published(li, e).block
                if block.cls == cls and block.index >= first_index:
                    out.add((li, e))
        return out

    def _hosted(self) -> set[tuple[int, int]]:
        """Experts whose published block is a lent slot's hosted lowest-tier slot (promoted
        first on reclaim, so that their slots can come back too)."""
        arena = self.kv_arena
        if arena is None or arena.host is None:
            return set()
        lowest = f"t{self.real[0]}"
        return self._in_class(lowest, self.pool.region(lowest)[1] // self.pool.slot_bytes(lowest))
