//! Replays the saved fuzz corpora (fuzz/corpus/<target>) through the same interpreters
//! the fuzz targets run, on stable Rust.
#![cfg(not(loom))]

use std::path::Path;

fn replay(target: &str, run: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let mut entries: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("corpus {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    assert!(!entries.is_empty(), "the corpus {} is empty", dir.display());
    for path in entries {
        let data = std::fs::read(&path).unwrap();
        let r = std::panic::catch_unwind(|| run(&data));
        assert!(r.is_ok(), "corpus input {} fails", path.display());
    }
}

#[test]
fn replay_pool_ops_corpus() {
    replay("pool_ops", |d| {
        dynaexq::shadow::run(d);
    });
}

#[test]
fn replay_transfer_ops_corpus() {
    replay("transfer_ops", |d| {
        dynaexq::shadow::run_transfer(d);
    });
}

#[test]
fn replay_kv_pages_ops_corpus() {
    replay("kv_pages_ops", |d| {
        dynaexq::kv_shadow::run_kv(d);
    });
}
