// SPDX-License-Identifier: GPL-2.0

//! The `replica` target: for now a pass-through to its data device.
//!
//! Every bio is remapped to the same sector range of the data device. Reads,
//! writes, flushes, discards and write-zeroes all go through `map`, which is
//! where write capture will hook in.

use core::fmt::Write;

use kernel::c_str;
use kernel::prelude::*;
use kernel::str::CStr;

use crate::dm::{
    self, Args, Bio, Ctr, CtrError, DeviceVisitor, MapResult, Op, StatusType, StatusWriter,
    TargetDev, VisitStop,
};
use crate::table;

/// One `replica` table line.
pub(crate) struct Replica {
    data: TargetDev,
    /// First sector of this target in the mapped device (`ti->begin`).
    begin: u64,
    /// Length in sectors (`ti->len`).
    len: u64,
}

impl Replica {
    /// Sector of the data device for `sector` of the mapped device, or
    /// `None` if a bio of `sectors` sectors there would not lie inside the
    /// target (dm never sends such bios; checked instead of trusted).
    fn data_sector(&self, sector: u64, sectors: u32) -> Option<u64> {
        let offset = sector.checked_sub(self.begin)?;
        let end = offset.checked_add(u64::from(sectors))?;
        (end <= self.len).then_some(offset)
    }
}

#[vtable]
impl dm::Target for Replica {
    const NAME: &'static CStr = c_str!("replica");
    const VERSION: [u32; 3] = [0, 1, 0];

    fn ctr(ctr: &mut Ctr<'_>, args: Args<'_>) -> Result<Self, CtrError> {
        let args = table::parse(args).map_err(|e| {
            pr_err!("table rejected: {e}\n");
            CtrError::invalid(e.message())
        })?;

        // Released on any later error by `TargetDev`'s drop.
        let data = ctr.get_device(args.data_dev).map_err(|errno| {
            pr_err!(
                "table rejected: cannot open data device '{}' (error {})\n",
                args.data_dev,
                errno.to_errno()
            );
            CtrError {
                errno,
                msg: c_str!("Cannot open data device"),
            }
        })?;

        // Flushes, discards and write-zeroes reach `map` once each, so they
        // pass through the same path as writes (and will be captured there).
        ctr.set_num_flush_bios(1);
        ctr.set_num_discard_bios(1);
        ctr.set_num_write_zeroes_bios(1);
        #[cfg(dm_replica_corrupt_reads)]
        ctr.set_per_io_data_size(fault::PER_IO_DATA_SIZE);
        #[cfg(dm_replica_leak)]
        fault::leak();

        Ok(Replica {
            data,
            begin: ctr.begin(),
            len: ctr.len(),
        })
    }

    fn map(&self, bio: &mut Bio<'_>) -> MapResult {
        match bio.op() {
            Op::Read | Op::Write | Op::Flush | Op::Discard | Op::WriteZeroes => {}
            // An operation the target does not know could change data
            // without being captured: refuse it rather than let the replica
            // silently diverge. (dm sends none today: no secure erase, no
            // zoned support is advertised.)
            Op::Other => return MapResult::Kill,
        }
        let sectors = bio.sectors();
        if sectors == 0 {
            // An empty flush: no data, so no sector to translate.
            bio.set_dev(&self.data);
            return MapResult::Remapped;
        }
        let Some(sector) = self.data_sector(bio.sector(), sectors) else {
            return MapResult::Kill;
        };
        #[cfg(dm_replica_corrupt_reads)]
        fault::on_map(bio);
        bio.remap(&self.data, sector);
        MapResult::Remapped
    }

    // Only the fault-injection build needs to see completions. (`#[vtable]`
    // would set this to true for any `end_io` defined here, cfg or not.)
    const HAS_END_IO: bool = cfg!(dm_replica_corrupt_reads);

    fn end_io(&self, _bio: &mut Bio<'_>, _ok: bool) {
        #[cfg(dm_replica_corrupt_reads)]
        fault::on_end_io(_bio, _ok);
    }

    fn iterate_devices(&self, visit: &mut DeviceVisitor<'_>) -> Result<(), VisitStop> {
        visit.visit(&self.data, 0, self.len)
    }

    fn status(&self, kind: StatusType, out: &mut StatusWriter<'_>) -> core::fmt::Result {
        match kind {
            StatusType::Info => Ok(()),
            StatusType::Table => write!(out, "{}", self.data.name()),
            StatusType::Ima => {
                let [major, minor, patch] = <Self as dm::Target>::VERSION;
                write!(
                    out,
                    "target_name=replica,target_version={major}.{minor}.{patch},data_dev={};",
                    self.data.name()
                )
            }
        }
    }
}

/// Fault injection for testing the test harness; compiled only into builds
/// made with a `DM_REPLICA_FAULT` value (see `Kbuild`).
///
/// * `dm_replica_corrupt_reads`: every successful read returns data with one
///   bit flipped.
/// * `dm_replica_leak`: every constructor leaks a small allocation.
#[cfg(dm_replica_fault)]
mod fault {
    #[cfg(dm_replica_corrupt_reads)]
    use crate::dm::{Bio, Op};

    /// Room for the saved `bvec_iter` (sector, size, idx, bvec offset).
    #[cfg(dm_replica_corrupt_reads)]
    pub(super) const PER_IO_DATA_SIZE: u32 =
        core::mem::size_of::<kernel::bindings::bvec_iter>() as u32;

    #[cfg(dm_replica_corrupt_reads)]
    pub(super) fn on_map(bio: &mut Bio<'_>) {
        if bio.op() == Op::Read {
            bio.save_iter();
        }
    }

    #[cfg(dm_replica_corrupt_reads)]
    pub(super) fn on_end_io(bio: &mut Bio<'_>, ok: bool) {
        if ok && bio.op() == Op::Read {
            bio.corrupt_first_byte();
        }
    }

    /// Allocates 256 bytes and forgets the only pointer to them.
    #[cfg(dm_replica_leak)]
    pub(super) fn leak() {
        use kernel::prelude::*;
        if let Ok(b) = KBox::new([0x5au8; 256], GFP_KERNEL) {
            KBox::leak(b);
        }
    }
}
