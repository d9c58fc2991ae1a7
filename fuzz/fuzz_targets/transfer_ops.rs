//! Arbitrary bytes -> a transfer-engine scenario (submit, finish ok/failed, cancel, poll,
//! lease, release) on the deterministic manual backend, checked against the host store's
//! bytes and the reported completions.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    dynaexq::shadow::run_transfer(data);
});
