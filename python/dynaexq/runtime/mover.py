"""Moving experts between tiers: requests to the Rust transfer engine, landed between steps."""

from __future__ import annotations

from dynaexq._core import ExpertTable
from dynaexq.runtime.store import TierStore


class TransferMover:
    """Transitions through the Rust transfer engine (CPU backend: a worker thread copies
    from the host store into the reserved block; CUDA backend: async copies on the
    migration stream; the engine publishes on `poll`).

    The engine runs without its driver thread, so versions are published only when the
    runtime calls `land`, between steps. Serving (`lockstep=False`) submits at once and
    publishes whatever has finished by the next boundary; nothing ever waits. Evaluation
    (`lockstep=True`) must not depend on thread timing: a transition requested at the
    boundary after step s is submitted at the next boundary, which waits for its copy and
    publishes it, so it is visible from step s+2 on, on any machine.
    """

    def __init__(
        self,
        table: ExpertTable,
        store: TierStore,
        real: list[int],
        in_flight: int,
        lockstep: bool,
        device: int | None = None,
    ) -> None:
        from dynaexq._core import TransferEngine

        # Memory-mapped tiered checkpoint + staging ring, or every tier resident (store.py);
        # page-locked for a CUDA device (`device`), whose migration stream copies from it.
        host = store.host_store(real, min_slots=in_flight, device=device)
        self.host = host
        self.engine = TransferEngine(
            table,
            host,
            max_in_flight=in_flight,
            queue_capacity=1024,
            backend="cpu" if device is None else "cuda",
            workers=1,
            driver=False,
        )
        self.lockstep = lockstep
        self.requested: list[tuple[int, int, int, int]] = []  # (key, layer, expert, tier)
        self.key_of: dict[int, int] = {}  # transfer id -> request key
        self.next_key = 0

    def request(self, layer_pos: int, expert: int, table_tier: int) -> int | None:
        """Ask for a transition; returns its key, or None if the engine refused it now."""
        key = self.next_key
        self.next_key += 1
        if self.lockstep:
            self.requested.append((key, layer_pos, expert, table_tier))
            return key
        return key if self._submit(key, layer_pos, expert, table_tier) else None

    def _submit(self, key: int, layer_pos: int, expert: int, table_tier: int) -> bool:
        from dynaexq._core import PoolError

        try:
            tid = self.engine.submit(layer_pos, expert, table_tier)
        except PoolError:  # queue full or already moving: re-planned later
            return False
        self.key_of[tid] = key
        return True

    def land(self) -> list[tuple[int, str, int]]:
        """Publish what has finished: [(key, status, table tier)]."""
        refused: list[tuple[int, str, int]] = []
        if self.lockstep:
            for key, layer, expert, tier in self.requested:
                if not self._submit(key, layer, expert, tier):
                    refused.append((key, "rejected", tier))
            self.requested = []
            self.engine.drain()
        done = [(self.key_of.pop(c.id), c.status, c.tier) for c in self.engine.poll()]
        return refused + done

    @property
    def in_flight(self) -> int:
        return len(self.key_of) + len(self.requested)
