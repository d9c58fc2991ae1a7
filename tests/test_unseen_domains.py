"""The unseen text domains: built only from sources the project pins (cargo's registry
limited to the lock files' crates), every file recorded, and a set that differs from the
committed one refused with the files that differ."""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import dynaexq.eval.run as R
import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "build_unseen_domains.py"


@pytest.fixture(scope="module")
def builder():
    spec = importlib.util.spec_from_file_location("build_unseen_domains", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_locked_crates_are_the_registry_packages_of_the_lock_files(builder, tmp_path) -> None:
    lock = tmp_path / "Cargo.lock"
    lock.write_text(
        "version = 4\n\n"
        '[[package]]\nname = "serde"\nversion = "1.0.1"\n'
        'source = "registry+https://github.com/rust-lang/crates.io-index"\n\n'
        '[[package]]\nname = "dynaexq"\nversion = "0.1.0"\n'
    )
    assert builder.locked_crates((lock, tmp_path / "absent.lock")) == {"serde-1.0.1"}


def test_the_registry_gives_only_locked_crates(builder, tmp_path, monkeypatch) -> None:
    """A crate the machine happens to hold (built once by something else) is not taken:
    it made the rust, yaml, markdown, toml and json sets differ between machines."""
    reg = tmp_path / "registry"
    for crate, body in (("kept-1.0", "fn kept() {}\n"), ("stray-2.0", "fn stray() {}\n")):
        (reg / "index.crates.io-0" / crate / "src").mkdir(parents=True)
        (reg / "index.crates.io-0" / crate / "src" / "lib.rs").write_text(body)
    monkeypatch.setattr(builder, "REGISTRY", reg)
    monkeypatch.setitem(builder.SOURCES, "rust", ([reg], ("*.rs",)))
    docs = list(builder.documents("rust", crates={"kept-1.0"}))
    assert [(rel, text) for rel, _, text, _ in docs] == [
        ("index.crates.io-0/kept-1.0/src/lib.rs", "fn kept() {}\n")
    ]
    assert docs[0][3] == hashlib.sha256(b"fn kept() {}\n").hexdigest()[:16]
    # Outside the registry every file counts, locked or not.
    monkeypatch.setattr(builder, "REGISTRY", tmp_path / "elsewhere")
    assert len(list(builder.documents("rust", crates=set()))) == 2


def _committed(tmp_path: Path, arr: np.ndarray, sources: list[list[str]]) -> tuple[Path, Path]:
    manifest = tmp_path / "unseen_manifest.json"
    manifest.write_text(
        json.dumps(
            {
                **{k: [] for k in ("tuning", "held_back")},
                "domains": {
                    "toy": {"sha256": hashlib.sha256(arr.astype(np.int32).tobytes()).hexdigest()}
                },
            }
        )
    )
    src = tmp_path / "unseen_sources.json"
    src.write_text(json.dumps({"toy": sources}))
    return manifest, src


def test_a_set_that_differs_names_the_files_that_do(tmp_path, monkeypatch) -> None:
    committed = [["~/r", "a/x.rs", "00aa"], ["~/r", "b/y.rs", "00bb"], ["~/r", "c/z.rs", "00cc"]]
    manifest, src = _committed(tmp_path, np.arange(10), committed)
    monkeypatch.setattr(R, "UNSEEN_MANIFEST", manifest)
    monkeypatch.setattr(R, "UNSEEN_SOURCES", src)
    cache = tmp_path / "cache"
    cache.mkdir()
    np.save(cache / "toy.npy", np.arange(10, dtype=np.int32))
    assert list(R.unseen_domains("toy", cache)["toy"]) == list(range(10))

    np.save(cache / "toy.npy", np.arange(1, 11, dtype=np.int32))
    built = [["~/r", "a/x.rs", "00aa"], ["~/r", "b/y.rs", "ffff"], ["~/r", "d/w.rs", "00dd"]]
    (cache / "sources.json").write_text(json.dumps({"toy": built}))
    with pytest.raises(ValueError) as e:
        R.unseen_domains("toy", cache)
    msg = str(e.value)
    assert "1 of the committed 3 files not taken here (e.g. ~/r/c/z.rs)" in msg
    assert "1 of the committed 3 files changed (e.g. ~/r/b/y.rs)" in msg
    assert "1 files taken here that the committed set lacks (e.g. ~/r/d/w.rs)" in msg
    # Without the cache's file list the refusal still stands, unexplained.
    (cache / "sources.json").unlink()
    with pytest.raises(ValueError, match="differs from the committed manifest"):
        R.unseen_domains("toy", cache)


def test_sources_json_is_a_file_a_line_and_reads_back(builder) -> None:
    sources = {"a": [["~/r", "x/y.rs", "00aa"], ["/usr", "z", "00bb"]], "b": []}
    text = builder.sources_json(sources)
    assert json.loads(text) == sources
    assert '  ["~/r", "x/y.rs", "00aa"],\n' in text


def test_the_committed_sources_cover_the_committed_manifest() -> None:
    """Every committed domain has its file list, as many files as the manifest counts."""
    manifest = json.loads(R.UNSEEN_MANIFEST.read_text())["domains"]
    sources = json.loads(R.UNSEEN_SOURCES.read_text())
    assert set(sources) == set(manifest)
    for name, entry in manifest.items():
        assert len(sources[name]) == entry["files"], name
