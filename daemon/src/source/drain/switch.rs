//! Switching the stream to the dirty map: after a spool limit or failure, a
//! failed source write, a ring overflow, or a full resync asked for.

use std::sync::atomic::Ordering;
use std::time::Instant;

use replica_proto::frame::{self};

use super::{data_op, io_err, Drainer, Mode};
use crate::source::dirty::{DirtyMap, ResyncState};
use crate::DaemonError;

impl Drainer {
    /// Switches to the dirty map: the regions of every record the target
    /// does not have (from the spool, when it is dropped, and pending) and
    /// those a running resync has not sent yet are marked, the state is
    /// saved, then the spool is dropped.
    pub(super) fn go_resync(&mut self, why: String, drop_spool: bool) -> Result<(), DaemonError> {
        self.abandon_verify(&why);
        let spool = self.shared.spool.clone();
        let durable = self.shared.durable.load(Ordering::Acquire);
        let oldest = spool.oldest_seq();
        let since = if drop_spool {
            let d1 = durable.wrapping_add(1);
            if (d1.wrapping_sub(oldest) as i64) > 0 {
                d1
            } else {
                oldest
            }
        } else {
            spool.next_seq()
        };
        let mut map = match std::mem::replace(&mut self.mode, Mode::Spool(None)) {
            Mode::Spool(Some(run)) => run.into_dirty(),
            _ => DirtyMap::new(self.set.volume_size, self.region_bytes),
        };
        if drop_spool {
            let r = spool.for_each_record(since, |rv| {
                if data_op(rv.op) {
                    map.mark(rv.sector * 512, u64::from(rv.len));
                }
            });
            if let Err(e) = r {
                tracing::error!(error = %e, "cannot read the spool back: the whole volume needs a resync");
                map.mark_all();
            }
        }
        if let Some(first) = self.pending.first {
            match frame::decode_record_run(first, self.pending.count, &self.pending.plain) {
                Ok(recs) => {
                    for rv in recs.iter().filter(|rv| data_op(rv.op)) {
                        map.mark(rv.sector * 512, u64::from(rv.len));
                    }
                }
                Err(_) => map.mark_all(),
            }
        }
        let st = ResyncState::new(self.generation, since, why.clone(), map);
        super::resync::save_state(&self.set, &self.keys, &st)?;
        if drop_spool {
            spool
                .drop_all(since)
                .map_err(|e| io_err("drop the spool", e))?;
        }
        self.pending.clear();
        let next = self.consumer.next_seq();
        self.consumer.release(next)?;
        tracing::error!(
            volume = %self.set.volume,
            since_seq = since,
            regions = st.map.count(),
            "{why}: replication continues as a dirty-region map; the volume needs a resync"
        );
        self.shared.set_resync(Some(since));
        self.mode = Mode::Bitmap { st, begin: None };
        self.last_save = Instant::now();
        self.publish();
        Ok(())
    }

    /// Every chunk of the volume is to be compared, or (`send_all`) resent
    /// without comparing (an initial copy, or an operator's request): what
    /// the spool holds still ships, then the stream stops and a resync of
    /// the whole volume follows.
    pub(super) fn full_resync(&mut self, why: String, send_all: bool) -> Result<(), DaemonError> {
        self.abandon_verify(&why);
        self.commit()?;
        let since = self.shared.spool.next_seq();
        let mut st = match std::mem::replace(&mut self.mode, Mode::Spool(None)) {
            Mode::Bitmap { mut st, .. } => {
                st.reason = format!("{}; {why}", st.reason);
                st
            }
            Mode::Spool(run) => ResyncState::new(
                self.generation,
                since,
                why.clone(),
                match run {
                    Some(run) => run.into_dirty(),
                    None => DirtyMap::new(self.set.volume_size, self.region_bytes),
                },
            ),
        };
        st.begin_seq = None;
        st.map.mark_all();
        if send_all {
            st.differ.mark_all();
        }
        super::resync::save_state(&self.set, &self.keys, &st)?;
        if send_all {
            tracing::warn!(volume = %self.set.volume, since_seq = st.since_seq, "{why}: every chunk will be resent");
        } else {
            tracing::warn!(volume = %self.set.volume, since_seq = st.since_seq, "{why}: every chunk will be compared, those that differ resent");
        }
        self.shared.set_resync(Some(st.since_seq));
        self.mode = Mode::Bitmap { st, begin: None };
        self.last_save = Instant::now();
        self.publish();
        Ok(())
    }

    /// The target holds no consistent copy: a full resync must come, unless
    /// one is pending (the map holds every region) or running with a BEGIN
    /// that still reaches this target (not yet durable there, or durable
    /// and not yet applied: a target that had applied it would not ask).
    /// Returns a ring position the resync's END comes after.
    pub(super) fn ensure_full_resync(&mut self) -> Result<u64, DaemonError> {
        let durable = self.shared.durable.load(Ordering::Acquire);
        let applied = self.shared.target_applied.load(Ordering::Acquire);
        let keep = match &self.mode {
            Mode::Bitmap { st, .. } if st.map.count() == st.map.regions() => {
                Some(self.consumer.producer_seq())
            }
            Mode::Spool(Some(run)) if run.full => run.st.begin_seq.filter(|&b| {
                (b.wrapping_sub(durable) as i64) > 0 || (applied.wrapping_sub(b) as i64) < 0
            }),
            _ => None,
        };
        if let Some(from) = keep {
            return Ok(from);
        }
        self.full_resync(
            "the target holds no consistent copy of the volume".into(),
            false,
        )?;
        Ok(self.consumer.producer_seq())
    }

    /// The kernel ring overflowed: writes after the last record are only in
    /// its dirty bitmap. The spool keeps the consistent prefix; the bitmap
    /// is taken (which ends the overflow) into the saved map, with whatever
    /// a running resync had not sent yet.
    pub(super) fn overflowed(&mut self) -> Result<(), DaemonError> {
        self.abandon_verify("the capture ring overflowed");
        let next = self.consumer.next_seq();
        let mut st = match std::mem::replace(&mut self.mode, Mode::Spool(None)) {
            Mode::Bitmap { st, .. } => st,
            Mode::Spool(run) => ResyncState::new(
                self.generation,
                self.shared.spool.next_seq(),
                "capture ring overflowed".into(),
                match run {
                    Some(run) => run.into_dirty(),
                    None => DirtyMap::new(self.set.volume_size, self.region_bytes),
                },
            ),
        };
        st.begin_seq = None;
        // Saved as "whole volume" first: the kernel clears its bitmap when
        // it hands it over, so dying between the two must not forget it.
        let mut whole = st.clone();
        whole.map.mark_all();
        super::resync::save_state(&self.set, &self.keys, &whole)?;
        match &self.kernel {
            Some(k) => {
                let b = k.device.take_bitmap(k.index)?;
                st.map
                    .merge_regions(u64::from(b.region_kib) * 1024, b.regions_set());
                if b.resume_seq != next {
                    tracing::error!(
                        resume = b.resume_seq,
                        next,
                        "capture resumed away from the drain position: marking the whole volume"
                    );
                    st.map.mark_all();
                }
            }
            None => st.map.mark_all(),
        }
        if !st.reason.contains("overflow") {
            st.reason = format!("{}; capture ring overflowed", st.reason);
        }
        super::resync::save_state(&self.set, &self.keys, &st)?;
        tracing::error!(
            volume = %self.set.volume,
            since_seq = st.since_seq,
            regions = st.map.count(),
            "capture ring overflowed: the volume needs a resync"
        );
        self.shared.set_resync(Some(st.since_seq));
        self.mode = Mode::Bitmap { st, begin: None };
        self.publish();
        Ok(())
    }
}
