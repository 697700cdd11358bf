//! The `ring_abi` fuzz target: see `replica_fuzz::ring`.
#![no_main]

use replica_fuzz::{alloc, ring};

#[global_allocator]
static ALLOC: alloc::Bounded = alloc::Bounded;

libfuzzer_sys::fuzz_target!(init: alloc::install(ring::ALLOC_LIMIT), |data: &[u8]| ring::run(data));
