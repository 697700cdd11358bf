//! The `cursor` fuzz target: see `replica_fuzz::cursor`.
#![no_main]

use replica_fuzz::{alloc, cursor};

#[global_allocator]
static ALLOC: alloc::Bounded = alloc::Bounded;

libfuzzer_sys::fuzz_target!(init: alloc::install(cursor::ALLOC_LIMIT), |data: &[u8]| cursor::run(data));
