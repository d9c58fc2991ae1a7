//! Arbitrary bytes -> a KV page pool and an expert pool on one shared device budget, and
//! an operation sequence (open, share a prefix, reserve, publish, truncate, close; expert
//! slot acquire, commit, release; KV bounds), checked step by step against the shadow
//! model in `dynaexq::kv_shadow`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    dynaexq::kv_shadow::run_kv(data);
});
