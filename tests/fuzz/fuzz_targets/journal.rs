//! The `journal` fuzz target: see `replica_fuzz::journal`.
#![no_main]

use replica_fuzz::{alloc, journal};

#[global_allocator]
static ALLOC: alloc::Bounded = alloc::Bounded;

libfuzzer_sys::fuzz_target!(init: alloc::install(journal::ALLOC_LIMIT), |data: &[u8]| journal::run(data));
