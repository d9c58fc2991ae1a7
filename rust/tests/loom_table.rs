//! loom model of publish / lease / reclaim: two readers lease the published version of an
//! expert and read its block while a writer migrates the expert twice (each migration
//! writes a freshly reserved block, publishes it, and reclaims the old one, which the
//! second migration may reuse). Block contents are loom `UnsafeCell`s, so loom reports
//! any read of a block that is concurrently being (re)written, and the readers assert
//! they see exactly the version they leased.
//!
//! Run: RUSTFLAGS="--cfg loom" LOOM_MAX_PREEMPTIONS=2 \
//!      cargo test --release --test loom_table  (with a separate CARGO_TARGET_DIR)
#![cfg(loom)]

use loom::cell::UnsafeCell;
use loom::sync::{Arc, Mutex};
use loom::thread;

use dynaexq::{ClassSpec, ExpertPool, ExpertTable, LayerTiers, PoolConfig, SyncUses, UseFence};

/// Slot contents: the version number written into the block.
struct Blocks(Vec<UnsafeCell<u32>>);
// SAFETY: loom checks every access to the cells for races; that is the point of the test.
unsafe impl Sync for Blocks {}

fn global_slot(b: &dynaexq::Block) -> usize {
    // Class "lo" holds slots 0..2, class "hi" slot 2.
    (if b.class.0 == 0 { 0 } else { 2 }) + b.index as usize
}

fn model(readers: usize) {
    loom::model(move || {
        let pool = ExpertPool::new(&PoolConfig::new(vec![
            ClassSpec::new("lo", 64, 2),
            ClassSpec::new("hi", 128, 1),
        ]))
        .unwrap();
        let (lo, hi) = (pool.class_id("lo").unwrap(), pool.class_id("hi").unwrap());
        let pool = Arc::new(Mutex::new(pool));
        let table = Arc::new(
            ExpertTable::new(
                pool,
                vec![LayerTiers {
                    experts: 1,
                    tiers: vec![vec![lo], vec![hi]],
                }],
                None,
                std::sync::Arc::new(SyncUses) as std::sync::Arc<dyn UseFence>,
            )
            .unwrap(),
        );
        let blocks = Arc::new(Blocks((0..3).map(|_| UnsafeCell::new(0)).collect()));
        let first = table.published(0, 0).unwrap();
        blocks.0[global_slot(&first.block)].with_mut(|p| unsafe { *p = 1 });

        let handles: Vec<_> = (0..readers)
            .map(|_| {
                let (table, blocks) = (table.clone(), blocks.clone());
                thread::spawn(move || {
                    let lease = table.lease(0, 0).unwrap();
                    let v = lease.version();
                    let seen = blocks.0[lease.slot() as usize].with(|p| unsafe { *p });
                    assert_eq!(seen, v.version, "reader saw another version's bytes");
                })
            })
            .collect();

        // The migrating writer: lo -> hi -> lo.
        for (to, version) in [(1u8, 2u32), (0, 3)] {
            let t = table.begin(0, 0, to).unwrap();
            blocks.0[global_slot(&t.block)].with_mut(|p| unsafe { *p = version });
            assert_eq!(table.complete(t.ticket).unwrap().version, version);
        }
        for h in handles {
            h.join().unwrap();
        }
        table.reclaim();
        assert_eq!(table.stats().retired_waiting, 0);
    });
}

/// The transfer engine's completion path: a copy worker writes the reserved block and
/// flags completion (release); a completer thread observes the flag (acquire), publishes
/// and reclaims; a reader leases concurrently. The reader must see either the old version
/// with its bytes or the new version with the copied bytes, never a half-written block,
/// and the old block must not be reclaimed under its lease.
#[test]
fn copy_worker_completion_vs_reader() {
    use loom::sync::atomic::{AtomicU8, Ordering};
    loom::model(|| {
        let pool = ExpertPool::new(&PoolConfig::new(vec![
            ClassSpec::new("lo", 64, 2),
            ClassSpec::new("hi", 128, 1),
        ]))
        .unwrap();
        let (lo, hi) = (pool.class_id("lo").unwrap(), pool.class_id("hi").unwrap());
        let table = Arc::new(
            ExpertTable::new(
                Arc::new(Mutex::new(pool)),
                vec![LayerTiers {
                    experts: 1,
                    tiers: vec![vec![lo], vec![hi]],
                }],
                None,
                std::sync::Arc::new(SyncUses) as std::sync::Arc<dyn UseFence>,
            )
            .unwrap(),
        );
        let blocks = Arc::new(Blocks((0..3).map(|_| UnsafeCell::new(0)).collect()));
        let first = table.published(0, 0).unwrap();
        blocks.0[global_slot(&first.block)].with_mut(|p| unsafe { *p = 1 });
        let t = table.begin(0, 0, 1).unwrap();
        let done = Arc::new(AtomicU8::new(0));

        let worker = {
            let (blocks, done) = (blocks.clone(), done.clone());
            let slot = global_slot(&t.block);
            thread::spawn(move || {
                blocks.0[slot].with_mut(|p| unsafe { *p = 2 });
                done.store(1, Ordering::Release);
            })
        };
        let reader = {
            let (table, blocks) = (table.clone(), blocks.clone());
            thread::spawn(move || {
                let lease = table.lease(0, 0).unwrap();
                let seen = blocks.0[lease.slot() as usize].with(|p| unsafe { *p });
                assert_eq!(seen, lease.version().version);
            })
        };
        // The completer (the engine's pump): publish only after the copy is flagged done.
        while done.load(Ordering::Acquire) == 0 {
            thread::yield_now();
        }
        assert_eq!(table.complete(t.ticket).unwrap().version, 2);
        worker.join().unwrap();
        reader.join().unwrap();
        table.reclaim();
        assert_eq!(table.stats().retired_waiting, 0);
    });
}

#[test]
fn one_reader_vs_migrating_writer() {
    model(1);
}

#[test]
fn two_readers_vs_migrating_writer() {
    model(2);
}
