#!/usr/bin/env python3
"""Build text domains the embedded model never saw, from files on this machine.

The embedded model was trained on CPython's standard library, C headers under
/usr/include and manual pages (scripts/build_corpus.py). The domains here are other
languages and formats:

* ``rust``: Rust sources of the crates in cargo's registry (``~/.cargo/registry/src``);
* ``yaml``: YAML files (``*.yml``, ``*.yaml``) of installed Python packages and crates;
* ``perl``: Perl modules (``*.pm``) under ``/usr/share/perl*``;
* ``shell``: shell scripts (``*.sh``) under ``/usr``, ``/etc``, ``/opt`` and installed packages;
* ``pypkg``: Python sources of installed third-party packages (the venv's site-packages,
  not the standard library the model was trained on);
* ``tcl``: Tcl scripts (``*.tcl``) under ``/usr/share`` and ``/usr/lib`` (Tk's library);
* ``markdown``: Markdown documents (READMEs, changelogs) of installed packages and crates;
* ``cpp``: C++ sources and headers (``*.cpp``, ``*.cc``, ``*.hpp``) vendored by crates
  and packages;
* ``cmake``: CMake scripts (``CMakeLists.txt``, ``*.cmake``) under ``/usr`` and vendored
  by crates and packages;
* ``xml``: XML files (``*.xml``) under ``/usr/share``, ``/etc`` and installed packages;
* ``html``: HTML pages (``*.html``, ``*.htm``) outside Debian's documentation, of
  installed packages and crates.

Tuning domains (controller defaults are chosen on these): ``rust`` and ``yaml``.
Held back until a report: ``perl``, ``shell`` and ``pypkg`` (used by rounds two to five of
docs/results/eval/unseen.md, so no longer untouched), then ``tcl``, ``markdown`` and
``cpp`` (added for round six, untouched before it: ``--domains fresh``; tuned on from
round seven), then ``cmake``, ``xml`` and ``html`` (added for round seven, untouched before
its report: ``--domains final``), ``javascript``, ``sql``, ``toml`` (round eight) and
``php``, ``proto``, ``json`` (round nine; ``css`` is built too, a spare, untouched).

Cargo's registry contributes only the crates the project's lock files name (``Cargo.lock``
and ``fuzz/Cargo.lock``, fetched first with ``cargo fetch --locked``): a registry also holds
whatever else was ever built on the machine, which made sets differ between machines.
Every file taken is recorded (``sources.json``: its root, path and a hash of its bytes), so
that a machine whose files differ can tell which ones.

Excluded everywhere: ``/usr/share/doc`` (Debian documentation), ``/usr/include``,
``/usr/share/man``, CPython's own tree outside site-packages, and minified files (any
line over 1000 characters). Files are taken in sorted path order, each kept or skipped
by a hash of its path (deterministic), concatenated with a blank line between them,
tokenised with the embedded model's tokenizer and cut at ``--tokens``. Output (outside
the clone by default): ``DIR/<domain>.npy`` (int32 token ids), ``DIR/manifest.json``
(roots, file counts, token counts, sha256 of each array) and ``DIR/sources.json`` (per
domain the files taken: root, path, first 16 hex digits of the sha256 of the bytes).
Copies of both are committed as ``python/dynaexq/eval/unseen_manifest.json`` and
``unseen_sources.json``; `dynaexq eval --domains unseen` reads the arrays from the cache,
checks them against the manifest and, where one differs, names the files that do.

Usage::

    python scripts/build_unseen_domains.py [--out ~/.cache/dynaexq/domains] [--tokens 98304]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import site
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np

HOME = Path.home()
REPO = Path(__file__).resolve().parent.parent
REGISTRY = HOME / ".cargo" / "registry" / "src"
LOCK_FILES = (REPO / "Cargo.lock", REPO / "fuzz" / "Cargo.lock")
EXCLUDE = ("/usr/share/doc/", "/usr/include/", "/usr/share/man/")


def _site_dirs() -> list[Path]:
    dirs = [Path(p) for p in site.getsitepackages()]
    return [d for d in dirs if d.is_dir()]


SOURCES: dict[str, tuple[list[Path], tuple[str, ...]]] = {
    "rust": ([REGISTRY], ("*.rs",)),
    "yaml": ([*_site_dirs(), REGISTRY], ("*.yml", "*.yaml")),
    "perl": ([Path("/usr/share/perl"), Path("/usr/share/perl5")], ("*.pm",)),
    "shell": ([Path("/usr"), Path("/etc"), Path("/opt"), *_site_dirs()], ("*.sh",)),
    "pypkg": (_site_dirs(), ("*.py",)),
    "tcl": ([Path("/usr/share"), Path("/usr/lib"), *_site_dirs()], ("*.tcl",)),
    "markdown": ([*_site_dirs(), REGISTRY], ("*.md",)),
    "cpp": (
        [REGISTRY, *_site_dirs(), Path("/usr/share")],
        ("*.cpp", "*.cc", "*.hpp"),
    ),
    "html": (
        [Path("/usr/share"), Path("/usr/lib"), *_site_dirs(), REGISTRY],
        ("*.html", "*.htm"),
    ),
    "cmake": (
        [Path("/usr"), REGISTRY, *_site_dirs()],
        ("CMakeLists.txt", "*.cmake"),
    ),
    "xml": ([Path("/usr/share"), Path("/etc"), *_site_dirs()], ("*.xml",)),
    "javascript": ([Path("/usr/share"), Path("/usr/lib"), *_site_dirs()], ("*.js",)),
    "sql": ([Path("/usr/share"), Path("/usr/lib"), *_site_dirs()], ("*.sql",)),
    "toml": (
        [REGISTRY, *_site_dirs(), Path("/usr/share")],
        ("*.toml",),
    ),
    "php": ([Path("/usr/share"), Path("/usr/lib"), *_site_dirs()], ("*.php",)),
    "css": ([Path("/usr/share"), Path("/usr/lib"), *_site_dirs()], ("*.css",)),
    "proto": ([*_site_dirs(), Path("/usr/lib"), Path("/usr/share")], ("*.proto",)),
    "json": (
        [*_site_dirs(), REGISTRY, Path("/usr/share")],
        ("*.json",),
    ),
}
TUNING = ("rust", "yaml")
HELD_BACK = ("perl", "shell", "pypkg")
FRESH = ("tcl", "markdown", "cpp")
FINAL = ("cmake", "xml", "html")
# Held back for round eight (the recalibrating dynamic), built before any run of it.
ROUND8 = ("javascript", "sql", "toml")
# Held back for round nine (recalibration on a timer), built before any run of it.
ROUND9 = ("php", "proto", "json")


def locked_crates(lock_files=LOCK_FILES) -> set[str]:
    """`name-version` of every registry package the lock files name."""
    out: set[str] = set()
    for lock in lock_files:
        if lock.is_file():
            for pkg in tomllib.loads(lock.read_text()).get("package", []):
                if str(pkg.get("source", "")).startswith("registry+"):
                    out.add(f"{pkg['name']}-{pkg['version']}")
    return out


def fetch_locked_crates(lock_files=LOCK_FILES) -> None:
    """Bring the locked crates into cargo's registry (a no-op when they are there)."""
    for lock in lock_files:
        manifest = lock.with_name("Cargo.toml")
        if manifest.is_file():
            try:
                subprocess.run(
                    ["cargo", "fetch", "--locked", "--manifest-path", str(manifest)],
                    check=True, capture_output=True, text=True,
                )  # fmt: skip
            except (OSError, subprocess.CalledProcessError) as e:
                err = getattr(e, "stderr", "") or e
                print(f"warning: cargo fetch for {manifest} failed: {err}", file=sys.stderr)


def in_registry_scope(rel: Path, crates: set[str]) -> bool:
    """A path under the registry (`<index>/<crate>-<version>/...`) of a locked crate."""
    return len(rel.parts) > 2 and rel.parts[1] in crates


def _key(domain: str, path: str) -> bytes:
    return hashlib.sha256(f"{domain}\x00{path}".encode()).digest()


def documents(domain: str, max_bytes: int = 24_000, crates: set[str] | None = None):
    """Files of `domain` in a deterministic pseudo-random order (a hash of the path), so
    that the text spreads over many packages instead of the first ones alphabetically;
    under cargo's registry only those of `crates` (default: the locked ones)."""
    roots, patterns = SOURCES[domain]
    crates = locked_crates() if crates is None else crates
    seen: set[Path] = set()
    found: list[tuple[bytes, str, Path, Path]] = []
    for root in roots:
        if not root.is_dir():
            continue
        for pattern in patterns:
            for p in sorted(root.rglob(pattern)):
                try:
                    rp = p.resolve()
                    if rp in seen or not rp.is_file():
                        continue
                except OSError:
                    continue
                if any(x in str(rp) for x in EXCLUDE) or str(rp).startswith("/work/"):
                    continue
                if root == REGISTRY and not in_registry_scope(p.relative_to(root), crates):
                    continue
                seen.add(rp)
                rel = str(p.relative_to(root))
                found.append((_key(domain, rel), rel, root, rp))
    found.sort()
    for _, rel, root, rp in found:
        try:
            data = rp.read_bytes()
        except OSError:
            continue
        if not data or len(data) > max_bytes or b"\x00" in data:
            continue
        text = data.decode("utf-8", errors="replace")
        if max((len(line) for line in text.splitlines()), default=0) > 1000:
            continue  # minified or generated
        yield rel, root, text, hashlib.sha256(data).hexdigest()[:16]


def sources_json(sources: dict[str, list[list[str]]]) -> str:
    """sources.json's text: one line per file, so that a diff shows the files that changed."""
    blocks = []
    for name, files in sources.items():
        rows = ",\n".join("  " + json.dumps(f) for f in files)
        blocks.append(f"{json.dumps(name)}: [\n{rows}\n]")
    return "{\n" + ",\n".join(blocks) + "\n}\n"


def _label(root: Path) -> str:
    """A root as the manifest names it: the home directory written as ~."""
    return str(root).replace(str(HOME), "~")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=HOME / ".cache" / "dynaexq" / "domains")
    ap.add_argument("--tokens", type=int, default=98304, help="tokens per domain")
    ap.add_argument("--domains", default=",".join(SOURCES))
    args = ap.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "python"))
    from dynaexq.engine import EMBEDDED_MODEL_DIR
    from dynaexq.tokenizer import Tokenizer

    tok = Tokenizer(EMBEDDED_MODEL_DIR)
    fetch_locked_crates()
    crates = locked_crates()
    args.out.mkdir(parents=True, exist_ok=True)
    # Domains built before keep their entries (a subset can be rebuilt alone).
    old = args.out / "manifest.json"
    kept = json.loads(old.read_text())["domains"] if old.is_file() else {}
    old_sources = args.out / "sources.json"
    all_sources = json.loads(old_sources.read_text()) if old_sources.is_file() else {}
    manifest: dict[str, object] = {
        "tokens_per_domain": args.tokens,
        "tuning": list(TUNING),
        "held_back": list(HELD_BACK),
        "fresh": list(FRESH),
        "final": list(FINAL),
        "round8": list(ROUND8),
        "round9": list(ROUND9),
        "domains": {k: v for k, v in kept.items() if k in SOURCES},
    }
    for domain in [d.strip() for d in args.domains.split(",")]:
        ids: list[int] = []
        files = 0
        roots: set[str] = set()
        sources: list[list[str]] = []
        for rel, root, text, digest in documents(domain, crates=crates):
            ids.extend(tok.encode(text + "\n\n"))
            files += 1
            roots.add(str(root))
            sources.append([_label(root), rel, digest])
            if len(ids) >= args.tokens:
                break
        if len(ids) < args.tokens:
            print(f"{domain}: only {len(ids)} tokens from {files} files", file=sys.stderr)
        arr = np.asarray(ids[: args.tokens], dtype=np.int32)
        path = args.out / f"{domain}.npy"
        np.save(path, arr)
        manifest["domains"][domain] = {  # type: ignore[index]
            "roots": sorted(_label(Path(r)) for r in roots),
            "patterns": list(SOURCES[domain][1]),
            "files": files,
            "tokens": int(arr.size),
            "sha256": hashlib.sha256(arr.tobytes()).hexdigest(),
        }
        all_sources[domain] = sources
        print(f"{domain}: {arr.size} tokens from {files} files -> {path}")
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    kept_sources = {k: all_sources[k] for k in manifest["domains"] if k in all_sources}  # type: ignore[union-attr]
    old_sources.write_text(sources_json(kept_sources))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
