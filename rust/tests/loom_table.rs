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

/// One expert, tier 0 in class "lo" (2 slots: slots 0-1), tier 1 in "hi" (slot 2),
/// published at tier 0 with version 1's bytes (1) in its block; and the block contents.
fn one_expert(fence: std::sync::Arc<dyn UseFence>) -> (Arc<ExpertTable>, Arc<Blocks>) {
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
            fence,
        )
        .unwrap(),
    );
    let blocks = Arc::new(Blocks((0..3).map(|_| UnsafeCell::new(0)).collect()));
    let first = table.published(0, 0).unwrap();
    blocks.0[global_slot(&first.block)].with_mut(|p| unsafe { *p = 1 });
    (table, blocks)
}

fn model(readers: usize) {
    loom::model(move || {
        let (table, blocks) =
            one_expert(std::sync::Arc::new(SyncUses) as std::sync::Arc<dyn UseFence>);

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
            blocks.0[global_slot(&t.block())].with_mut(|p| unsafe { *p = version });
            assert_eq!(table.complete(t).unwrap().version, version);
        }
        for h in handles {
            h.join().unwrap();
        }
        table.reclaim();
        assert_eq!(table.stats().retired_waiting, 0);
    });
}

/// The transfer engine's completion path, with the engine's own pieces: a copy worker
/// writes the reserved block and flags it done through the real `JobState` (release); the
/// completer polls it through `CopyHandle::state` (acquire) and publishes with the real
/// `completion::settle`, the one function the engine's pump calls; a reader leases
/// concurrently. The reader must see either the old version with its bytes or the new
/// version with the copied bytes, never a half-written block, and the old block must not
/// be reclaimed under its lease.
#[test]
fn copy_worker_completion_vs_reader() {
    use dynaexq::completion::{settle, CopyHandle, CopyState, JobState, Settled};
    loom::model(|| {
        let (table, blocks) =
            one_expert(std::sync::Arc::new(SyncUses) as std::sync::Arc<dyn UseFence>);
        table.seal();
        let t = table.begin(0, 0, 1).unwrap();
        let job = Arc::new(JobState::default());

        let worker = {
            let (blocks, job) = (blocks.clone(), job.clone());
            let slot = global_slot(&t.block());
            thread::spawn(move || {
                blocks.0[slot].with_mut(|p| unsafe { *p = 2 });
                job.set_done();
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
        // The completer (the engine's pump): settle only once the copy reports done.
        let state = loop {
            match job.state() {
                CopyState::Pending => thread::yield_now(),
                s => break s,
            }
        };
        match settle(&table, t, state, false) {
            Settled::Published(v) => assert_eq!(v.version, 2),
            other => panic!("{other:?}"),
        }
        worker.join().unwrap();
        reader.join().unwrap();
        table.reclaim();
        assert_eq!(table.stats().retired_waiting, 0);
    });
}

/// Two threads record uses of one slot on the ordered use fence (the code the CUDA fence
/// runs, over a manual stream) while a third signals the stream: afterwards the slot's
/// uses count as completed exactly when every mark placed was reached. The old fence
/// (one "last" event per slot, recorded and stored in two steps) could keep the earlier
/// use as the last one and report completion while the later one still ran.
#[test]
fn two_threads_recording_uses_on_the_fence() {
    use dynaexq::{ManualStream, OrderedUses};
    loom::model(|| {
        let fence = Arc::new(OrderedUses::new(
            2,
            ManualStream::default(),
            std::time::Duration::ZERO,
        ));
        let recorders: Vec<_> = (0..2)
            .map(|_| {
                let f = fence.clone();
                thread::spawn(move || f.record_use(0))
            })
            .collect();
        let signaller = {
            let f = fence.clone();
            thread::spawn(move || f.with_stream(ManualStream::signal))
        };
        for h in recorders {
            h.join().unwrap();
        }
        signaller.join().unwrap();
        let idle = fence.with_stream(ManualStream::idle);
        assert_eq!(fence.uses_completed(0), idle);
        assert!(fence.uses_completed(1));
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

/// The device executor's step protocol (issue 20): a "device" thread pins a step (leases
/// every published version, reads the table image), records the step's use mark and
/// releases the leases, then its "kernel" reads the block the image pointed at, and only
/// then does the stream complete (signal). Meanwhile the writer migrates the expert twice,
/// the second migration reusing the first one's reclaimed block. The kernel's read must
/// never race with a write into the block it reads (loom checks the cells), and it must
/// see the bytes of the version its image held.
#[test]
fn device_step_image_vs_migrating_writer() {
    use dynaexq::ManualFence;
    loom::model(|| {
        let fence = std::sync::Arc::new(ManualFence::new(3));
        let (table, blocks) = one_expert(fence.clone() as std::sync::Arc<dyn UseFence>);
        table.seal();

        let device = {
            let (table, blocks, fence) = (table.clone(), blocks.clone(), fence.clone());
            thread::spawn(move || {
                let pin = table.pin_step();
                let (slot, version) = {
                    let v = pin.versions()[0];
                    (pin.image().next().unwrap().1, v.version)
                };
                pin.record(); // the step is enqueued: its leases go, its mark stays
                let seen = blocks.0[slot as usize].with(|p| unsafe { *p });
                assert_eq!(seen, version, "the kernel read another version's bytes");
                fence.signal(); // the stream passed the step
            })
        };
        for (to, version) in [(1u8, 2u32), (0, 3)] {
            let t = match table.begin(0, 0, to) {
                Ok(t) => t,
                // The block the device step still reads is not free yet: wait for it.
                Err(_) => loop {
                    table.reclaim();
                    if let Ok(t) = table.begin(0, 0, to) {
                        break t;
                    }
                    thread::yield_now();
                },
            };
            blocks.0[global_slot(&t.block())].with_mut(|p| unsafe { *p = version });
            assert_eq!(table.complete(t).unwrap().version, version);
        }
        device.join().unwrap();
        table.reclaim();
        assert_eq!(table.stats().retired_waiting, 0);
    });
}
