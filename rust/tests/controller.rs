//! The controller: hotness signals against naive references, the planner's invariants
//! (capacity, hysteresis, rate and in-flight limits, busy experts), and the knapsack
//! against brute force.

use dynaexq::controller::{
    assignment_value, knapsack_exact, knapsack_greedy, plan, plan_with_uncertainty, Capacity,
    HotnessTracker, Plan, PlanInput, PlannerConfig, Signal, Uncertainty,
};
use proptest::prelude::*;

fn two_tier_input<'a>(
    scores: &'a [f32],
    current: &'a [u8],
    busy: &'a [bool],
    capacity: &'a Capacity,
    layers: usize,
) -> PlanInput<'a> {
    PlanInput {
        layers,
        experts: scores.len() / layers,
        scores,
        current,
        busy,
        tier_bytes: &[100, 400],
        gain: None,
        capacity,
        in_flight: 0,
    }
}

fn apply(current: &[u8], plan: &Plan, experts: usize) -> Vec<u8> {
    let mut next = current.to_vec();
    for t in &plan.transitions {
        let i = t.layer as usize * experts + t.expert as usize;
        assert_eq!(
            next[i], t.from,
            "a transition starts from the expert's tier"
        );
        next[i] = t.to;
    }
    next
}

#[test]
fn initial_fill_takes_the_top_n_without_hysteresis() {
    let scores = [0.1, 0.5, 0.3, 0.0, 0.2, 0.4];
    let current = [0u8; 6];
    let busy = [false; 6];
    let cap = Capacity::PerLayer(vec![6, 2]);
    let cfg = PlannerConfig {
        delta: 1.0,
        ..Default::default()
    };
    let p = plan(&two_tier_input(&scores, &current, &busy, &cap, 1), &cfg).unwrap();
    assert_eq!(p.target, vec![0, 1, 0, 0, 0, 1]);
    assert_eq!(p.transitions.len(), 2);
    assert!(p
        .transitions
        .iter()
        .all(|t| t.is_promotion() && t.bytes == 400));
}

#[test]
fn hysteresis_keeps_an_incumbent_until_beaten_by_more_than_delta() {
    let current = [1u8, 0, 0, 0];
    let busy = [false; 4];
    let cap = Capacity::PerLayer(vec![4, 1]);
    let cfg = PlannerConfig {
        delta: 0.05,
        ..Default::default()
    };
    // Outsider better by 0.04 < delta: nothing moves.
    let scores = [0.30, 0.34, 0.1, 0.1];
    let p = plan(&two_tier_input(&scores, &current, &busy, &cap, 1), &cfg).unwrap();
    assert!(p.transitions.is_empty());
    assert_eq!(p.target, current.to_vec());
    // Better by 0.06 > delta: a demote-then-promote pair.
    let scores = [0.30, 0.36, 0.1, 0.1];
    let p = plan(&two_tier_input(&scores, &current, &busy, &cap, 1), &cfg).unwrap();
    assert_eq!(p.transitions.len(), 2);
    assert_eq!((p.transitions[0].expert, p.transitions[0].to), (0, 0));
    assert_eq!((p.transitions[1].expert, p.transitions[1].to), (1, 1));
}

#[test]
fn moves_only_when_they_pay() {
    // One hot slot held by expert 0 (score 0.30); expert 1 is better by 0.06 (the pair
    // gains 0.06 x tier value 1). The pair copies 400 + 100 bytes (two_tier_input).
    let current = [1u8, 0, 0, 0];
    let busy = [false; 4];
    let cap = Capacity::PerLayer(vec![4, 1]);
    let scores = [0.30, 0.36, 0.1, 0.1];
    let input = two_tier_input(&scores, &current, &busy, &cap, 1);
    let bytes: u64 = input.tier_bytes.iter().sum();
    for (per_byte, moves) in [(0.0, 2), (0.05 / bytes as f32, 2), (0.07 / bytes as f32, 0)] {
        let cfg = PlannerConfig {
            delta: 0.0,
            min_gain_per_byte: per_byte,
            ..Default::default()
        };
        let p = plan(&input, &cfg).unwrap();
        assert_eq!(p.transitions.len(), moves, "min gain per byte {per_byte}");
        // Dropped, not deferred: the target still names the better expert.
        assert_eq!(p.target, vec![0, 1, 0, 0]);
        assert_eq!(p.deferred, 0);
    }
}

#[test]
fn moves_only_when_they_pay_beyond_the_signal_noise() {
    // The pair of moves_only_when_they_pay gains 0.06. With standard errors of 0.02 on
    // both experts' scores the gain's is sqrt(2) x 0.02 = 0.028: z = 1 keeps the pair
    // (0.06 - 0.028 > 0), z = 3 drops it (0.06 - 0.085 < 0); the same errors on experts
    // that do not move change nothing; and a byte price stacks on top of the discount.
    let current = [1u8, 0, 0, 0];
    let busy = [false; 4];
    let cap = Capacity::PerLayer(vec![4, 1]);
    let scores = [0.30, 0.36, 0.1, 0.1];
    let input = two_tier_input(&scores, &current, &busy, &cap, 1);
    let bytes: u64 = input.tier_bytes.iter().sum();
    let noisy = [0.02f32, 0.02, 0.0, 0.0];
    let bystanders = [0.0f32, 0.0, 1.0, 1.0];
    for (std, z, per_byte, moves) in [
        (&noisy, 1.0, 0.0, 2),
        (&noisy, 3.0, 0.0, 0),
        (&bystanders, 3.0, 0.0, 2),
        (&noisy, 1.0, 0.02 / bytes as f32, 2),
        (&noisy, 1.0, 0.04 / bytes as f32, 0),
        (&noisy, 0.0, 0.0, 2),
    ] {
        let cfg = PlannerConfig {
            delta: 0.0,
            min_gain_per_byte: per_byte,
            ..Default::default()
        };
        let u = Uncertainty {
            score_std: std,
            gain_std: None,
            z,
        };
        let p = plan_with_uncertainty(&input, &cfg, Some(u)).unwrap();
        assert_eq!(
            p.transitions.len(),
            moves,
            "std {std:?} z {z} per byte {per_byte}"
        );
        assert_eq!(p.target, vec![0, 1, 0, 0]);
    }
    // Without an uncertainty it is `plan`.
    let cfg = PlannerConfig {
        delta: 0.0,
        ..Default::default()
    };
    assert_eq!(
        plan_with_uncertainty(&input, &cfg, None).unwrap(),
        plan(&input, &cfg).unwrap()
    );
    // Wrong lengths and negative errors are refused.
    let short = [0.0f32; 3];
    let bad = Uncertainty {
        score_std: &short,
        gain_std: None,
        z: 1.0,
    };
    assert!(plan_with_uncertainty(&input, &cfg, Some(bad)).is_err());
    let neg = [-1.0f32, 0.0, 0.0, 0.0];
    let bad = Uncertainty {
        score_std: &neg,
        gain_std: None,
        z: 1.0,
    };
    assert!(plan_with_uncertainty(&input, &cfg, Some(bad)).is_err());
}

#[test]
fn moves_only_when_they_pay_beyond_the_tier_values_noise() {
    // The same pair (gain 0.06), the routing known exactly, but each expert's loss at the
    // low tier known only to 0.1 per unit of score: the gain's standard error is
    // sqrt(0.36^2 + 0.30^2) x 0.1 = 0.047, so z = 1 keeps the pair and z = 2 drops it.
    // Errors at the top tier alone count (its loss is the reference, 0) only if given.
    let current = [1u8, 0, 0, 0];
    let busy = [false; 4];
    let cap = Capacity::PerLayer(vec![4, 1]);
    let scores = [0.30, 0.36, 0.1, 0.1];
    let input = two_tier_input(&scores, &current, &busy, &cap, 1);
    let exact = [0.0f32; 4];
    let low_tier = [0.1f32, 0.0, 0.1, 0.0, 0.1, 0.0, 0.1, 0.0]; // experts x tiers
    let others = [0.0f32, 0.0, 0.0, 0.0, 1.0, 0.0, 1.0, 0.0];
    let cfg = PlannerConfig {
        delta: 0.0,
        ..Default::default()
    };
    for (gain_std, z, moves) in [
        (Some(&low_tier[..]), 1.0, 2),
        (Some(&low_tier[..]), 2.0, 0),
        (Some(&others[..]), 2.0, 2),
        (None, 2.0, 2),
    ] {
        let u = Uncertainty {
            score_std: &exact,
            gain_std,
            z,
        };
        let p = plan_with_uncertainty(&input, &cfg, Some(u)).unwrap();
        assert_eq!(p.transitions.len(), moves, "gain std {gain_std:?} z {z}");
        assert_eq!(p.target, vec![0, 1, 0, 0]);
    }
    // One value per expert and tier, finite and >= 0.
    for bad in [&[0.1f32; 4][..], &[-0.1f32; 8][..], &[f32::NAN; 8][..]] {
        let u = Uncertainty {
            score_std: &exact,
            gain_std: Some(bad),
            z: 1.0,
        };
        assert!(plan_with_uncertainty(&input, &cfg, Some(u)).is_err());
    }
}

#[test]
fn sequential_moves_demote_through_free_slots_then_promote() {
    // Three tiers, one layer of 4 experts: tier 2 holds expert 0, tier 1 expert 1, tier 0
    // experts 2 and 3 plus one spare (staging) slot. The signal wants expert 1 at the top
    // and expert 0 at tier 1, which is full: a capacity-neutral pair would deadlock (the
    // demotion needs expert 1's tier-1 slot, free only once expert 1 has moved up).
    let scores = [0.30, 0.60, 0.05, 0.05];
    let mut current = vec![2u8, 1, 0, 0];
    let busy = [false; 4];
    let cap = Capacity::PerLayer(vec![3, 1, 1]);
    let tier_bytes = [10u64, 20, 40];
    let cfg = PlannerConfig {
        delta: 0.0,
        sequential: true,
        ..Default::default()
    };
    let input = |current: &[u8]| PlanInput {
        layers: 1,
        experts: 4,
        scores: &scores,
        current: &current.to_vec().leak()[..],
        busy: &busy,
        tier_bytes: &tier_bytes,
        gain: None,
        capacity: &cap,
        in_flight: 0,
    };
    // First plan: only the demotion, to tier 0 (its wanted tier 1 has no free slot).
    let p = plan(&input(&current), &cfg).unwrap();
    let moves: Vec<_> = p.transitions.iter().map(|t| (t.expert, t.to)).collect();
    assert_eq!(moves, vec![(0, 0)]);
    current[0] = 0;
    // Next plan: the freed top slot takes expert 1; then expert 0 climbs into tier 1.
    let p = plan(&input(&current), &cfg).unwrap();
    let moves: Vec<_> = p.transitions.iter().map(|t| (t.expert, t.to)).collect();
    assert_eq!(moves, vec![(1, 2)]);
    current[1] = 2;
    let p = plan(&input(&current), &cfg).unwrap();
    let moves: Vec<_> = p.transitions.iter().map(|t| (t.expert, t.to)).collect();
    assert_eq!(moves, vec![(0, 1)]);
    // Without sequential moves the same start is planned as one capacity-neutral pair.
    let cfg = PlannerConfig {
        sequential: false,
        ..cfg
    };
    let p = plan(&input(&[2, 1, 0, 0]), &cfg).unwrap();
    let moves: Vec<_> = p.transitions.iter().map(|t| (t.expert, t.to)).collect();
    assert_eq!(moves, vec![(0, 1), (1, 2)]);
}

#[test]
fn rate_limit_defers_pairs_whole() {
    let scores = [0.0, 0.0, 0.9, 0.8];
    let current = [1u8, 1, 0, 0];
    let busy = [false; 4];
    let cap = Capacity::PerLayer(vec![4, 2]);
    let cfg = PlannerConfig {
        delta: 0.0,
        max_transitions: 3,
        ..Default::default()
    };
    let p = plan(&two_tier_input(&scores, &current, &busy, &cap, 1), &cfg).unwrap();
    // Two pairs wanted, only one fits in 3 transitions; the better one goes first.
    assert_eq!(p.transitions.len(), 2);
    assert_eq!(p.transitions[1].expert, 2);
    assert_eq!(p.deferred, 2);
}

#[test]
fn busy_experts_neither_move_nor_get_displaced() {
    let scores = [0.0, 0.9, 0.8];
    let current = [1u8, 0, 0];
    let busy = [true, false, false];
    let cap = Capacity::PerLayer(vec![3, 1]);
    let p = plan(
        &two_tier_input(&scores, &current, &busy, &cap, 1),
        &PlannerConfig::default(),
    )
    .unwrap();
    assert!(p.transitions.is_empty());
}

#[test]
fn global_capacity_moves_slots_to_the_hotter_layer() {
    // Layer 0 is cold everywhere, layer 1 hot: both global slots end in layer 1.
    let scores = [0.01, 0.02, 0.5, 0.6];
    let current = [1u8, 1, 0, 0];
    let busy = [false; 4];
    let cap = Capacity::Global(vec![4, 2]);
    let p = plan(
        &two_tier_input(&scores, &current, &busy, &cap, 2),
        &PlannerConfig::default(),
    )
    .unwrap();
    assert_eq!(p.target, vec![0, 0, 1, 1]);
}

#[test]
fn bad_inputs_are_errors() {
    let scores = [0.1, 0.2];
    let busy = [false; 2];
    let cap = Capacity::PerLayer(vec![2, 1]);
    let bad_tier = [0u8, 7];
    assert!(plan(
        &two_tier_input(&scores, &bad_tier, &busy, &cap, 1),
        &PlannerConfig::default()
    )
    .is_err());
    let short = [0u8];
    assert!(plan(
        &two_tier_input(&scores, &short, &busy, &cap, 1),
        &PlannerConfig::default()
    )
    .is_err());
    assert!(HotnessTracker::new(0, 4, Signal::Ema { alpha: 0.9 }).is_err());
    assert!(HotnessTracker::new(1, 4, Signal::Ema { alpha: 1.5 }).is_err());
    assert!(HotnessTracker::new(1, 4, Signal::Window { steps: 0 }).is_err());
    let mut t = HotnessTracker::new(1, 4, Signal::Ema { alpha: 0.5 }).unwrap();
    assert!(t.observe(0, &[9], &[1.0], 1).is_err());
    assert!(t.observe(3, &[1], &[1.0], 1).is_err());
    assert!(t.observe(0, &[1, 2], &[1.0], 1).is_err());
    assert!(t.observe_mass(0, &[1.0; 3], 1).is_err());
    assert!(t.observe_mass(1, &[1.0; 4], 1).is_err());
    assert!(t.observe_mass(0, &[1.0, f32::NAN, 0.0, 0.0], 1).is_err());
    assert!(t.observe_mass(0, &[1.0, -1.0, 0.0, 0.0], 1).is_err());
}

fn routing_step() -> impl Strategy<Value = Vec<(u32, f32)>> {
    // One layer, 5 experts, top-1: each token routes to one expert with a probability.
    prop::collection::vec((0u32..5, 0.0f32..1.0), 1..6)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn ema_matches_the_scalar_recurrence(steps in prop::collection::vec(routing_step(), 1..20), alpha in 0.0f32..0.99) {
        let mut t = HotnessTracker::new(1, 5, Signal::Ema { alpha }).unwrap();
        let mut reference = [0f64; 5];
        for step in &steps {
            let ids: Vec<u32> = step.iter().map(|s| s.0).collect();
            let ps: Vec<f32> = step.iter().map(|s| s.1).collect();
            t.observe(0, &ids, &ps, 1).unwrap();
            t.end_step();
            let mut c = [0f64; 5];
            for &(e, p) in step { c[e as usize] += p as f64 / step.len() as f64; }
            for e in 0..5 { reference[e] = alpha as f64 * reference[e] + (1.0 - alpha as f64) * c[e]; }
        }
        for (got, want) in t.scores().iter().zip(reference) {
            prop_assert!((*got as f64 - want).abs() < 1e-4);
        }
    }

    #[test]
    fn summed_mass_is_the_same_observation(steps in prop::collection::vec(routing_step(), 1..12), alpha in 0.0f32..0.99) {
        // A device executor hands over the per-expert sums of a step's picks in one call:
        // the tracker must end up exactly where the picks one by one would take it.
        let mut picks = HotnessTracker::new(1, 5, Signal::Ema { alpha }).unwrap();
        let mut sums = HotnessTracker::new(1, 5, Signal::Ema { alpha }).unwrap();
        for step in &steps {
            let ids: Vec<u32> = step.iter().map(|s| s.0).collect();
            let ps: Vec<f32> = step.iter().map(|s| s.1).collect();
            picks.observe(0, &ids, &ps, 1).unwrap();
            let mut mass = [0f32; 5];
            for &(e, p) in step { mass[e as usize] += p; }
            sums.observe_mass(0, &mass, step.len() as u64).unwrap();
            picks.end_step();
            sums.end_step();
        }
        for (a, b) in picks.scores().iter().zip(sums.scores()) {
            prop_assert!((a - b).abs() <= 1e-6 * a.abs().max(1.0));
        }
    }

    #[test]
    fn window_is_the_sum_of_the_last_steps(steps in prop::collection::vec(routing_step(), 1..30), w in 1usize..8) {
        let mut t = HotnessTracker::new(1, 5, Signal::Window { steps: w }).unwrap();
        let mut history: Vec<[f64; 5]> = Vec::new();
        for step in &steps {
            let ids: Vec<u32> = step.iter().map(|s| s.0).collect();
            let ps: Vec<f32> = step.iter().map(|s| s.1).collect();
            t.observe(0, &ids, &ps, 1).unwrap();
            t.end_step();
            let mut c = [0f64; 5];
            for &(e, p) in step { c[e as usize] += p as f64 / step.len() as f64; }
            history.push(c);
        }
        let start = history.len().saturating_sub(w);
        for e in 0..5 {
            let want: f64 = history[start..].iter().map(|c| c[e]).sum();
            prop_assert!((t.scores()[e] as f64 - want).abs() < 1e-4);
        }
    }

    #[test]
    fn without_limits_one_plan_reaches_its_target_in_two_tiers(
        scores in prop::collection::vec(0.0f32..1.0, 2..12),
        hot in 0usize..6,
        delta in 0.0f32..0.1,
        start in prop::collection::vec(any::<bool>(), 12),
    ) {
        let e = scores.len();
        let hot = hot.min(e);
        let mut current = vec![0u8; e];
        let mut placed = 0;
        for i in 0..e { if start[i] && placed < hot { current[i] = 1; placed += 1; } }
        let busy = vec![false; e];
        let cap = Capacity::PerLayer(vec![e, hot]);
        let cfg = PlannerConfig { delta, max_in_flight: usize::MAX, ..Default::default() };
        let p = plan(&two_tier_input(&scores, &current, &busy, &cap, 1), &cfg).unwrap();
        prop_assert_eq!(apply(&current, &p, e), p.target.clone());
        // Hysteresis: every outsider left out is within delta of the weakest kept incumbent,
        // or beaten by every hot expert.
        let hot_scores: Vec<f32> = (0..e).filter(|&i| p.target[i] == 1).map(|i| scores[i]).collect();
        if hot_scores.len() == hot && hot > 0 {
            let weakest_incumbent = (0..e).filter(|&i| p.target[i] == 1 && current[i] == 1)
                .map(|i| scores[i]).fold(f32::INFINITY, f32::min);
            let weakest_newcomer = (0..e).filter(|&i| p.target[i] == 1 && current[i] == 0)
                .map(|i| scores[i]).fold(f32::INFINITY, f32::min);
            for i in (0..e).filter(|&i| p.target[i] == 0) {
                prop_assert!(scores[i] <= weakest_incumbent + delta + 1e-6);
                prop_assert!(scores[i] <= weakest_newcomer + 1e-6);
            }
        }
    }

    #[test]
    fn exact_knapsack_matches_brute_force(
        values in prop::collection::vec(0.0f32..10.0, 3..=15),
        sizes in (1u64..4, 1u64..4),
        budget in 0u64..40,
    ) {
        let bytes = [1u64, 1 + sizes.0, 1 + sizes.0 + sizes.1];
        let items = values.len() / 3;
        let values = &values[..items * 3];
        let mut best: Option<f64> = None;
        for code in 0..3usize.pow(items as u32) {
            let choice: Vec<u8> = (0..items).map(|i| ((code / 3usize.pow(i as u32)) % 3) as u8).collect();
            let (v, b) = assignment_value(values, &bytes, &choice);
            if b <= budget && best.is_none_or(|x| v > x) { best = Some(v); }
        }
        let exact = knapsack_exact(values, &bytes, budget).unwrap();
        match (best, exact) {
            (None, None) => {}
            (Some(want), Some((choice, got))) => {
                prop_assert!((want - got).abs() < 1e-3);
                let (v, b) = assignment_value(values, &bytes, &choice);
                prop_assert!(b <= budget);
                prop_assert!((v - got).abs() < 1e-3);
            }
            (want, got) => prop_assert!(false, "brute force {:?} vs exact {:?}", want, got),
        }
        // The greedy is feasible and within one item's value range of the optimum.
        let greedy = knapsack_greedy(values, &bytes, budget);
        prop_assert_eq!(greedy.is_some(), best.is_some());
        if let (Some(choice), Some(want)) = (greedy, best) {
            let (v, b) = assignment_value(values, &bytes, &choice);
            prop_assert!(b <= budget);
            let spread = (0..items).map(|i| {
                let row = &values[i * 3..i * 3 + 3];
                row.iter().cloned().fold(f32::MIN, f32::max) - row.iter().cloned().fold(f32::MAX, f32::min)
            }).fold(0f32, f32::max) as f64;
            prop_assert!(v >= want - spread - 1e-3, "greedy {} vs optimum {} (spread {})", v, want, spread);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(PLANNER_CASES))]

    /// Two, three and four tiers, every tier's capacity bounded (tier 0's too, as the pool
    /// bounds it): whatever the plan takes, every tier stays within its slots.
    #[test]
    fn plans_respect_capacity_limits_and_busy_experts(
        layers in 1usize..4,
        experts in 2usize..10,
        seed in prop::collection::vec((0.0f32..1.0, 0u8..4, prop::bool::weighted(0.2)), 40),
        tiers in 2usize..5,
        upper in prop::collection::vec(0usize..4, 3),
        spare in 0usize..3,
        global in any::<bool>(),
        max_transitions in 0usize..12,
        max_in_flight in 0usize..6,
        in_flight in 0usize..3,
        delta in 0.0f32..0.2,
    ) {
        let n = layers * experts;
        let scores: Vec<f32> = (0..n).map(|i| seed[i % seed.len()].0).collect();
        let busy: Vec<bool> = (0..n).map(|i| seed[i % seed.len()].2).collect();
        let scopes: Vec<Vec<usize>> = if global { vec![(0..n).collect()] } else { (0..layers).map(|l| (l * experts..(l + 1) * experts).collect()).collect() };
        // Upper tiers' slots, then a feasible current assignment filling them in index
        // order, then tier 0's slots: what the scopes hold there plus a few spare.
        let mut slots = vec![0usize; tiers];
        for t in 1..tiers {
            slots[t] = if global { upper[t - 1] * layers } else { upper[t - 1].min(experts) };
        }
        let mut current = vec![0u8; n];
        let mut tier0 = 0;
        for members in &scopes {
            let mut room = slots.clone();
            for &i in members {
                let want = seed[(i * 7) % seed.len()].1 as usize % tiers;
                if want > 0 && room[want] > 0 { room[want] -= 1; current[i] = want as u8; }
            }
            tier0 = tier0.max(members.iter().filter(|&&i| current[i] == 0).count());
        }
        slots[0] = tier0 + spare;
        let capacity = if global { Capacity::Global(slots.clone()) } else { Capacity::PerLayer(slots.clone()) };
        let tier_bytes: Vec<u64> = (0..tiers).map(|t| 10u64 << (2 * t)).collect();
        let input = PlanInput { layers, experts, scores: &scores, current: &current, busy: &busy,
            tier_bytes: &tier_bytes, gain: None, capacity: &capacity, in_flight };
        let cfg = PlannerConfig { delta, max_transitions, max_bytes: u64::MAX, max_in_flight, min_gain_per_byte: 0.0, sequential: false };
        let p = plan(&input, &cfg).unwrap();
        prop_assert!(p.transitions.len() <= max_transitions);
        prop_assert!(p.transitions.len() <= max_in_flight.saturating_sub(in_flight));
        let mut seen = std::collections::HashSet::new();
        for t in &p.transitions {
            let i = t.layer as usize * experts + t.expert as usize;
            prop_assert!(!busy[i], "a busy expert was moved");
            prop_assert!(seen.insert(i), "an expert moved twice in one plan");
        }
        let next = apply(&current, &p, experts);
        for members in &scopes {
            for (tier, &cap) in slots.iter().enumerate() {
                let used = members.iter().filter(|&&i| next[i] as usize == tier).count();
                prop_assert!(used <= cap, "tier {} over capacity: {} > {}", tier, used, cap);
            }
        }
        // Target too: never more experts wanted in an upper tier than it has slots.
        for members in &scopes {
            for (tier, &cap) in slots.iter().enumerate().skip(1) {
                prop_assert!(members.iter().filter(|&&i| p.target[i] as usize == tier).count() <= cap);
            }
        }
    }
}

/// Cases of the capacity property (two to four tiers; reported in the issue-18 note).
const PLANNER_CASES: u32 = 4096;
