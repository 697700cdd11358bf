//! The `message` fuzz target: see `replica_fuzz::message`.
#![no_main]

use replica_fuzz::{alloc, message};

#[global_allocator]
static ALLOC: alloc::Bounded = alloc::Bounded;

libfuzzer_sys::fuzz_target!(init: alloc::install(message::ALLOC_LIMIT), |data: &[u8]| message::run(data));
