//! Recovery points and how far the replica is: taking a point at a flush
//! or marker (with pruning to `keep_points`), the id a new point gets,
//! checkpoints (flush, persist the applied record, trim the journal,
//! publish it to acks), and the resync window (BEGIN and END), during which
//! no point is taken.

use std::time::Instant;

use replica_proto::frame::RecordView;
use replica_store::state::{PointKind, RecoveryPoint, VolumeState};
use replica_store::StoreError;

use super::apply::Applier;
use crate::status::{ReasonKind, ReplicaState};

/// Status reason while a resync runs.
const RESYNC_RUNNING: &str = "resync in progress";

/// The status reason while the replica waits for or runs a resync.
pub(super) fn resync_reason(since: u64, full: bool) -> String {
    if full {
        format!("{RESYNC_RUNNING} since record {since}: the replica holds no consistent copy until a full resync ends")
    } else {
        format!("{RESYNC_RUNNING} since record {since}")
    }
}

/// The id of a new recovery point at record `seq`: the sequence itself
/// (a point taken again at the same record of this generation replaces
/// the old one), unless another point has that id — one of an earlier ring
/// generation, whose sequences started over — then the next id above
/// every point's, so a new point never replaces another record's.
pub(super) fn point_id(st: &VolumeState, seq: u64) -> u64 {
    if st
        .points
        .iter()
        .any(|p| p.id == seq && !(p.seq == seq && p.generation == st.generation))
    {
        // A point has the id `seq`, so the largest id is at least `seq`.
        st.points
            .iter()
            .map(|p| p.id)
            .max()
            .map_or(seq, |m| m.saturating_add(1))
    } else {
        seq
    }
}

/// Records point `id` at record `seq` of the current generation (replacing
/// a record of the same id), newest last. Not saved.
pub(super) fn record_point(
    st: &mut VolumeState,
    id: u64,
    seq: u64,
    kind: PointKind,
    source_time_ns: u64,
    marker: Option<u64>,
) {
    let generation = st.generation.clone();
    st.points.retain(|p| p.id != id);
    st.points.push(RecoveryPoint {
        id,
        seq,
        generation,
        source_time_ns,
        created_ns: super::now_ns(),
        kind,
        marker,
    });
}

impl Applier {
    /// Flushes the replica and records a recovery point at record `r`.
    ///
    /// Everything up to `r` is made durable and the journal trimmed first,
    /// so the space a snapshot needs is freed before it is taken. A snapshot
    /// that fails for lack of space is skipped (with a warning): a missed
    /// recovery point is better than a replica that stops advancing.
    pub(super) fn point(&mut self, r: &RecordView<'_>, kind: PointKind) -> Result<(), StoreError> {
        self.set_applied(r.seq);
        self.persist_applied()?;
        let keep = self.stream.settings.keep_points();
        let id = point_id(&self.stream.lock_state().disk, r.seq);
        // (The replica's lock is not held past the call.)
        let created = self.stream.volume().replica().create_point(id);
        if let Err(e) = created {
            if !e.is_recoverable() {
                return Err(e);
            }
            let why = format!("recovery point at record {} skipped: {e}", r.seq);
            tracing::warn!(volume = %self.stream.id, "{why}");
            self.board.update(&self.stream.id, |s| {
                s.set_reason(ReasonKind::RecoveryPoint, why.clone());
            });
            self.publish_applied();
            return Ok(());
        }
        let (count, pruned) = {
            let mut st = self.stream.lock_state();
            let marker = (kind == PointKind::Marker).then_some(r.aux);
            record_point(&mut st.disk, id, r.seq, kind, r.submit_ns, marker);
            let mut pruned = Vec::new();
            while st.disk.points.len() > keep {
                pruned.push(st.disk.points.remove(0).id);
            }
            st.save()?;
            (st.disk.points.len(), pruned)
        };
        for id in pruned {
            self.stream.volume().replica().delete_point(id)?;
        }
        self.last_point = Some(Instant::now());
        self.stream.lock_state().published = self.publishable(r.seq);
        self.board.update(&self.stream.id, |s| {
            s.applied_seq = r.seq;
            s.points = count as u64;
            s.last_point_seq = r.seq;
            s.replica = ReplicaState::Consistent;
            s.clear_reason(ReasonKind::RecoveryPoint);
        });
        Ok(())
    }

    /// Flushes the replica, persists the applied sequence, trims the
    /// journal, and tells acks and status.
    pub(super) fn checkpoint(&mut self) -> Result<(), StoreError> {
        self.persist_applied()?;
        self.publish_applied();
        Ok(())
    }

    /// Flushes the replica, persists the applied sequence, trims the journal.
    pub(super) fn persist_applied(&mut self) -> Result<(), StoreError> {
        self.stream.volume().replica().flush()?;
        self.check_store(false);
        let applied = {
            let mut st = self.stream.lock_state();
            st.disk.applied_seq = st.applied;
            st.save()?;
            st.applied
        };
        self.unflushed_segments = 0;
        self.last_checkpoint = Instant::now();
        self.stream.lock_journal().trim(applied)?;
        Ok(())
    }

    /// Tells acks and status how far the replica is (after any recovery
    /// point at that sequence exists).
    pub(super) fn publish_applied(&self) {
        let applied = {
            let mut st = self.stream.lock_state();
            st.published = self.publishable(st.applied).min(st.disk.applied_seq);
            st.published
        };
        self.board
            .update(&self.stream.id, |s| s.applied_seq = applied);
    }

    /// A resync starts at `r`: until it ends the replica is a mix of old and
    /// new regions, so no recovery point is taken (the last one stays the
    /// one to fail over to). A `full` one resends every region: its END
    /// makes even a replica without a consistent copy consistent.
    /// What the replica reads as zeros there goes to the source first
    /// (`generation`: the BEGIN's), before BEGIN is published as applied: a
    /// source that sees it applied without them knows none are coming.
    pub(super) fn resync_begin(
        &mut self,
        r: &RecordView<'_>,
        full: bool,
        generation: [u8; 16],
    ) -> Result<(), StoreError> {
        // Flushed first: what the filesystem reports about holes is then
        // about data on disk too, not only in its cache.
        self.stream.volume().replica().flush()?;
        self.announce_zeroes(generation, r.seq);
        self.set_applied(r.seq);
        let needs_full = {
            let mut st = self.stream.lock_state();
            st.disk.applied_seq = r.seq;
            st.disk.resync_since = Some(r.seq);
            if full {
                st.disk.needs_full_resync = false;
            }
            st.save()?;
            st.disk.needs_full_resync
        };
        tracing::warn!(volume = %self.stream.id, seq = r.seq, full, "resync started: the replica is inconsistent until it ends");
        self.board.update(&self.stream.id, |s| {
            s.replica = ReplicaState::Inconsistent;
            s.set_reason(ReasonKind::Resync, resync_reason(r.seq, needs_full));
        });
        Ok(())
    }

    /// The resync that started earlier has sent every region. Returns
    /// whether the replica is consistent now: not while it still waits for
    /// a full resync (this one resent only some regions).
    pub(super) fn resync_end(&mut self, r: &RecordView<'_>) -> Result<bool, StoreError> {
        {
            let mut st = self.stream.lock_state();
            if st.disk.needs_full_resync {
                tracing::warn!(volume = %self.stream.id, seq = r.seq, "a partial resync ended, but the replica still needs a full one: it stays inconsistent");
                return Ok(false);
            }
            st.disk.resync_since = None;
        }
        tracing::info!(volume = %self.stream.id, seq = r.seq, "resync complete");
        self.board.update(&self.stream.id, |s| {
            s.clear_reason(ReasonKind::Resync);
        });
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(generation: &str, points: &[(u64, u64, &str)]) -> VolumeState {
        VolumeState {
            generation: generation.into(),
            points: points
                .iter()
                .map(|&(id, seq, g)| RecoveryPoint {
                    id,
                    seq,
                    generation: g.into(),
                    source_time_ns: 0,
                    created_ns: 0,
                    kind: PointKind::Crash,
                    marker: None,
                })
                .collect(),
            ..VolumeState::default()
        }
    }

    #[test]
    fn a_new_point_takes_its_sequence_as_id_unless_an_older_generation_holds_it() {
        // Free id: the sequence.
        assert_eq!(point_id(&state("b", &[(5, 5, "b")]), 9), 9);
        // Taken again at the same record of this generation: replaces.
        assert_eq!(point_id(&state("b", &[(9, 9, "b")]), 9), 9);
        // Id 9 belongs to a point of generation a: the next id above all.
        assert_eq!(point_id(&state("b", &[(9, 9, "a"), (12, 12, "a")]), 9), 13);
    }

    #[test]
    fn recording_a_point_replaces_one_of_the_same_id_and_goes_last() {
        let mut st = state("b", &[(3, 3, "b"), (4, 4, "b")]);
        record_point(&mut st, 3, 3, PointKind::Marker, 7, Some(1));
        let ids: Vec<u64> = st.points.iter().map(|p| p.id).collect();
        assert_eq!(ids, vec![4, 3]);
        let p = st.points.last().expect("point");
        assert_eq!(
            (p.kind, p.marker, p.generation.as_str()),
            (PointKind::Marker, Some(1), "b")
        );
    }
}
