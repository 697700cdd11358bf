//! The `replica` target's capture logic, compiled on the host.
//!
//! `kmod/src/capture.rs` is `core`-only and free of kernel APIs, so the very
//! file the module builds is included here with `#[path]` and exercised by
//! property tests (a simulated disk checks that replaying the ring gives
//! the disk's content whatever the completion order) and by
//! `capture-bench`, which measures the capture path against `memcpy`.

pub(crate) use ::ring_abi;

#[path = "../../../kmod/src/capture.rs"]
#[allow(dead_code, unreachable_pub)]
pub(crate) mod capture;

pub mod bench;

#[cfg(test)]
mod tests;
