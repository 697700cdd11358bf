// SPDX-License-Identifier: GPL-2.0

//! The consumer's side of a group: the single consumer slot and the
//! requests about the stream and the dirty bitmaps: release, markers (from
//! the control device or a `dmsetup message`), volume descriptions, reading
//! and clearing a volume's bitmap.

use kernel::prelude::*;
use kernel::sync::Arc;

use crate::capture::{self, CaptureError, RecOp, Request};
use crate::dm::sys::{self, desc_field_offset, header_offset};
use crate::dm::HeldBio;
use crate::ring_abi as abi;

use super::{BioKind, BitmapTaken, Group, PerBio, VolumeInfo};

impl Group {
    /// Claims the single consumer slot; new volumes are refused until the
    /// consumer allows joins.
    pub(crate) fn attach_consumer(&self) -> bool {
        let mut st = self.state.lock();
        if st.consumer {
            return false;
        }
        st.consumer = true;
        st.joins_allowed = false;
        true
    }

    /// Gives the consumer slot back (and ends its allowance of joins).
    pub(crate) fn detach_consumer(&self) {
        let mut st = self.state.lock();
        st.consumer = false;
        st.joins_allowed = false;
    }

    /// The attached consumer allows (or refuses again) tables of new
    /// volumes in the group.
    pub(crate) fn allow_joins(&self, allow: bool) {
        let mut st = self.state.lock();
        st.joins_allowed = allow;
        drop(st);
        pr_info!(
            "group {}: the consumer {} new volumes\n",
            self.name,
            if allow { "allows" } else { "refuses" }
        );
    }

    /// Applies the consumer's release of every record before `new_cons`.
    pub(crate) fn release(this: &Arc<Self>, new_cons: u64) -> Result {
        let mut st = this.state.lock();
        let tail = st.cap.release(new_cons).map_err(|e| match e {
            capture::ReleaseError::OutOfRange => EINVAL,
            capture::ReleaseError::InFlight => EBUSY,
        })?;
        this.header_u64(header_offset!(data_tail), tail);
        this.header_u64(header_offset!(cons_seq), st.cap.cons_seq());
        let waiting = !st.waiting.is_empty();
        drop(st);
        if waiting {
            Self::kick(this);
        }
        Ok(())
    }

    /// Inserts a MARKER record with id `id` about volume `volume` with
    /// record flags `flags`.
    pub(crate) fn marker(&self, volume: u32, flags: u8, id: u64) -> Result<u64> {
        let mut st = self.state.lock();
        if st.cap.overflowing() {
            return Err(EIO);
        }
        if !st.waiting.is_empty() {
            return Err(EAGAIN);
        }
        let req = Request {
            op: RecOp::Marker,
            volume,
            sector: 0,
            len: 0,
        };
        let r = st.cap.reserve(&req).map_err(|e| match e {
            CaptureError::Full => ENOSPC,
            _ => EIO,
        })?;
        let now = sys::now_ns();
        let pb = PerBio {
            kind: BioKind::Captured,
            op: abi::OP_MARKER,
            flags,
            volume,
            submit_ns: now,
            seq: r.seq,
            ..PerBio::default()
        };
        self.fill_record(&r, &pb, id, None::<&HeldBio<PerBio>>);
        self.mem
            .write_words(self.desc_offset(r.seq) + desc_field_offset!(complete_ns), &[now]);
        st.cap.complete(r.seq, true).map_err(|_| EIO)?;
        self.publish_stamp(r.seq, abi::STATE_COMMITTED);
        self.publish_header(&st);
        drop(st);
        self.notify();
        Ok(r.seq)
    }

    /// Describes volume `index`.
    pub(crate) fn volume_info(&self, index: u32) -> Option<VolumeInfo> {
        let mut st = self.state.lock();
        let v = st.volume_mut(index)?;
        Some(VolumeInfo {
            id: v.id,
            sectors: v.sectors,
            region_kib: v.region_kib,
            regions: v.dirty.regions(),
            dirty: v.dirty.dirty(),
        })
    }

    /// Reads and clears volume `index`'s dirty bitmap into `out` (exactly
    /// its word count), ends overflow, and returns where capture resumes.
    pub(crate) fn take_bitmap(&self, index: u32, out: &mut [u64]) -> Result<BitmapTaken> {
        let mut st = self.state.lock();
        let v = st.volume_mut(index).ok_or(ENOENT)?;
        let (region_kib, regions, before) = (v.region_kib, v.dirty.regions(), v.dirty.dirty());
        let in_flight_overflow = v.overflow_in_flight;
        if !v.dirty.take_into(out) {
            return Err(EAGAIN);
        }
        st.dirty_total = st.dirty_total.wrapping_sub(before);
        let resume_seq = st.cap.clear_overflow();
        self.publish_header(&st);
        drop(st);
        self.notify();
        Ok(BitmapTaken {
            region_kib,
            regions,
            resume_seq,
            in_flight_overflow,
        })
    }

    /// Gives back bits of a read-and-clear whose copy-out failed.
    pub(crate) fn untake_bitmap(&self, index: u32, words: &[u64]) {
        let mut st = self.state.lock();
        let newly = st.volume_mut(index).map_or(0, |v| v.dirty.or_in(words));
        st.dirty_total = st.dirty_total.wrapping_add(newly);
        self.publish_header(&st);
    }
}
