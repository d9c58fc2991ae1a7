"""`dynaexq eval --suite`: the runs behind published figures, run once each, resumed, and
their tables (dynaexq.eval.suite, dynaexq.eval.table)."""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path

import pytest
from dynaexq.cli import main
from dynaexq.eval.suite import STAMP, SuiteRun, is_done, load_suite, run_suite, write_tables
from dynaexq.eval.table import tiers_table

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "results" / "eval"


def _recorded_args(name: str) -> list[str]:
    """The `dynaexq eval` arguments a committed report says it was made with."""
    line = (RESULTS / name / "report.md").read_text().splitlines()[2]
    assert line.startswith("Command: `dynaexq eval ")
    args = shlex.split(line.removeprefix("Command: `dynaexq eval ").rstrip("`"))
    i = args.index("--out")
    del args[i : i + 2]
    j = args.index("--json")
    del args[j : j + 2]
    return args


def test_the_round9_suite_is_the_commands_behind_the_committed_figures() -> None:
    suite = load_suite("round9")
    assert [r.name for r in suite.runs] == [
        "round9-domain", "round9-generic", "round9-shift",
        "round9-int4-bf16", "round9-3tier", "round9-2tier",
    ]  # fmt: skip
    for r in suite.runs:
        assert list(r.args) == _recorded_args(r.name), r.name


def _fake_out(tmp_path: Path, names: list[str]) -> Path:
    """An output folder holding the committed results of `names`, stamped as done."""
    suite = {r.name: r for r in load_suite("round9").runs}
    out = tmp_path / "out"
    for n in names:
        (out / n).mkdir(parents=True)
        shutil.copy(RESULTS / n / "results.json", out / n / "results.json")
        (out / n / STAMP).write_text(json.dumps({"args": list(suite[n].args)}))
    return out


def test_the_round9_tables_give_the_readme_figures(tmp_path) -> None:
    """From the committed results, the suite's tables hold the README's figures: the
    cell counts, the shift margins and the tier sets on the int2 scale."""
    names = [r.name for r in load_suite("round9").runs]
    out = _fake_out(tmp_path, names)
    text = write_tables(load_suite("round9"), out).read_text()
    assert "dynamic: 31 / 32 cells within 0.5 of the cell's best static (mean margin +0.05)" in text
    assert "3bits php generic -1.5 ± 0.4" in text
    assert "| dynamic | 72.9%, +1.5, 18 | 74.3%, -0.8, 4 | 78.9%, +7.0, 29 |" in text
    # int4 / bf16, int2 / int4 / bf16 and int2 / bf16, dynamic, domain calibration.
    assert "| round9-int4-bf16 | int4/bf16 | 5.24bits | domain |" in text
    assert "96.8-99.0 (lowest: mixed)" in text
    assert "94.4-102.1 (lowest: proto)" in text and "70.7-88.3 (lowest: php)" in text
    assert "- `dynaexq eval --domains round9" in text


def test_tiers_need_the_reference_slices(tmp_path) -> None:
    out = _fake_out(tmp_path, ["round9-shift", "round9-3tier"])
    shift = json.loads((out / "round9-shift" / "results.json").read_text())["eval"]
    tier = json.loads((out / "round9-3tier" / "results.json").read_text())["eval"]
    with pytest.raises(ValueError, match="not among the reference runs' slices"):
        tiers_table({"round9-3tier": tier}, [shift], ["dynamic"])


def _suite_file(tmp_path: Path, body: str) -> Path:
    p = tmp_path / "s.toml"
    p.write_text(body)
    return p


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("description = 'x'", "no \\[\\[run\\]\\]"),
        ("[[run]]\nname = 'a'", "needs a name and an args string"),
        ("[[run]]\nname = 'a'\nargs = '--out x'", "--out and --json are the suite's"),
        ("[[run]]\nname = 'a'\nargs = ''\n[[run]]\nname = 'a'\nargs = ''", "names repeat"),
        ("[[run]]\nname = 'a'\nargs = ''\n[[table]]\nkind = 'pie'\nruns = ['a']", "table kind"),
        ("[[run]]\nname = 'a'\nargs = ''\n[[table]]\nkind = 'cells'\nruns = ['b']", "names runs"),
        ("[[run]]\nname = 'a'\nargs = ''\n[[table]]\nkind = 'tiers'\nruns = ['a']", "reference"),
        ("[[run]\nname = 'a'", "s.toml"),
    ],
)
def test_malformed_suites_are_refused_with_what_is_wrong(tmp_path, body, message) -> None:
    with pytest.raises(ValueError, match=message):
        load_suite(str(_suite_file(tmp_path, body)))


def test_an_unknown_suite_names_the_shipped_ones() -> None:
    with pytest.raises(ValueError, match="shipped suites: css, round9"):
        load_suite("round99")


def test_finished_runs_are_skipped_and_failures_are_not_stamped(tmp_path) -> None:
    two = "[[run]]\nname = 'a'\nargs = '--tokens 1'\n[[run]]\nname = 'b'\nargs = '--tokens 2'"
    suite = load_suite(str(_suite_file(tmp_path, two)))
    calls: list[str] = []

    def runner(run: SuiteRun, out: Path) -> int:
        calls.append(run.name)
        if run.name == "b":
            return 3
        (out / run.name).mkdir(parents=True, exist_ok=True)
        (out / run.name / "results.json").write_text("{}")
        return 0

    out = tmp_path / "out"
    assert run_suite(suite, out, jobs=2, runner=runner)[0] == 1
    assert sorted(calls) == ["a", "b"]
    assert json.loads((out / "a" / STAMP).read_text())["args"] == ["--tokens", "1"]
    assert not (out / "b" / STAMP).exists()
    calls.clear()
    assert run_suite(suite, out, runner=runner)[0] == 1
    assert calls == ["b"]  # a is done
    # Other arguments for a: it runs again.
    changed = load_suite(str(_suite_file(tmp_path, "[[run]]\nname = 'a'\nargs = '--tokens 5'")))
    calls.clear()
    assert run_suite(changed, out, runner=runner)[0] == 0
    assert calls == ["a"]
    # Back to the first arguments: an attempt that fails leaves no stamp, so the files of
    # the run before (other arguments) no longer count as done either.
    assert run_suite(suite, out, runner=lambda r, o: 1)[0] == 2
    assert not (out / "a" / STAMP).exists() and not is_done(changed.runs[0], out)


def test_suite_refuses_other_eval_options(capsys) -> None:
    assert main(["eval", "--suite", "round9", "--tokens", "5"]) == 2
    assert "--suite takes only --out and --jobs, not ['--tokens']" in capsys.readouterr().err


def test_suite_checks_every_run_before_starting(tmp_path, capsys) -> None:
    bad = _suite_file(tmp_path, "[[run]]\nname = 'a'\nargs = '--budgets 20% --no-such-flag'")
    assert main(["eval", "--suite", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "suite run a: bad arguments" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_a_small_suite_runs_end_to_end(tmp_path, capsys) -> None:
    """Two real evals on the embedded model, side by side, then the tables; run again,
    nothing reruns."""
    small = "--tokens 128 --calibration-tokens 256 --budgets 20% --streams 2 --window 64"
    small += " --variants none"
    shift = "--shift python,prose --shift-budget 20% --segment-tokens 128"
    body = f"""
description = "small"
[[run]]
name = "cells"
args = "{small} --policies full,static,uniform,static-knapsack,dynamic --shift none"
[[run]]
name = "shift"
args = "{small} --policies full,static,static-knapsack,dynamic {shift}"
[[table]]
kind = "cells"
runs = ["cells"]
[[table]]
kind = "shift"
runs = ["shift"]
"""
    out = tmp_path / "out"
    suite = _suite_file(tmp_path, body)
    assert main(["eval", "--suite", str(suite), "--jobs", "2", "--out", str(out)]) == 0
    text = (out / "s.md").read_text()
    assert "| 20% | domain |" in text and "Shift python -> prose at 20%" in text
    for n in ("cells", "shift"):
        assert (out / n / "report.md").is_file() and (out / n / STAMP).is_file()
    stamp = (out / "cells" / STAMP).read_text()
    capsys.readouterr()
    assert main(["eval", "--suite", str(suite), "--out", str(out)]) == 0
    assert "cells: done before with the same arguments" in capsys.readouterr().out
    assert (out / "cells" / STAMP).read_text() == stamp
