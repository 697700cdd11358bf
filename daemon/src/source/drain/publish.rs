//! The drain's figures in the status: lag, spool, resync progress.

use std::sync::atomic::Ordering;

use super::{Drainer, Mode, RESYNC_REASON};
use crate::status::{ReasonKind, ReplicaState};

impl Drainer {
    /// Publishes lag, spool and resync figures.
    pub(super) fn publish(&self) {
        let c = &self.consumer;
        let spool = &self.shared.spool;
        let durable = self.shared.durable.load(Ordering::Acquire);
        let produced = c.producer_seq();
        let spooled = spool.next_seq();
        let (map, running) = match &self.mode {
            Mode::Bitmap { st, .. } => (Some(st), None),
            // A verify is not a resync: the replica stays what it is.
            Mode::Spool(Some(run)) if run.verifying().is_some() => (None, None),
            Mode::Spool(Some(run)) => (Some(&run.st), Some(run)),
            Mode::Spool(None) => (None, None),
        };
        let progress = match &self.mode {
            Mode::Spool(Some(run)) => Some(Self::progress(run)),
            _ => None,
        };
        let stopped = matches!(self.mode, Mode::Bitmap { .. });
        // Records the target lacks: in the spool and still in the ring (or,
        // while the stream is stopped, only those the spool can still ship).
        let end = if stopped { spooled } else { produced };
        let records = end.wrapping_sub(durable.wrapping_add(1));
        let records = if (records as i64) < 0 { 0 } else { records };
        let now = replica_ring::now_ns();
        let oldest_ns = spool
            .oldest_unacked_ns()
            .or_else(|| c.submit_ns(c.released_seq()));
        let seconds = match (records, oldest_ns) {
            (0, _) | (_, None) => 0.0,
            (_, Some(t)) => now.saturating_sub(t) as f64 / 1e9,
        };
        let bytes = spool.unacked_bytes() + if stopped { 0 } else { c.data_bytes_in_use() };
        let spool_bytes = spool.unacked_bytes();
        let blocked = self.blocked.clone();
        self.board.update(&self.set.volume, |s| {
            s.captured_seq = c.next_seq();
            s.spooled_seq = spooled;
            s.spool_bytes = spool_bytes;
            s.lag_records = records;
            s.lag_bytes = if records == 0 { 0 } else { bytes };
            s.lag_seconds = seconds;
            if progress.is_some() {
                s.resync_progress = progress;
            }
            match map {
                Some(st) => {
                    s.needs_resync = true;
                    s.resync_since_seq = st.since_seq;
                    s.dirty_regions = st.map.count();
                    s.dirty_bytes = st.map.count() * st.map.region_bytes();
                    s.resync_running = running.is_some();
                    s.resync_total_regions =
                        running.map_or(st.map.count(), |r| r.chunks.tally.total);
                    s.replica = if running.is_some() {
                        ReplicaState::Inconsistent
                    } else {
                        ReplicaState::Outdated
                    };
                    let state = match (running, &blocked) {
                        (Some(r), _) => {
                            let t = r.chunks.tally;
                            format!(
                                "resync running: {} of {} chunks left, {} compared ({} differing), {} sent",
                                st.map.count(),
                                t.total,
                                t.compared,
                                t.differing,
                                t.sent
                            )
                        }
                        (None, Some(b)) => format!("resync cannot start: {b}"),
                        (None, None) => "resync starts when the target is connected".into(),
                    };
                    s.set_reason(
                        ReasonKind::Resync,
                        format!(
                            "{RESYNC_REASON}: {} ({} regions dirty since record {}; {state})",
                            st.reason,
                            st.map.count(),
                            st.since_seq
                        ),
                    );
                }
                None => {
                    s.needs_resync = false;
                    s.resync_running = false;
                    s.dirty_regions = 0;
                    s.dirty_bytes = 0;
                    s.clear_reason(ReasonKind::Resync);
                    s.replica = if durable == 0 && records > 0 {
                        ReplicaState::Inconsistent
                    } else if records == 0 {
                        ReplicaState::UpToDate
                    } else {
                        ReplicaState::Consistent
                    };
                }
            }
        });
    }
}
