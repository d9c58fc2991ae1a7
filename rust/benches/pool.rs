//! Criterion benches of the core's hot paths: a pool alloc+free pair, a lease+release on
//! the lock-free read path, and a full transition (begin + complete, i.e. reserve,
//! publish, retire and reclaim). Figures are reported, never asserted.
//!
//!   cargo bench -p dynaexq --bench pool

use std::hint::black_box;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use dynaexq::{ClassSpec, ExpertPool, ExpertTable, LayerTiers, PoolConfig, SyncUses, UseFence};

fn pool_config() -> PoolConfig {
    PoolConfig::new(vec![
        ClassSpec::new("lo", 3 << 20, 128),
        ClassSpec::new("hi", 12 << 20, 32),
        ClassSpec::new("staging", 12 << 20, 4),
    ])
}

fn benches(c: &mut Criterion) {
    // Virtual arena: the pool's bookkeeping is what is measured, not page faults.
    let mut pool = ExpertPool::new_virtual(&pool_config()).unwrap();
    let lo = pool.class_id("lo").unwrap();
    // Half-full class so the bitmap search is not trivially at index 0.
    let keep: Vec<_> = (0..64).map(|_| pool.alloc(lo).unwrap()).collect();
    c.bench_function("pool alloc+free pair", |b| {
        b.iter(|| {
            let blk = pool.alloc(black_box(lo)).unwrap();
            pool.free(black_box(blk)).unwrap();
        })
    });
    drop(keep);

    let pool = ExpertPool::new_virtual(&pool_config()).unwrap();
    let (lo, hi, st) = (
        pool.class_id("lo").unwrap(),
        pool.class_id("hi").unwrap(),
        pool.class_id("staging").unwrap(),
    );
    let table = ExpertTable::new(
        Arc::new(Mutex::new(pool)),
        vec![LayerTiers {
            experts: 128,
            tiers: vec![vec![lo, st], vec![hi, st]],
        }],
        None,
        Arc::new(SyncUses) as Arc<dyn UseFence>,
    )
    .unwrap();
    c.bench_function("lease+release", |b| {
        b.iter(|| {
            let lease = table.lease(0, black_box(7)).unwrap();
            black_box(lease.slot());
        })
    });
    let mut to = 1u8;
    c.bench_function(
        "transition begin+complete (publish, retire, reclaim)",
        |b| {
            b.iter(|| {
                let t = table.begin(0, black_box(9), to).unwrap();
                black_box(table.complete(t).unwrap());
                to = 1 - to;
            })
        },
    );
}

criterion_group! {
    name = core;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = benches
}
criterion_main!(core);
