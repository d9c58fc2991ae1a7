//! Concurrency stress on real threads: readers lease and checksum blocks while a writer
//! migrates experts between tiers; no reader may see a torn or reclaimed version.
#![cfg(not(loom))]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use dynaexq::{
    ClassSpec, Error, ExpertPool, ExpertTable, LayerTiers, ManualFence, PoolConfig, SyncUses,
    UseFence,
};

/// Fill a block with a pattern derived from (expert, version).
fn fill(buf: &mut [u8], expert: u32, version: u32) {
    let seed = expert.wrapping_mul(2654435761) ^ version.wrapping_mul(40503);
    for (i, b) in buf.iter_mut().enumerate() {
        *b = (seed.wrapping_add(i as u32 * 31) >> 3) as u8;
    }
}

fn expected(len: usize, expert: u32, version: u32) -> Vec<u8> {
    let mut v = vec![0; len];
    fill(&mut v, expert, version);
    v
}

#[test]
fn readers_never_see_reclaimed_or_unpublished_blocks() {
    let experts = 6u32;
    let cfg = PoolConfig::new(vec![
        ClassSpec::new("lo", 512, experts),
        ClassSpec::new("hi", 2048, 2),
        ClassSpec::new("staging", 2048, 2),
    ]);
    let pool = ExpertPool::new(&cfg).unwrap();
    let (lo, hi, st) = (
        pool.class_id("lo").unwrap(),
        pool.class_id("hi").unwrap(),
        pool.class_id("staging").unwrap(),
    );
    let pool = Arc::new(Mutex::new(pool));
    let table = Arc::new(
        ExpertTable::new(
            pool.clone(),
            vec![LayerTiers {
                experts,
                tiers: vec![vec![lo, st], vec![hi, st]],
            }],
            None,
            Arc::new(SyncUses) as Arc<dyn UseFence>,
        )
        .unwrap(),
    );
    let write = |b: &dynaexq::Block, e: u32, v: u32| {
        let p = pool.lock().unwrap();
        let ptr = p.host_ptr(b).unwrap().unwrap();
        // SAFETY: `b` is a pending (unpublished) block owned by this writer; no reader
        // can lease it until `complete` publishes it.
        let buf = unsafe { std::slice::from_raw_parts_mut(ptr.as_ptr(), b.nbytes as usize) };
        fill(buf, e, v);
    };
    for e in 0..experts {
        write(&table.published(0, e).unwrap().block, e, 1);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = (0..3)
        .map(|r| {
            let (table, stop) = (table.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut n = 0u64;
                let mut e = r;
                while !stop.load(Ordering::Relaxed) || n < 1000 {
                    e = (e + 1) % experts;
                    let lease = table.lease(0, e).unwrap();
                    let v = lease.version();
                    let bytes = lease.bytes().unwrap();
                    assert_eq!(
                        bytes,
                        &expected(bytes.len(), e, v.version)[..],
                        "expert {e} v{}",
                        v.version
                    );
                    n += 1;
                }
                n
            })
        })
        .collect();
    let mut moves = 0;
    for i in 0..3000u32 {
        let e = i.wrapping_mul(7) % experts;
        let to = 1 - table.published(0, e).unwrap().tier;
        match table.begin(0, e, to) {
            Ok(t) => {
                let v = table.published(0, e).unwrap().version + 1;
                write(&t.block(), e, v);
                if i % 11 == 0 {
                    table.abort(t).unwrap();
                } else {
                    assert_eq!(table.complete(t).unwrap().version, v);
                    moves += 1;
                }
            }
            Err(Error::Exhausted { .. }) => {
                table.reclaim();
            }
            Err(e) => panic!("{e}"),
        }
    }
    stop.store(true, Ordering::Relaxed);
    let reads: u64 = readers.into_iter().map(|h| h.join().unwrap()).sum();
    assert!(moves > 1000 && reads >= 3000);
    table.reclaim();
    assert_eq!(table.stats().retired_waiting, 0);
    drop(table);
    assert_eq!(pool.lock().unwrap().reserved_bytes(), 0, "no block lost");
}

#[test]
fn retire_rule_needs_no_lease_and_completed_use() {
    let pool = ExpertPool::new(&PoolConfig::new(vec![
        ClassSpec::new("lo", 256, 2),
        ClassSpec::new("hi", 1024, 2),
    ]))
    .unwrap();
    let (lo, hi) = (pool.class_id("lo").unwrap(), pool.class_id("hi").unwrap());
    let pool = Arc::new(Mutex::new(pool));
    let fence = Arc::new(ManualFence::new(4));
    let table = ExpertTable::new(
        pool.clone(),
        vec![LayerTiers {
            experts: 1,
            tiers: vec![vec![lo], vec![hi]],
        }],
        None,
        fence.clone() as Arc<dyn UseFence>,
    )
    .unwrap();
    let lease = table.lease(0, 0).unwrap();
    lease.record_use();
    let old = lease.version();
    // Freeing a table block is refused (leased or not: the retire rule frees it).
    assert!(matches!(
        pool.lock().unwrap().free(old.block),
        Err(Error::OwnedByTable { .. })
    ));
    let t = table.begin(0, 0, 1).unwrap();
    assert!(matches!(
        table.begin(0, 0, 0),
        Err(Error::IllegalTransition { .. })
    ));
    // Not visible until complete.
    assert_eq!(table.published(0, 0).unwrap().version, 1);
    let new = table.complete(t).unwrap();
    assert_eq!((new.tier, new.version), (1, 2));
    assert_eq!(table.lease(0, 0).unwrap().version(), new);
    // Leased: not reclaimed.
    assert!(table.reclaim().is_empty());
    drop(lease);
    // Lease gone, but the recorded use has not completed.
    assert!(table.reclaim().is_empty());
    assert!(pool.lock().unwrap().is_live(&old.block));
    fence.signal();
    assert_eq!(table.reclaim(), vec![old.block]);
    assert!(!pool.lock().unwrap().is_live(&old.block));
    // Rollback keeps the old version and returns the reserved block.
    let t = table.begin(0, 0, 0).unwrap();
    let before = pool.lock().unwrap().reserved_bytes();
    table.abort(t).unwrap();
    assert_eq!(pool.lock().unwrap().reserved_bytes(), before - 256);
    assert_eq!(table.published(0, 0).unwrap(), new);
}
