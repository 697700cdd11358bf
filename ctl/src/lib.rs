//! replctl: the dm-replica command-line tool (library part, shared with
//! tests).

pub mod certs;
pub mod dev;
pub mod keys;
pub mod progress;
pub mod protect;
pub mod wait;
