//! Arbitrary bytes -> a pool configuration and an operation sequence (alloc, reserve,
//! commit, free, double free, foreign free, begin/complete/abort transitions, leases,
//! recorded uses, fence signals, reclaim), checked step by step against the shadow model.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    dynaexq::shadow::run(data);
});
