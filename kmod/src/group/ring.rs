// SPDX-License-Identifier: GPL-2.0

//! The ring memory shared with the consumer: the header the producer
//! publishes, the descriptors and their stamps, and the records' payloads.

use core::sync::atomic::Ordering;

use kernel::prelude::*;

use crate::capture::{DescBody, Reserved};
use crate::dm::sys::{desc_field_offset, header_offset, RingMem};
use crate::dm::BioData;
use crate::ring_abi as abi;

use super::{Group, GroupState, PerBio, FIRST_SEQ};

impl Group {
    pub(super) fn header_u64(&self, off: usize, v: u64) {
        if let Some(a) = self.mem.atomic_u64(off) {
            a.store(v, Ordering::Release);
        }
    }

    /// Mirrors the producer's indices and flags into the shared header.
    /// Called with the state lock held, so stores never go backwards.
    pub(super) fn publish_header(&self, st: &GroupState) {
        self.header_u64(header_offset!(data_head), st.cap.data_head());
        self.header_u64(header_offset!(prod_seq), st.cap.prod_seq());
        self.header_u64(header_offset!(overflow_seq), st.cap.overflow_seq());
        self.header_u64(header_offset!(dirty_regions), st.dirty_total);
        let mut flags = 0;
        if st.cap.overflowing() {
            flags |= abi::RING_FLAG_OVERFLOW;
        }
        if self.is_dead() {
            flags |= abi::RING_FLAG_DEAD;
        }
        if let Some(a) = self.mem.atomic_u32(header_offset!(flags)) {
            a.store(flags, Ordering::Release);
        }
    }

    pub(super) fn desc_offset(&self, seq: u64) -> usize {
        abi::desc_byte_offset(self.geometry.desc_offset, seq, self.geometry.desc_count) as usize
    }

    pub(super) fn publish_stamp(&self, seq: u64, state: u64) {
        if let Some(a) = self.mem.atomic_u64(self.desc_offset(seq)) {
            abi::publish_stamp(a, seq, state);
        }
    }

    /// Writes a reserved record's descriptor fields (not its stamp) and, for
    /// a write, copies the payload from `bio`. Returns false if the payload
    /// could not be copied in full.
    pub(super) fn fill_record(
        &self,
        r: &Reserved,
        pb: &PerBio,
        aux: u64,
        bio: Option<&impl BioData>,
    ) -> bool {
        let d = self.desc_offset(r.seq);
        let m = &self.mem;
        let body = DescBody {
            sector: pb.sector,
            data_pos: r.data_pos,
            submit_ns: pb.submit_ns,
            len: pb.len,
            granules: r.granules,
            volume: pb.volume,
            op: pb.op,
            flags: pb.flags,
            aux,
            complete_ns: 0,
        };
        let mut ok = m.write_words(d + desc_field_offset!(sector), &body.words());
        if r.granules > 0 {
            let off = abi::data_byte_offset(
                self.geometry.data_offset,
                r.data_pos,
                self.geometry.data_granules,
            ) as usize;
            let len = pb.len as usize;
            let room = (r.granules as usize) << abi::GRANULE_SHIFT;
            ok = ok
                && bio.is_some_and(|b| b.data_bytes() == len && m.copy_bio(off, b))
                && m.zero(off + len, room.saturating_sub(len));
        }
        ok
    }
}

/// Writes the constant part of a new ring's header (nobody maps it yet).
pub(super) fn init_header(mem: &RingMem, g: &abi::RingGeometry, generation: &[u8; 16]) -> Result {
    let ok = mem.write(header_offset!(magic), &abi::RING_MAGIC.to_ne_bytes())
        && mem.write(header_offset!(abi_version), &abi::RING_ABI_VERSION.to_ne_bytes())
        && mem.write(header_offset!(header_size), &(abi::HEADER_SIZE as u32).to_ne_bytes())
        && mem.write(header_offset!(generation), generation)
        && mem.write(header_offset!(desc_count), &g.desc_count.to_ne_bytes())
        && mem.write(header_offset!(data_granules), &g.data_granules.to_ne_bytes())
        && mem.write(header_offset!(desc_offset), &g.desc_offset.to_ne_bytes())
        && mem.write(header_offset!(data_offset), &g.data_offset.to_ne_bytes())
        && mem.write(header_offset!(first_seq), &FIRST_SEQ.to_ne_bytes())
        && mem.write(header_offset!(prod_seq), &FIRST_SEQ.to_ne_bytes())
        && mem.write(header_offset!(cons_seq), &FIRST_SEQ.to_ne_bytes())
        && mem.write(header_offset!(overflow_seq), &FIRST_SEQ.to_ne_bytes());
    if ok {
        Ok(())
    } else {
        Err(EINVAL)
    }
}
