//! The device executor's step protocol (issue 20) as a property: random interleavings of
//! preparing a step (pin every published version, read the table image), enqueueing it
//! (one use mark for the image, leases released), the stream completing enqueued steps,
//! migrations and reclaims. After every operation, every block that a prepared or enqueued
//! but not yet completed step points at is still live with the generation the image saw:
//! never freed, never handed to another expert.
#![cfg(not(loom))]

use std::sync::{Arc, Mutex};

use dynaexq::{
    ClassSpec, ExpertPool, ExpertTable, LayerTiers, ManualFence, PoolConfig, UseFence, Version,
};
use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn no_block_is_reused_under_a_step_that_may_still_read_it(
        ops in prop::collection::vec((0u8..6, any::<u8>()), 1..120),
        hot in 1u32..3,
        staging in 1u32..3,
    ) {
        let experts = 4u32;
        let pool = ExpertPool::new(&PoolConfig::new(vec![
            ClassSpec::new("lo", 64, experts + staging),
            ClassSpec::new("hi", 256, hot + staging),
        ]))
        .unwrap();
        let (lo, hi) = (pool.class_id("lo").unwrap(), pool.class_id("hi").unwrap());
        let pool = Arc::new(Mutex::new(pool));
        let fence = Arc::new(ManualFence::new(2 * experts + 2 * staging + hot));
        let table = ExpertTable::new(
            pool.clone(),
            vec![LayerTiers { experts, tiers: vec![vec![lo], vec![hi]] }],
            None,
            fence.clone() as Arc<dyn UseFence>,
        )
        .unwrap();
        let mut prepared = Vec::new();
        let mut enqueued: Vec<Vec<Version>> = Vec::new();
        for (op, arg) in ops {
            match op {
                0 => prepared.push(table.pin_step()),
                1 => {
                    if !prepared.is_empty() {
                        let pin = prepared.remove(arg as usize % prepared.len());
                        enqueued.push(pin.versions());
                        pin.record();
                    }
                }
                2 => {
                    fence.signal();
                    enqueued.clear();
                }
                3 | 4 => {
                    let e = arg as u32 % experts;
                    let to = 1 - table.published(0, e).unwrap().tier;
                    if let Ok(t) = table.begin(0, e, to) {
                        if op == 3 {
                            table.complete(t).unwrap();
                        } else {
                            table.abort(t).unwrap();
                        }
                    }
                }
                _ => {
                    table.reclaim();
                }
            }
            let p = pool.lock().unwrap();
            for v in prepared.iter().flat_map(|s| s.versions()).chain(enqueued.iter().flatten().copied()) {
                prop_assert!(p.is_live(&v.block), "a block under a step was freed or reused: {v:?}");
            }
        }
        drop(prepared);
        fence.signal();
        table.reclaim();
        prop_assert_eq!(table.stats().retired_waiting, 0);
    }
}
