// SPDX-License-Identifier: GPL-2.0

//! dm-replica: the `replica` device-mapper target.
//!
//! Captures the writes of a protected volume for block-level replication.
//! This version passes all I/O through to the data device unchanged.
//!
//! Table line: `<start> <sectors> replica <data_dev>`.

use kernel::prelude::*;

mod dm;
mod table;
mod target;

/// The capture ring's memory layout and index rules, shared with `replicad`
/// (one `core`-only file; see its documentation). Not used by the
/// pass-through target yet; compiled here so the kernel toolchain checks it.
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

struct DmReplica {
    _target: dm::Registration<target::Replica>,
}

impl kernel::Module for DmReplica {
    fn init(module: &'static ThisModule) -> Result<Self> {
        let target = dm::Registration::new(module)?;
        #[cfg(dm_replica_corrupt_reads)]
        pr_err!("fault injection build: every read through a replica target is corrupted\n");
        #[cfg(dm_replica_leak)]
        pr_err!("fault injection build: every replica table line leaks memory\n");
        pr_info!("target 'replica' registered\n");
        Ok(Self { _target: target })
    }
}

impl Drop for DmReplica {
    fn drop(&mut self) {
        pr_info!("target 'replica' unregistering\n");
    }
}
