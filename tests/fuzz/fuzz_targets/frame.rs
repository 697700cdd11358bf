//! The `frame` fuzz target: see `replica_fuzz::frame`.
#![no_main]

use replica_fuzz::{alloc, frame};

#[global_allocator]
static ALLOC: alloc::Bounded = alloc::Bounded;

libfuzzer_sys::fuzz_target!(init: alloc::install(frame::ALLOC_LIMIT), |data: &[u8]| frame::run(data));
