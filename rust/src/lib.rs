//! dynaexq core: the fragmentation-free hybrid-precision expert pool, the per-expert
//! precision state machine with stable handles, and the transfer engine.
//!
//! This file only re-exports; each concept lives in its own module.

pub mod controller;

#[cfg(feature = "python")]
mod py;
