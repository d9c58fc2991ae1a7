//! Replays the saved fuzz corpus (fuzz/corpus/pool_ops) through the same interpreter the
//! fuzz target runs, on stable Rust.
#![cfg(not(loom))]

use std::path::Path;

#[test]
fn replay_pool_ops_corpus() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/pool_ops");
    let mut n = 0;
    let mut entries: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("corpus {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for path in entries {
        let data = std::fs::read(&path).unwrap();
        let run = std::panic::catch_unwind(|| dynaexq::shadow::run(&data));
        assert!(run.is_ok(), "corpus input {} fails", path.display());
        n += 1;
    }
    assert!(n > 0, "the corpus is empty");
}
