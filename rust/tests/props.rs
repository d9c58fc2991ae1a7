//! Property tests: random operation sequences against the shadow model (the same
//! interpreter the fuzz target runs), determinism, and the layout sizing rule.
#![cfg(not(loom))]

use dynaexq::{plan_layout, shadow, Error, ExpertPool, HotSlots, LayerShape, LayoutRequest};
use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    /// Every invariant of the shadow model holds after every operation, and replaying
    /// the same operations hands out the same offsets.
    #[test]
    fn shadow_model_and_determinism(data in proptest::collection::vec(any::<u8>(), 0..600)) {
        let first = shadow::run(&data);
        let second = shadow::run(&data);
        prop_assert_eq!(first, second);
    }

    /// A layout either fits the budget exactly as the formula says, or the error names
    /// the exact number of missing bytes.
    #[test]
    fn layout_fits_or_says_what_is_missing(
        layers in proptest::collection::vec((1u32..40, 1u64..5000, 1u64..20000), 1..5),
        budget in 1u64..2_000_000,
        frac in 0.0f64..=1.0,
        staging in 0u32..5,
    ) {
        let req = LayoutRequest {
            budget,
            layers: layers.iter().map(|&(experts, lo_bytes, hi_bytes)| LayerShape { experts, lo_bytes, hi_bytes }).collect(),
            hot: HotSlots::Fraction(frac),
            staging,
            alignment: 256,
        };
        let r = |x: u64| x.div_ceil(256) * 256;
        let resident: u64 = layers.iter().map(|&(e, lo, hi)| {
            let hot = (frac * e as f64).floor() as u64;
            hot * r(hi) + (e as u64 - hot) * r(lo)
        }).sum();
        let max_hi = layers.iter().map(|l| r(l.2)).max().unwrap();
        let need = resident + staging as u64 * max_hi;
        match plan_layout(&req) {
            Ok(layout) => {
                prop_assert!(need <= budget);
                prop_assert_eq!(layout.total_bytes, need);
                let pool = ExpertPool::new_virtual(&layout.pool_config()).unwrap();
                prop_assert_eq!(pool.total_bytes(), need);
                let slots: u64 = layout.classes.iter().map(|c| c.slots as u64).sum();
                let experts: u64 = layers.iter().map(|l| l.0 as u64).sum();
                prop_assert_eq!(slots, experts + staging as u64);
            }
            Err(Error::BudgetTooSmall { missing, needed, .. }) => {
                prop_assert!(needed > budget);
                prop_assert_eq!(missing, needed - budget);
                let minimum: u64 = layers.iter().map(|&(e, lo, _)| e as u64 * r(lo)).sum();
                prop_assert!(needed == need || needed == minimum);
            }
            Err(e) => prop_assert!(false, "unexpected error {e}"),
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    /// Random interleavings of submit / complete / fail / cancel / lease / release /
    /// reclaim on the transfer engine (deterministic manual backend): contents always
    /// match the host store, versions move exactly as reported, no block is lost.
    #[test]
    fn transfer_interleavings(data in proptest::collection::vec(any::<u8>(), 0..600)) {
        shadow::run_transfer(&data);
    }
}

/// The random scenarios above are not vacuous: over fixed pseudo-random inputs the
/// interpreter completes, fails, cancels and rejects transfers.
#[test]
fn transfer_scenarios_exercise_every_outcome() {
    let mut seed = 12345u64;
    let (mut completed, mut failed, mut cancelled, mut rejected) = (0, 0, 0, 0);
    for _ in 0..100 {
        let data: Vec<u8> = (0..400)
            .map(|_| {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (seed >> 56) as u8
            })
            .collect();
        let s = shadow::run_transfer(&data);
        completed += s.completed;
        failed += s.failed;
        cancelled += s.cancelled;
        rejected += s.rejected;
    }
    println!("completed {completed} failed {failed} cancelled {cancelled} rejected {rejected}");
    assert!(completed > 100 && failed > 10 && cancelled > 10 && rejected > 0);
}
