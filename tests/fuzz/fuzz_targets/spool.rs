//! The `spool` fuzz target: see `replica_fuzz::spool`.
#![no_main]

use replica_fuzz::{alloc, spool};

#[global_allocator]
static ALLOC: alloc::Bounded = alloc::Bounded;

libfuzzer_sys::fuzz_target!(init: alloc::install(spool::ALLOC_LIMIT), |data: &[u8]| spool::run(data));
