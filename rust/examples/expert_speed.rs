//! Time one expert at Qwen3-30B-A3B's shape (2048 x 768) per tier, one token and 16.
//!   cargo run --release -p dynaexq --example expert_speed
use dynaexq::cpu_experts::{
    expert_forward, Activations, ExpertLayout, ExpertShape, Half, TierFormat,
};
use std::time::Instant;

fn main() {
    let shape = ExpertShape {
        hidden: 2048,
        intermediate: 768,
        alignment: 256,
    };
    let tiers = [
        ("bf16", TierFormat::Dense(Half::Bf16)),
        (
            "int8g128",
            TierFormat::Quantized {
                bits: 8,
                group: 128,
                symmetric: true,
            },
        ),
        (
            "int4g128",
            TierFormat::Quantized {
                bits: 4,
                group: 128,
                symmetric: true,
            },
        ),
        (
            "int3g64",
            TierFormat::Quantized {
                bits: 3,
                group: 64,
                symmetric: true,
            },
        ),
        (
            "int2g64",
            TierFormat::Quantized {
                bits: 2,
                group: 64,
                symmetric: true,
            },
        ),
    ];
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    for (name, f) in tiers {
        let layout = ExpertLayout::new(f, shape).unwrap();
        // Small scales: bytes 0x11 everywhere keep fp16 values finite.
        let blob = vec![0x11u8; layout.nbytes];
        for n in [1usize, 4, 16] {
            let x: Vec<f32> = (0..n * 2048).map(|j| (j % 7) as f32 * 0.1 - 0.3).collect();
            for act in [Activations::Float, Activations::Int8] {
                if act == Activations::Int8 && matches!(f, TierFormat::Dense(_)) {
                    continue; // dense tiers take float inputs either way
                }
                let mut best = f64::MAX;
                for _ in 0..15 {
                    let t0 = Instant::now();
                    pool.install(|| expert_forward(&blob, &layout, &x, n, act).unwrap());
                    best = best.min(t0.elapsed().as_secs_f64());
                }
                println!(
                    "{name:>9} {act:?}  n={n:2}: {:8.0} us  ({:.2} GB/s of weights)",
                    best * 1e6,
                    layout.nbytes as f64 / best / 1e9
                );
            }
        }
    }
}
