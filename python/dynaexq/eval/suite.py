"""Suites: every `dynaexq eval` run behind a set of published figures, and the tables made
from them, in one file (`dynaexq eval --suite NAME`), so that one command reproduces them.

A suite is a TOML file (the package's own under `eval/suites/`, or any path)::

    description = "what the figures are"
    [[run]]
    name = "cells-domain"            # its folder under --out
    args = "--domains round9 ..."    # `dynaexq eval` arguments, without --out / --json
    [[table]]
    kind = "cells"                   # cells | tiers | shift (see eval/table.py)
    runs = ["cells-domain", "cells-generic"]
    policies = ["dynamic"]
    reference = ["cells-domain"]     # tiers only: the runs that hold static int2

Each run goes to its own process (`--jobs` at once), writing `OUT/NAME/` (report, plots,
`results.json`, `log.txt`); a run that finished is stamped (`suite-run.json`, its
arguments) and skipped next time, so an interrupted suite resumes where it stopped. The
tables go to `OUT/SUITE.md` once their runs are done.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from dynaexq.eval.table import cells_table, shift_table, tiers_table

SUITES = Path(__file__).with_name("suites")
STAMP = "suite-run.json"
TABLE_KINDS = ("cells", "tiers", "shift")


@dataclass(frozen=True)
class SuiteRun:
    name: str
    args: tuple[str, ...]

    def command(self, out: Path) -> list[str]:
        """The `dynaexq eval` arguments of this run, writing into `out / name`."""
        d = out / self.name
        return ["eval", *self.args, "--out", str(d), "--json", str(d / "results.json")]


@dataclass(frozen=True)
class SuiteTable:
    kind: str
    runs: tuple[str, ...]
    policies: tuple[str, ...]
    reference: tuple[str, ...] = ()


@dataclass(frozen=True)
class Suite:
    name: str
    description: str
    runs: tuple[SuiteRun, ...]
    tables: tuple[SuiteTable, ...] = field(default=())


def available() -> list[str]:
    """The suites shipped with the package."""
    return sorted(p.stem for p in SUITES.glob("*.toml"))


def load_suite(name: str) -> Suite:
    """A shipped suite by name, or a suite file by path; malformed files are refused with
    what is wrong."""
    path = Path(name)
    if not path.suffix:
        path = SUITES / f"{name}.toml"
        if not path.exists():
            raise ValueError(f"no suite {name!r}; shipped suites: {', '.join(available())}")
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ValueError(f"{path}: {e}") from e
    where = str(path)
    runs = []
    for i, r in enumerate(data.get("run", [])):
        if not isinstance(r.get("name"), str) or not isinstance(r.get("args"), str):
            raise ValueError(f"{where}: run {i + 1} needs a name and an args string")
        args = tuple(shlex.split(r["args"]))
        if {"--out", "--json"} & {a.split("=")[0] for a in args}:
            raise ValueError(f"{where}: run {r['name']}: --out and --json are the suite's")
        runs.append(SuiteRun(r["name"], args))
    if not runs:
        raise ValueError(f"{where}: no [[run]]")
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise ValueError(f"{where}: run names repeat: {names}")
    tables = []
    for t in data.get("table", []):
        if t.get("kind") not in TABLE_KINDS:
            raise ValueError(f"{where}: table kind {t.get('kind')!r} is not one of {TABLE_KINDS}")
        used = [*t.get("runs", []), *t.get("reference", [])]
        if not t.get("runs") or any(n not in names for n in used):
            raise ValueError(f"{where}: a {t['kind']} table names runs {used}; runs: {names}")
        if t["kind"] == "tiers" and not t.get("reference"):
            raise ValueError(f"{where}: a tiers table needs reference runs (static int2)")
        tables.append(
            SuiteTable(
                t["kind"],
                tuple(t["runs"]),
                tuple(t.get("policies", ["dynamic"])),
                tuple(t.get("reference", [])),
            )
        )
    return Suite(path.stem, str(data.get("description", "")), tuple(runs), tuple(tables))


def is_done(run: SuiteRun, out: Path) -> bool:
    """Whether `run` finished before with the same arguments (its stamp and results)."""
    d = out / run.name
    try:
        stamp = json.loads((d / STAMP).read_text())
    except (OSError, ValueError):
        return False
    return stamp.get("args") == list(run.args) and (d / "results.json").exists()


def launch(run: SuiteRun, out: Path) -> int:
    """Run one suite run as its own `dynaexq eval` process, its output in `log.txt`."""
    d = out / run.name
    d.mkdir(parents=True, exist_ok=True)
    with open(d / "log.txt", "w") as log:
        cmd = [sys.executable, "-m", "dynaexq.cli", *run.command(out)]
        return subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode


def run_suite(
    suite: Suite,
    out: Path,
    jobs: int = 1,
    runner: Callable[[SuiteRun, Path], int] = launch,
) -> tuple[int, Path | None]:
    """Run every run of `suite` not done yet (`jobs` at once), then write the tables of
    the finished runs to `out / f"{suite.name}.md"`. Returns (runs that failed, the
    tables' file or None)."""
    out.mkdir(parents=True, exist_ok=True)
    todo = [r for r in suite.runs if not is_done(r, out)]
    for r in suite.runs:
        if r not in todo:
            print(f"{r.name}: done before with the same arguments (remove {out / r.name} to rerun)")
    failed = 0
    with (
        tqdm(total=len(todo), desc=f"suite {suite.name}", unit="run") as bar,
        ThreadPoolExecutor(max_workers=max(1, jobs)) as pool,
    ):

        def start(r: SuiteRun) -> tuple[int, float]:
            # Done means the last attempt finished: an attempt stopped halfway is not done
            # under any arguments, whatever files an earlier run left.
            (out / r.name / STAMP).unlink(missing_ok=True)
            bar.write(f"{r.name}: started: dynaexq {shlex.join(r.command(out))}")
            t0 = time.perf_counter()
            return runner(r, out), time.perf_counter() - t0

        started = {pool.submit(start, r): r for r in todo}
        for fut in as_completed(started):
            r = started[fut]
            rc, secs = fut.result()
            if rc == 0:
                stamp = {"suite": suite.name, "args": list(r.args), "seconds": round(secs, 1)}
                (out / r.name / STAMP).write_text(json.dumps(stamp, indent=1))
                bar.write(f"{r.name}: done in {secs / 60:.1f} min")
            else:
                failed += 1
                bar.write(f"{r.name}: failed (exit {rc}); see {out / r.name / 'log.txt'}")
            bar.update()
    return failed, write_tables(suite, out)


def _results(out: Path, name: str) -> dict[str, Any]:
    return json.loads((out / name / "results.json").read_text())


def write_tables(suite: Suite, out: Path) -> Path | None:
    """`OUT/SUITE.md`: each table whose runs are all done, with the commands behind it."""
    done = {r.name for r in suite.runs if is_done(r, out)}
    parts = [f"# Suite {suite.name}", "", suite.description, ""]
    if not suite.tables or not done:
        return None
    for t in suite.tables:
        missing = [n for n in (*t.runs, *t.reference) if n not in done]
        if missing:
            parts += [f"({t.kind} table of {', '.join(t.runs)}: not done: {missing})", ""]
            continue
        if t.kind == "cells":
            text = cells_table([_results(out, n)["eval"] for n in t.runs], list(t.policies))
        elif t.kind == "tiers":
            text = tiers_table(
                {n: _results(out, n)["eval"] for n in t.runs},
                [_results(out, n)["eval"] for n in t.reference],
                list(t.policies),
            )
        else:
            text = "\n\n".join(
                shift_table(_results(out, n)["shift"], list(t.policies)) for n in t.runs
            )
        parts += [f"## {t.kind}: {', '.join(t.runs)}", "", text, ""]
    parts += ["## Commands", ""]
    parts += [f"- `dynaexq {shlex.join(r.command(out))}`" for r in suite.runs]
    path = out / f"{suite.name}.md"
    path.write_text("\n".join(parts) + "\n")
    return path
