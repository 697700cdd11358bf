// SPDX-License-Identifier: GPL-2.0

//! A group's part of the `dmsetup status` line.

use core::fmt::Write;

use crate::ring_abi as abi;

use super::{Group, GroupStatus};

impl Group {
    /// Status snapshot.
    pub(crate) fn status(&self, volume: u32) -> GroupStatus {
        let mut st = self.state.lock();
        let (dirty, in_flight_overflow) = st
            .volume_mut(volume)
            .map_or((0, 0), |v| (v.dirty.dirty(), v.overflow_in_flight));
        GroupStatus {
            stats: st.cap.stats,
            prod_seq: st.cap.prod_seq(),
            cons_seq: st.cap.cons_seq(),
            live: st.cap.live(),
            used_bytes: st.cap.granules_used() << abi::GRANULE_SHIFT,
            overflow: st.cap.overflowing(),
            overflow_seq: st.cap.overflow_seq(),
            dirty,
            in_flight: st.cap.in_flight(),
            in_flight_overflow,
            held: st.cap.held(),
            waiting: st.waiting.len(),
            internal_errors: st.internal_errors,
            consumer: st.consumer,
        }
    }

    /// Writes the status line of volume `volume`.
    pub(crate) fn write_status(&self, volume: u32, out: &mut impl Write) -> core::fmt::Result {
        let s = self.status(volume);
        write!(out, "generation=")?;
        for b in &self.generation {
            write!(out, "{b:02x}")?;
        }
        write!(
            out,
            " ring_bytes={} ring_used={} records={} bytes={} live={} prod_seq={} cons_seq={} \
             overflow={} overflow_seq={} overflows={} dirty_regions={} overflowed_writes={} \
             in_flight_overflow={} failed={} held_total={} in_flight={} held={} waiting={} consumer={} internal_errors={}",
            self.geometry.data_granules << abi::GRANULE_SHIFT,
            s.used_bytes,
            s.stats.records,
            s.stats.bytes,
            s.live,
            s.prod_seq,
            s.cons_seq,
            u8::from(s.overflow),
            s.overflow_seq,
            s.stats.overflows,
            s.dirty,
            s.stats.overflowed,
            s.in_flight_overflow,
            s.stats.failed,
            s.stats.held,
            s.in_flight,
            s.held,
            s.waiting,
            u8::from(s.consumer),
            s.internal_errors,
        )
    }
}
