// SPDX-License-Identifier: GPL-2.0

//! dm-replica: the `replica` device-mapper target.
//!
//! Captures every write of a protected volume, in submission order, into a
//! ring shared with the replication daemon, and passes all I/O through to
//! the data device. See `target` (the table line and the I/O path), `group`
//! (consistency groups: rings, held and waiting bios, overflow, the registry
//! of groups; one file per concern under `group/`), `control`
//! (`/dev/dm-replica`), `capture` (the ring logic itself, also tested on the
//! host) and `dm` (the safe interface to device-mapper and the other kernel
//! services).
//!
//! Table line: `<start> <sectors> replica <data_dev> <volume_id> [options]`
//! (see `table`).
//!
//! All `unsafe` code lives in `dm` and its C shim; everything else is safe
//! Rust. The compiler enforces it: the crate denies `unsafe_code` and only
//! `dm` allows it. (Lints are not reported inside expansions of the kernel
//! crate's macros, such as `module!`, `pin_init!` and `impl_has_work!`:
//! their `unsafe` is the kernel's, argued there.)

#![deny(unsafe_code)]

use kernel::c_str;
use kernel::prelude::*;

mod capture;
mod control;
// The FFI layer: the one module with `unsafe` code, each block with its
// `// SAFETY:` reason.
#[allow(unsafe_code)]
mod dm;
mod group;
mod table;
mod target;

/// The capture ring's memory layout and index rules, shared with `replicad`
/// (one `core`-only file; see its documentation).
#[path = "../../crates/ring-abi/src/ring_abi.rs"]
#[allow(dead_code, unreachable_pub, missing_docs)]
mod ring_abi;

// The ABI's constants must agree with the kernel this module is built for.
const _: () = {
    use kernel::ioctl::{_IOW, _IOWR};
    use ring_abi as abi;
    assert!(abi::PAGE_SIZE == kernel::page::PAGE_SIZE as u64);
    assert!(abi::SECTOR_SIZE == 1 << dm::SECTOR_SHIFT);
    assert!(abi::IOC_ATTACH == _IOWR::<abi::AttachArg>(abi::IOC_TYPE, 1));
    assert!(abi::IOC_RELEASE == _IOW::<abi::ReleaseArg>(abi::IOC_TYPE, 2));
    assert!(abi::IOC_BITMAP == _IOWR::<abi::BitmapArg>(abi::IOC_TYPE, 3));
    assert!(abi::IOC_VOLUME == _IOWR::<abi::VolumeArg>(abi::IOC_TYPE, 4));
    assert!(abi::IOC_MARKER == _IOWR::<abi::MarkerArg>(abi::IOC_TYPE, 5));
    assert!(abi::IOC_ALLOW_JOINS == _IOW::<abi::AllowJoinsArg>(abi::IOC_TYPE, 6));
};

#[cfg(not(dm_replica_fault))]
module! {
    type: DmReplica,
    name: "dm_replica",
    description: "device-mapper target capturing writes for replication",
    license: "GPL",
}

#[cfg(dm_replica_fault)]
module! {
    type: DmReplica,
    name: "dm_replica",
    description: "FAULT INJECTION BUILD: broken on purpose, for testing the test harness only",
    license: "GPL",
}

/// The module's state. Fields drop in order: the control device and the
/// target type go first (nothing can use them then: open files and tables
/// hold a module reference, so none exist at unload), then the workqueue,
/// whose destruction drains what is still queued, then the registry.
struct DmReplica {
    _control: dm::misc::MiscRegistration<control::ControlFile>,
    _target: dm::Registration<target::Replica>,
    _workqueue: dm::sys::WorkQueue,
    _registry: kernel::sync::Arc<group::Registry>,
}

impl kernel::Module for DmReplica {
    fn init(module: &'static ThisModule) -> Result<Self> {
        let registry = group::Registry::new()?;
        let workqueue = dm::sys::WorkQueue::new(c_str!("dm_replica"))?;
        let target = dm::Registration::new(module, registry.clone())?;
        let control =
            dm::misc::MiscRegistration::register(module, c_str!("dm-replica"), 0o600, registry.clone())?;
        #[cfg(dm_replica_corrupt_reads)]
        pr_err!("fault injection build: every read through a replica target is corrupted\n");
        #[cfg(dm_replica_leak)]
        pr_err!("fault injection build: every replica table line leaks memory\n");
        #[cfg(dm_replica_no_hold)]
        pr_err!("fault injection build: overlapping writes are not held back\n");
        pr_info!("target 'replica' and /dev/dm-replica registered\n");
        Ok(Self {
            _control: control,
            _target: target,
            _workqueue: workqueue,
            _registry: registry,
        })
    }
}

impl Drop for DmReplica {
    fn drop(&mut self) {
        pr_info!("target 'replica' unregistering\n");
    }
}
