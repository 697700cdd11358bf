//! The `handshake` fuzz target: see `replica_fuzz::handshake`.
#![no_main]

use replica_fuzz::{alloc, handshake};

#[global_allocator]
static ALLOC: alloc::Bounded = alloc::Bounded;

libfuzzer_sys::fuzz_target!(init: alloc::install(handshake::ALLOC_LIMIT), |data: &[u8]| handshake::run(data));
