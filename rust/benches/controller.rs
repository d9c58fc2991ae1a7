//! Planning cost at full-model scale: Qwen3-30B-A3B has 48 layers x 128 experts.

use criterion::{criterion_group, criterion_main, Criterion};
use dynaexq::controller::{plan, Capacity, HotnessTracker, PlanInput, PlannerConfig, Signal};
use std::hint::black_box;

const LAYERS: usize = 48;
const EXPERTS: usize = 128;

/// Deterministic pseudo-random scores with a skewed (power-law-like) profile.
fn scores(seed: u64) -> Vec<f32> {
    let mut x = seed;
    (0..LAYERS * EXPERTS)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let u = (x % 10_000) as f32 / 10_000.0;
            u * u * u
        })
        .collect()
}

fn bench_plan(c: &mut Criterion) {
    let n = LAYERS * EXPERTS;
    let busy = vec![false; n];
    let mut current = vec![0u8; n];
    // A realistic state: the hot set of an older score vector, 26 of 128 hot per layer.
    let old = scores(1);
    for l in 0..LAYERS {
        let mut idx: Vec<usize> = (0..EXPERTS).collect();
        idx.sort_by(|&a, &b| old[l * EXPERTS + b].total_cmp(&old[l * EXPERTS + a]));
        for &e in &idx[..26] {
            current[l * EXPERTS + e] = 1;
        }
    }
    let new = scores(2);
    let cfg = PlannerConfig {
        delta: 0.01,
        max_transitions: 64,
        max_bytes: u64::MAX,
        max_in_flight: 64,
        min_gain_per_byte: 0.0,
        sequential: false,
    };
    for (name, capacity) in [
        (
            "plan_48x128_two_tier_per_layer",
            Capacity::PerLayer(vec![EXPERTS, 26]),
        ),
        (
            "plan_48x128_two_tier_global",
            Capacity::Global(vec![n, 26 * LAYERS]),
        ),
    ] {
        c.bench_function(name, |b| {
            b.iter(|| {
                let input = PlanInput {
                    layers: LAYERS,
                    experts: EXPERTS,
                    scores: &new,
                    current: &current,
                    busy: &busy,
                    tier_bytes: &[1 << 20, 4 << 20],
                    gain: None,
                    capacity: &capacity,
                    in_flight: 0,
                };
                black_box(plan(black_box(&input), &cfg).unwrap())
            })
        });
    }
    let three = Capacity::PerLayer(vec![EXPERTS, 26, 13]);
    let gain: Vec<f32> = (0..n)
        .flat_map(|i| [0.0, 0.6 + (i % 7) as f32 * 0.01, 1.0])
        .collect();
    c.bench_function("plan_48x128_three_tier_valued", |b| {
        b.iter(|| {
            let input = PlanInput {
                layers: LAYERS,
                experts: EXPERTS,
                scores: &new,
                current: &current,
                busy: &busy,
                tier_bytes: &[1 << 20, 2 << 20, 4 << 20],
                gain: Some(&gain),
                capacity: &three,
                in_flight: 0,
            };
            black_box(plan(black_box(&input), &cfg).unwrap())
        })
    });
    // One step of routing observation for a decode batch of 32 tokens, top-8.
    let mut tracker = HotnessTracker::new(LAYERS, EXPERTS, Signal::Ema { alpha: 0.9 }).unwrap();
    let ids: Vec<u32> = (0..32 * 8).map(|i| (i * 37 % EXPERTS) as u32).collect();
    let probs = vec![0.1f32; 32 * 8];
    c.bench_function("observe_step_48_layers_batch32_top8", |b| {
        b.iter(|| {
            for l in 0..LAYERS {
                tracker.observe(l, &ids, &probs, 8).unwrap();
            }
            tracker.end_step();
        })
    });
}

criterion_group!(benches, bench_plan);
criterion_main!(benches);
