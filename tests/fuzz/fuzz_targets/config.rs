//! The `config` fuzz target: see `replica_fuzz::config`.
#![no_main]

use replica_fuzz::{alloc, config};

#[global_allocator]
static ALLOC: alloc::Bounded = alloc::Bounded;

libfuzzer_sys::fuzz_target!(init: alloc::install(config::ALLOC_LIMIT), |data: &[u8]| config::run(data));
