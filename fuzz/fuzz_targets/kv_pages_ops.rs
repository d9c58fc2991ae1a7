//! Arbitrary bytes -> a KV page pool and an expert pool on one shared device budget and
//! one arena, and an operation sequence (open, share a prefix, reserve, publish,
//! truncate, close; expert slot acquire, commit, release; KV bounds; lend an expert slot
//! to the pages, take one back), checked step by step against the shadow model in
//! `dynaexq::kv_shadow` (cached prefix pages and their eviction included).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    dynaexq::kv_shadow::run_kv(data);
});
