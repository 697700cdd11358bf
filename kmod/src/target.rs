// SPDX-License-Identifier: GPL-2.0

//! The `replica` target: captures every data-changing bio of a volume into
//! its group's ring (see [`crate::group`]) and passes all I/O through to the
//! data device at the same sector.
//!
//! Reads pass through. Writes, discards and write-zeroes are reserved in the
//! ring and copied in `map`, in submission order, and marked committed or
//! failed in `end_io`; a write that overlaps an earlier one still in flight
//! is held back until that one completes, so the disk sees overlapping
//! writes in ring order. Empty flushes (dm splits a flush-with-data into an
//! empty flush and the data) become FLUSH records. Anything else is refused
//! rather than let data change without being captured.

use core::fmt::Write;

use kernel::c_str;
use kernel::prelude::*;
use kernel::str::CStr;
use kernel::sync::Arc;

use crate::capture::{RecOp, Request};
use crate::dm::{
    self, Args, Bio, BioData, Ctr, CtrError, DeviceVisitor, Mapped, Op, StatusType,
    StatusWriter, TargetDev, VisitStop,
};
use crate::group::{Attach, Group, Name, PerBio, Registry};
use crate::ring_abi as abi;
use crate::table;

/// One `replica` table line.
pub(crate) struct Replica {
    registry: Arc<Registry>,
    group: Arc<Group>,
    /// Index of this volume in the group.
    volume: u32,
    volume_id: Name,
    region_kib: u32,
    overflow_wait_ms: u32,
    data: TargetDev,
    /// First sector of this target in the mapped device (`ti->begin`).
    begin: u64,
    /// Length in sectors (`ti->len`).
    len: u64,
}

impl Replica {
    /// Sector of the volume (and the data device) for `sector` of the mapped
    /// device, or `None` if a bio of `sectors` sectors there would not lie
    /// inside the target (dm never sends such bios; checked, not trusted).
    fn volume_sector(&self, sector: u64, sectors: u32) -> Option<u64> {
        let offset = sector.checked_sub(self.begin)?;
        let end = offset.checked_add(u64::from(sectors))?;
        (end <= self.len).then_some(offset)
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        // dm destroys a target after all its I/O finished.
        self.registry.detach(&self.group, self.volume);
    }
}

#[vtable]
impl dm::Target for Replica {
    const NAME: &'static CStr = c_str!("replica");
    const VERSION: [u32; 3] = [0, 2, 0];
    const STABLE_WRITES: bool = true;

    type Shared = Registry;
    type PerBio = PerBio;

    fn ctr(ctr: &mut Ctr<'_>, registry: &Arc<Registry>, args: Args<'_>) -> Result<Self, CtrError> {
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

        let bad_name = CtrError::invalid(c_str!("Invalid name"));
        let attach = Attach {
            group: Name::new(args.group).ok_or(bad_name)?,
            volume: Name::new(args.volume_id).ok_or(bad_name)?,
            devt: data.devt(),
            sectors: ctr.len(),
            ring_mib: args.ring_mib,
            region_kib: args.region_kib,
            overflow_wait_ms: args.overflow_wait_ms,
        };
        let (group, volume) = registry.attach(&attach)?;
        // From here on, dropping `target` (on error) detaches again.
        let target = Replica {
            registry: registry.clone(),
            group,
            volume,
            volume_id: attach.volume,
            region_kib: args.region_kib,
            overflow_wait_ms: args.overflow_wait_ms,
            data,
            begin: ctr.begin(),
            len: ctr.len(),
        };

        // Flushes, discards and write-zeroes reach `map` once each, so they
        // are captured like writes.
        ctr.set_num_flush_bios(1);
        ctr.set_num_discard_bios(1);
        ctr.set_num_write_zeroes_bios(1);
        // A write's payload must fit the ring with room to spare.
        ctr.set_max_io_len(target.group.max_io_sectors())
            .map_err(|errno| CtrError {
                errno,
                msg: c_str!("Cannot set the maximum I/O size"),
            })?;
        #[cfg(dm_replica_leak)]
        fault::leak();
        Ok(target)
    }

    fn map(&self, mut bio: Bio<'_, PerBio>) -> Mapped {
        let op = bio.op();
        let (rec_op, data_changing) = match op {
            Op::Read => (None, false),
            Op::Write => (Some(RecOp::Write), true),
            Op::Discard => (Some(RecOp::Discard), true),
            Op::WriteZeroes => (Some(RecOp::WriteZeroes), true),
            Op::Flush => (Some(RecOp::Flush), false),
            // An operation the target does not know could change data
            // without being captured: refuse it rather than let the replica
            // silently diverge. (dm sends none today: no secure erase, no
            // zoned support is advertised.)
            Op::Other => return bio.kill(),
        };
        bio.set_per_bio(PerBio::default());
        if op == Op::Flush {
            // An empty flush: no data, so no sector to translate.
            bio.set_dev(&self.data);
            let req = Request {
                op: RecOp::Flush,
                volume: self.volume,
                sector: 0,
                len: 0,
            };
            return Group::capture(&self.group, bio, req, abi::FLAG_PREFLUSH);
        }
        let sectors = bio.sectors();
        let Some(sector) = self.volume_sector(bio.sector(), sectors) else {
            return bio.kill();
        };
        bio.remap(&self.data, sector);
        #[cfg(dm_replica_corrupt_reads)]
        fault::on_map(&mut bio);
        let Some(rec_op) = rec_op.filter(|_| data_changing && sectors > 0) else {
            return bio.remapped();
        };
        let flags = if bio.is_fua() { abi::FLAG_FUA } else { 0 };
        let req = Request {
            op: rec_op,
            volume: self.volume,
            sector,
            len: bio.bytes(),
        };
        Group::capture(&self.group, bio, req, flags)
    }

    fn end_io(&self, bio: &mut Bio<'_, PerBio>, ok: bool) {
        #[cfg(dm_replica_corrupt_reads)]
        fault::on_end_io(bio, ok);
        Group::complete(&self.group, bio, ok);
    }

    fn iterate_devices(&self, visit: &mut DeviceVisitor<'_>) -> Result<(), VisitStop> {
        visit.visit(&self.data, 0, self.len)
    }

    fn status(&self, kind: StatusType, out: &mut StatusWriter<'_>) -> core::fmt::Result {
        match kind {
            StatusType::Info => {
                write!(out, "volume={} group={} ", self.volume_id, self.group.name())?;
                self.group.write_status(self.volume, out)
            }
            StatusType::Table => write!(
                out,
                "{} {} group={} ring_mib={} region_kib={} overflow_wait_ms={}",
                self.data.name(),
                self.volume_id,
                self.group.name(),
                self.group.ring_mib(),
                self.region_kib,
                self.overflow_wait_ms
            ),
            StatusType::Ima => {
                let [major, minor, patch] = <Self as dm::Target>::VERSION;
                write!(
                    out,
                    "target_name=replica,target_version={major}.{minor}.{patch},data_dev={},volume={},group={};",
                    self.data.name(),
                    self.volume_id,
                    self.group.name()
                )
            }
        }
    }

    fn message(&self, mut args: Args<'_>, out: &mut StatusWriter<'_>) -> Result {
        let cmd = args.next().ok_or(EINVAL)?;
        match cmd.as_bytes() {
            b"marker" => {
                let id = args.next().ok_or(EINVAL)?;
                if args.next().is_some() {
                    return Err(EINVAL);
                }
                let id = parse_u64(id.as_bytes()).ok_or_else(|| {
                    pr_err!("message: marker id '{id}' is not a number\n");
                    EINVAL
                })?;
                // About this volume: a consumer replicating it takes only
                // records of its own volume index.
                let seq = self.group.marker(self.volume, 0, id).map_err(|e| {
                    pr_warn!(
                        "group {}: marker {id} refused (error {}): {}\n",
                        self.group.name(),
                        e.to_errno(),
                        if e == ENOSPC {
                            "ring full"
                        } else if e == EAGAIN {
                            "writes are waiting for ring space"
                        } else {
                            "ring overflowing, resync needed"
                        }
                    );
                    e
                })?;
                let _ = write!(out, "marker {id} seq {seq}");
                Ok(())
            }
            _ => {
                pr_err!("message: unknown command '{cmd}' (known: marker <id>)\n");
                Err(EINVAL)
            }
        }
    }
}

/// A decimal u64.
fn parse_u64(b: &[u8]) -> Option<u64> {
    if b.is_empty() || b.len() > 20 || !b.iter().all(u8::is_ascii_digit) {
        return None;
    }
    b.iter().try_fold(0u64, |n, &d| {
        n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
    })
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
    use crate::dm::{Bio, BioData, Op};
    #[cfg(dm_replica_corrupt_reads)]
    use crate::group::PerBio;

    #[cfg(dm_replica_corrupt_reads)]
    pub(super) fn on_map(bio: &mut Bio<'_, PerBio>) {
        if bio.op() == Op::Read {
            bio.save_iter();
        }
    }

    #[cfg(dm_replica_corrupt_reads)]
    pub(super) fn on_end_io(bio: &mut Bio<'_, PerBio>, ok: bool) {
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
