//! Test harness for host-only end-to-end tests: certificates and keys in a
//! temporary directory, `replicad` processes for both roles, a userspace
//! producer that writes exactly the kernel's ring ABI, a reference model of
//! the source volume to compare the replica and its recovery points with,
//! and a proxy that can blackhole the path between the daemons.

mod daemon;
mod env;
mod image;
mod proxy;
mod raw_client;
mod rig;
mod wait;

pub use daemon::{
    applied_published, control_line, journal_headers, point_image, replctl_bin, replicad_bin,
    target_state, volume_status, Daemon,
};
pub use env::{pin_listen, Env, OneVolumeTarget, Tmpfs, SOURCE_CN, TARGET_CN};
pub use image::{first_difference, Op, Rng, Source};
pub use proxy::Proxy;
pub use raw_client::{answer, tls_link, ConfirmWith, Heard, HelloOpts, RawClient};
pub use rig::{Pair, Rig};
pub use wait::wait_for;
