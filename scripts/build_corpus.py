#!/usr/bin/env python3
"""Build the text corpus the embedded default model is trained on.

Three domains of real text that every development machine of the project has:

* ``python``: the CPython 3.11 standard library source (``lib/python3.11/**/*.py``,
  site-packages excluded);
* ``c``: C headers under ``/usr/include`` (deterministically subsampled);
* ``prose``: English manual pages (sections 1-8 of ``/usr/share/man``, not the
  translations), rendered to plain text with ``man -l`` and ``col -bx``.

Every document (one source file or one manual page) is assigned to the training or
the held-out split by a hash of its domain and path, so the split is deterministic
and a held-out document is never trained on. The corpus is written outside the
repository (default ``~/.cache/dynaexq/corpus``) as one JSON-lines file per domain
and split plus ``manifest.json`` with sizes.

Usage::

    python scripts/build_corpus.py [--out DIR] [--seed 0] [--heldout-permille 40]
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

DOMAINS = ("python", "c", "prose")


def _hash01(seed: int, *parts: str) -> float:
    """A deterministic number in [0, 1) for (seed, parts); independent of PYTHONHASHSEED."""
    h = hashlib.sha256(("\x00".join((str(seed), *parts))).encode()).digest()
    return int.from_bytes(h[:8], "little") / 2**64


def _read_text(path: Path, max_bytes: int) -> str | None:
    try:
        data = path.read_bytes()
    except OSError:
        return None
    if not data or len(data) > max_bytes or b"\x00" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def python_docs(root: Path, max_bytes: int) -> Iterator[tuple[str, str]]:
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root).as_posix()
        if rel.startswith("site-packages/") or p.is_symlink():
            continue
        text = _read_text(p, max_bytes)
        if text is not None:
            yield rel, text


def c_docs(root: Path, max_bytes: int, keep: float, seed: int) -> Iterator[tuple[str, str]]:
    for p in sorted(root.rglob("*.h")):
        rel = p.relative_to(root).as_posix()
        if p.is_symlink() or not p.is_file():
            continue
        # Subsample by hash so the domain stays a size comparable to the others.
        if _hash01(seed, "c-keep", rel) >= keep:
            continue
        text = _read_text(p, max_bytes)
        if text is not None:
            yield rel, text


def _render_man(path: Path) -> str | None:
    env = dict(os.environ, MANWIDTH="80", LANG="C.UTF-8", LC_ALL="C.UTF-8", MAN_KEEP_FORMATTING="")
    try:
        man = subprocess.run(
            ["man", "-l", "-E", "UTF-8", str(path)],
            capture_output=True,
            env=env,
            timeout=30,
            check=False,
        )
        if man.returncode != 0 or not man.stdout:
            return None
        col = subprocess.run(
            ["col", "-bx"], input=man.stdout, capture_output=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = col.stdout.decode("utf-8", errors="replace")
    # Collapse the long runs of blank lines groff leaves around page headers.
    lines = [ln.rstrip() for ln in text.splitlines()]
    out: list[str] = []
    for ln in lines:
        if ln == "" and out and out[-1] == "":
            continue
        out.append(ln)
    text = "\n".join(out).strip() + "\n"
    return text if len(text) > 200 else None


def man_pages(root: Path, seed: int) -> list[Path]:
    """English pages of sections 1-8, no symlinks and no `.so` redirections, hash-ordered."""
    pages: list[Path] = []
    for sec in range(1, 9):
        d = root / f"man{sec}"
        if not d.is_dir():
            continue
        for p in sorted(d.iterdir()):
            if p.is_symlink() or not p.is_file():
                continue
            try:
                if p.suffix == ".gz":
                    with gzip.open(p) as g:
                        head = g.read(64)
                else:
                    head = p.read_bytes()[:64]
            except OSError:
                continue
            if head.startswith(b".so "):
                continue
            pages.append(p)
    pages.sort(key=lambda p: _hash01(seed, "man-order", p.as_posix()))
    return pages


def prose_docs(root: Path, target_bytes: int, seed: int, workers: int) -> Iterator[tuple[str, str]]:
    pages = man_pages(root, seed)
    total = 0
    batch = max(8, workers * 8)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for i in range(0, len(pages), batch):
            chunk = pages[i : i + batch]
            for p, text in zip(chunk, pool.map(_render_man, chunk), strict=True):
                if text is None:
                    continue
                yield p.relative_to(root).as_posix(), text
                total += len(text.encode())
                if total >= target_bytes:
                    return


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", type=Path, default=Path.home() / ".cache/dynaexq/corpus")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--heldout-permille", type=int, default=40, help="share of documents held out (per mille)"
    )
    ap.add_argument(
        "--python-root",
        type=Path,
        default=Path(sys.base_prefix)
        / "lib"
        / f"python{sys.version_info.major}.{sys.version_info.minor}",
    )
    ap.add_argument("--c-root", type=Path, default=Path("/usr/include"))
    ap.add_argument("--c-keep", type=float, default=0.35, help="fraction of headers kept (by hash)")
    ap.add_argument("--man-root", type=Path, default=Path("/usr/share/man"))
    ap.add_argument(
        "--prose-mb", type=float, default=24.0, help="rendered manual pages to collect (MB)"
    )
    ap.add_argument(
        "--max-file-kb", type=int, default=512, help="skip larger source files (generated tables)"
    )
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args(argv)

    for tool in ("man", "col"):
        if subprocess.run(["which", tool], capture_output=True).returncode != 0:
            print(
                f"error: `{tool}` is required to render manual pages "
                "(apt-get install man-db bsdextrautils)"
            )
            return 2
    if not args.python_root.is_dir():
        print(f"error: python stdlib not found at {args.python_root}")
        return 2

    args.out.mkdir(parents=True, exist_ok=True)
    max_bytes = args.max_file_kb * 1024
    sources = {
        "python": lambda: python_docs(args.python_root, max_bytes),
        "c": lambda: c_docs(args.c_root, max_bytes, args.c_keep, args.seed),
        "prose": lambda: prose_docs(
            args.man_root, int(args.prose_mb * 1e6), args.seed, args.workers
        ),
    }
    manifest: dict[str, object] = {
        "seed": args.seed,
        "heldout_permille": args.heldout_permille,
        "sources": {
            "python": str(args.python_root),
            "c": f"{args.c_root} (keep {args.c_keep})",
            "prose": f"{args.man_root}/man[1-8] rendered with man -l | col -bx",
        },
        "domains": {},
    }
    for domain in DOMAINS:
        t0 = time.time()
        stats = {"train": {"docs": 0, "bytes": 0}, "heldout": {"docs": 0, "bytes": 0}}
        with (
            open(args.out / f"{domain}.train.jsonl", "w", encoding="utf-8") as ftrain,
            open(args.out / f"{domain}.heldout.jsonl", "w", encoding="utf-8") as fheld,
        ):
            files = {"train": ftrain, "heldout": fheld}
            for rel, text in sources[domain]():
                held = _hash01(args.seed, "split", domain, rel) < args.heldout_permille / 1000
                split = "heldout" if held else "train"
                files[split].write(
                    json.dumps({"path": rel, "text": text}, ensure_ascii=False) + "\n"
                )
                stats[split]["docs"] += 1
                stats[split]["bytes"] += len(text.encode())
        manifest["domains"][domain] = stats  # type: ignore[index]
        print(
            f"{domain:7s} train {stats['train']['docs']:6d} docs "
            f"{stats['train']['bytes'] / 1e6:7.2f} MB | "
            f"heldout {stats['heldout']['docs']:5d} docs {stats['heldout']['bytes'] / 1e6:6.2f} MB "
            f"({time.time() - t0:.0f}s)",
            flush=True,
        )
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
