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

#[cfg(not(dm_replica_corrupt_reads))]
module! {
    type: DmReplica,
    name: "dm_replica",
    description: "device-mapper target capturing writes for replication",
    license: "GPL",
}

#[cfg(dm_replica_corrupt_reads)]
module! {
    type: DmReplica,
    name: "dm_replica",
    description: "FAULT INJECTION BUILD: corrupts every read; for testing the test harness only",
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
        pr_info!("target 'replica' registered\n");
        Ok(Self { _target: target })
    }
}

impl Drop for DmReplica {
    fn drop(&mut self) {
        pr_info!("target 'replica' unregistering\n");
    }
}
