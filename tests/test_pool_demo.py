"""`dynaexq demo` runs end to end and shows the protocol's outcomes."""

from __future__ import annotations

import pytest
from dynaexq.cli import main


def test_demo_runs(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    assert "use completed -> reclaimed [Block(" in out
    assert "injected copy failure: failed" in out
    assert "its bytes equal the store's: True" in out


def test_demo_reports_a_budget_that_does_not_fit(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--budget", "1000"]) == 1
    assert "B missing" in capsys.readouterr().out
