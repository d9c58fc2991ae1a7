"""Dropping a transfer engine with copies nobody will finish must not hang the process."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_dropping_an_engine_with_unfinished_manual_copies_returns() -> None:
    code = textwrap.dedent(
        """
        from dynaexq import ExpertPool, ExpertTable
        from dynaexq._core import HostStore, TransferEngine

        pool = ExpertPool({"lo": 256, "hi": 512}, {"lo": 4, "hi": 2})
        table = ExpertTable(pool, [2], [["lo", "hi"]])
        store = HostStore([2], [[256, 512]])
        for e in range(2):
            store.write(0, e, 0, bytes(256))
            store.write(0, e, 1, bytes([e + 1]) * 512)
        store.freeze()
        engine = TransferEngine(table, store, backend="manual", driver=False)
        engine.submit(0, 0, 1)
        assert engine.status(1) in ("queued", "in_flight")
        del engine  # the copy is never finished by the test
        assert table.tier(0, 0) == 0  # rolled back
        print("dropped")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "dropped" in out.stdout
