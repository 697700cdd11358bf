//! The capture ring ABI, re-exported for userspace.
//!
//! The definitions live in one dependency-free, `core`-only file,
//! `ring_abi.rs`, which the kernel module includes verbatim with `#[path]`.
//! This crate only wraps it so the workspace can use it.
#![no_std]

#[path = "ring_abi.rs"]
mod abi;

pub use abi::*;
