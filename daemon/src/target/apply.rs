//! The applier: one thread per stream that applies journaled segments to
//! the replica in order. It opens frames read back from the journal
//! (authentication and decompression), checks the records (sequence,
//! bounds, a gap only before a resync BEGIN), applies them with the
//! replica's writes ordered, retries recoverable storage errors on a
//! backoff, and reports the backend's warnings. Its inbox also carries
//! promotions and takeovers, so both happen in stream order. A retry gives
//! way to an unplanned failover that waits (see `promote`): the applier
//! sets the retried segment and everything queued after it aside, applied
//! only if the failover does not happen.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use replica_proto::frame::{self, resync, FrameError, RecordView, SegmentHeader};
use replica_proto::keys::KeyError;
use replica_proto::msg::{self, Zeroes};
use replica_store::journal::{self, FramePos};
use replica_store::replica::ApplyOp;
use replica_store::state::PointKind;
use replica_store::StoreError;

use super::compare::{self, Answer, Comparer, HashRecordError, Job};
use super::keys::KeyCache;
use super::promote::{PromoteError, PromoteReq};
use super::stream::Stream;
use super::takeover::{Takeover, TakeoverError};
use crate::keystore::KeyStore;
use crate::retry::{Backoff, Decision, ErrorClass};
use crate::status::{ReasonKind, StatusBoard};

/// The applier flushes the replica and persists how far it is after this
/// many segments or this long, whichever comes first.
const CHECKPOINT_SEGMENTS: u32 = 64;
const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(1);

/// How long the applier waits for a message before it looks at the
/// backend, an unflushed checkpoint and the stop flag.
const IDLE_TICK: Duration = Duration::from_millis(200);

/// Waits between attempts at a replica operation that failed recoverably
/// (a full pool): doubling from 100 ms, then every 10 s.
const STORE_RETRY_SECS: [f64; 8] = [0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 10.0];

/// What the applier is asked to do, in order.
pub(super) enum ApplyMsg {
    /// A journaled segment: where it is, and its authenticated (still
    /// compressed) payload when the receiver still has it; after a restart
    /// the applier reads and authenticates the frame from the journal
    /// itself.
    Segment {
        /// Where it is journaled, with its header.
        pos: FramePos,
        /// Its authenticated payload, if the receiver has it.
        body: Option<Vec<u8>>,
    },
    /// Failover: promote the replica once everything queued before is
    /// applied.
    Promote {
        /// The request, pending in the stream's state until taken up.
        id: u64,
        /// What to promote.
        req: PromoteReq,
        /// The answer.
        reply: Sender<Result<msg::Promoted, PromoteError>>,
    },
    /// A stream of another ring generation takes the stream over (see
    /// the `takeover` module).
    Takeover {
        /// What it sets.
        takeover: Takeover,
        /// The answer.
        reply: Sender<Result<(), TakeoverError>>,
    },
}

/// Why a journaled segment cannot be applied (the stream goes Critical).
#[derive(Debug, thiserror::Error)]
enum SegmentError {
    /// The payload does not decompress.
    #[error("{0}")]
    Decompress(#[source] FrameError),
    /// The frame cannot be read back from the journal.
    #[error("journal unreadable: {0}")]
    Journal(#[source] StoreError),
    /// Its stream key cannot be derived.
    #[error("{0}")]
    Key(#[source] KeyError),
    /// The frame read back does not open.
    #[error("{0}")]
    Open(#[source] FrameError),
    /// Its records do not decode.
    #[error("{0}")]
    Records(#[source] FrameError),
    /// A record writes beyond the volume.
    #[error(transparent)]
    Bounds(#[from] BoundsError),
    /// A sequence gap not followed by a resync.
    #[error("a segment after a sequence gap does not start a resync")]
    GapWithoutResync,
    /// A hash record that names no chunks of this volume.
    #[error(transparent)]
    HashRecord(#[from] HashRecordError),
}

/// A record that writes outside the volume.
#[derive(Debug, thiserror::Error)]
enum BoundsError {
    /// Its start in bytes does not fit in 64 bits.
    #[error("sector overflow")]
    SectorOverflow {
        /// The record.
        seq: u64,
    },
    /// Its end in bytes does not fit in 64 bits.
    #[error("length overflow")]
    LengthOverflow {
        /// The record.
        seq: u64,
    },
    /// It ends past the volume's end.
    #[error("record {seq} writes [{start}, {end}) beyond the volume end {size}")]
    BeyondEnd {
        /// The record.
        seq: u64,
        /// First byte written.
        start: u64,
        /// First byte after.
        end: u64,
        /// The volume's size.
        size: u64,
    },
}

/// Applies journaled segments to the replica in order.
pub(super) struct Applier {
    /// The stream it applies (its state and replica).
    pub(super) stream: Arc<Stream>,
    keys: KeyCache,
    /// Status.
    pub(super) board: Arc<StatusBoard>,
    /// Set when the daemon stops.
    stop: Arc<AtomicBool>,
    /// Segments applied since the last checkpoint.
    pub(super) unflushed_segments: u32,
    /// When the replica was last flushed and its applied record persisted.
    pub(super) last_checkpoint: Instant,
    /// When the last recovery point was taken (since this start).
    pub(super) last_point: Option<Instant>,
    /// Reused decompression context (None if it could not be allocated:
    /// then each segment gets a fresh one).
    dctx: Option<zstd::bulk::Decompressor<'static>>,
    /// The backend's warnings in the status (e.g. thin pool space), and
    /// when they were last asked for.
    store_warnings: Vec<String>,
    warnings_checked: Option<Instant>,
    /// What the applier set aside, in order, giving way to an unplanned
    /// failover: the segment it was retrying (read back from the journal
    /// when applied after all) and what was queued behind it. Handled as
    /// if it came now once no such failover waits (promoted: dropped).
    set_aside: Vec<ApplyMsg>,
    /// Compares the chunks of hash records beside the applier.
    comparer: Comparer,
}

/// How a retried replica operation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Retried {
    /// It succeeded.
    Done,
    /// It gave way to an unplanned failover (it did not succeed).
    GaveWay,
    /// It failed for good (the stream is Critical) or the daemon stops.
    Failed,
}

/// How a store error is handled: a full disk is retried, anything else is
/// Critical.
fn store_class(e: &StoreError) -> ErrorClass {
    if e.is_recoverable() {
        ErrorClass::Recoverable
    } else {
        ErrorClass::Fatal
    }
}

/// Whether `r` is a resync BEGIN marker.
fn is_resync_begin(r: &RecordView<'_>) -> bool {
    r.op == frame::ring_op::MARKER
        && r.flags & frame::RECORD_FLAG_RESYNC != 0
        && matches!(
            resync::Marker::from_aux(r.aux),
            Some(resync::Marker::Begin { .. })
        )
}

/// Checks that every write, discard and zeroing of `records` is within a
/// volume of `size` bytes.
fn check_bounds(records: &[RecordView<'_>], size: u64) -> Result<(), BoundsError> {
    for r in records {
        if matches!(
            r.op,
            frame::ring_op::WRITE | frame::ring_op::DISCARD | frame::ring_op::WRITE_ZEROES
        ) {
            let seq = r.seq;
            let start = r
                .sector
                .checked_mul(512)
                .ok_or(BoundsError::SectorOverflow { seq })?;
            let end = start
                .checked_add(u64::from(r.len))
                .ok_or(BoundsError::LengthOverflow { seq })?;
            if end > size {
                return Err(BoundsError::BeyondEnd {
                    seq,
                    start,
                    end,
                    size,
                });
            }
        }
    }
    Ok(())
}

impl Applier {
    /// The applier of `stream`.
    pub(super) fn new(
        stream: Arc<Stream>,
        keys: Arc<KeyStore>,
        board: Arc<StatusBoard>,
        stop: Arc<AtomicBool>,
    ) -> Self {
        let comparer = Comparer::start(
            &stream.id,
            stream.volume().size,
            keys.clone(),
            stream.answers.clone(),
            board.clone(),
        );
        Self {
            comparer,
            stream,
            keys: KeyCache::new(keys),
            board,
            stop,
            unflushed_segments: 0,
            last_checkpoint: Instant::now(),
            last_point: None,
            dctx: zstd::bulk::Decompressor::new().ok(),
            store_warnings: Vec::new(),
            warnings_checked: None,
            set_aside: Vec::new(),
        }
    }

    /// Applies what arrives on `rx` until every sender is gone (or the
    /// daemon stops with nothing queued), then checkpoints.
    pub(super) fn run(mut self, rx: Receiver<ApplyMsg>) {
        loop {
            if !self.resume() {
                break;
            }
            let msg = match rx.recv_timeout(IDLE_TICK) {
                Ok(m) => m,
                Err(RecvTimeoutError::Timeout) => {
                    self.check_store(false);
                    if self.unflushed_segments > 0 && self.set_aside.is_empty() {
                        self.retry("checkpoint", |a| a.checkpoint());
                    } else {
                        // Comparisons answered since the last checkpoint
                        // let acks report more as applied.
                        self.publish_applied();
                    }
                    if self.stop.load(Ordering::Acquire) && rx.is_empty() {
                        break;
                    }
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => break,
            };
            if !self.handle(msg) {
                break;
            }
        }
        if self.unflushed_segments > 0 {
            let _ = self.checkpoint();
        }
    }

    /// Handles one message of the inbox (or one set aside). Returns false
    /// when the applier is to stop.
    fn handle(&mut self, msg: ApplyMsg) -> bool {
        // Behind what was set aside: set aside too, in order, or handled
        // after it once no failover waits (which may set some aside again).
        while !self.set_aside.is_empty() && !matches!(msg, ApplyMsg::Promote { .. }) {
            if self.giving_way() {
                self.set_aside.push(msg);
                return true;
            }
            if !self.resume() {
                return false;
            }
        }
        match msg {
            ApplyMsg::Segment { pos, body } => self.segment(pos, body),
            ApplyMsg::Promote { id, req, reply } => {
                if !self.stream.lock_state().take_failover(id) {
                    // Withdrawn by its requester (timed out) or refused:
                    // nobody waits for it any more.
                    return true;
                }
                let r = self.promote(req);
                if let Err(e) = &r {
                    tracing::error!(volume = %self.stream.id, "failover refused: {e}");
                }
                let _ = reply.send(r);
                true
            }
            ApplyMsg::Takeover { takeover, reply } => {
                let _ = reply.send(self.take_over(&takeover));
                true
            }
        }
    }

    /// Whether an unplanned failover waits: the applier gives way to it.
    fn giving_way(&self) -> bool {
        self.stream.lock_state().unplanned_failover_waiting()
    }

    /// Handles what was set aside once no unplanned failover waits any
    /// more (it promoted the replica, and the segments are dropped; or it
    /// did not happen, and they are applied now, before anything newer).
    /// Returns false when the applier is to stop.
    fn resume(&mut self) -> bool {
        if self.set_aside.is_empty() || self.giving_way() {
            return true;
        }
        for msg in std::mem::take(&mut self.set_aside) {
            if !self.handle(msg) {
                // What is left is journaled: replayed at the next start.
                return false;
            }
        }
        true
    }

    /// Applies one journaled segment (a Critical or promoted stream's are
    /// dropped). Returns false when the applier is to stop.
    fn segment(&mut self, pos: FramePos, body: Option<Vec<u8>>) -> bool {
        let h = &pos.header;
        let (other_generation, applied) = {
            let st = self.stream.lock_state();
            if st.disk.critical.is_some() || st.disk.promoted.is_some() {
                return true;
            }
            (hex::encode(h.generation) != st.disk.generation, st.applied)
        };
        if other_generation {
            // Takeovers are ordered behind every segment of the old
            // generation and no stream is accepted while one is
            // pending: a segment of another generation here would be
            // applied in the wrong sequence space.
            self.stream.go_critical(
                &self.board,
                &format!(
                    "segment {}..={} belongs to ring generation {}, not to the replica's",
                    h.first_seq,
                    h.last_seq,
                    hex::encode(h.generation)
                ),
            );
            return true;
        }
        if h.last_seq <= applied {
            return true;
        }
        let gap = h.features & frame::FEATURE_RESYNC_GAP != 0;
        if h.first_seq > applied.saturating_add(1) && !gap {
            // Cannot happen while segments arrive in journal order; if
            // it does, applying would silently skip records.
            self.stream.go_critical(
                &self.board,
                &format!(
                    "segment {}..={} would leave a gap after applied record {applied}",
                    h.first_seq, h.last_seq
                ),
            );
            return true;
        }
        let plain = match self.plain(&pos, body) {
            Ok(p) => p,
            Err(e) => return self.reject(h, &e),
        };
        let records = match self.records(h, &plain, gap) {
            Ok(r) => r,
            Err(e) => return self.reject(h, &e),
        };
        match self.retry("apply", |a| a.apply_records(h, &records)) {
            Retried::Done => {
                self.unflushed_segments += 1;
                // A flush of the replica costs the same for one small
                // segment as for many: bounded by time and count, not per
                // segment, so a stream of small segments keeps up.
                if self.unflushed_segments >= CHECKPOINT_SEGMENTS
                    || self.last_checkpoint.elapsed() >= CHECKPOINT_INTERVAL
                {
                    self.retry("checkpoint", |a| a.checkpoint());
                }
                true
            }
            Retried::GaveWay => {
                tracing::warn!(
                    volume = %self.stream.id,
                    first = h.first_seq,
                    last = h.last_seq,
                    applied = self.stream.lock_state().applied,
                    "an unplanned failover waits: the segment being retried and those queued after it stay journaled, unapplied"
                );
                self.set_aside.push(ApplyMsg::Segment { pos, body: None });
                true
            }
            Retried::Failed => !self.stop.load(Ordering::Acquire),
        }
    }

    /// A journaled segment that cannot be applied makes the stream
    /// Critical; the applier goes on (it applies nothing more).
    fn reject(&self, h: &SegmentHeader, e: &SegmentError) -> bool {
        self.stream.go_critical(
            &self.board,
            &format!("journaled segment {}..={}: {e}", h.first_seq, h.last_seq),
        );
        true
    }

    /// The decompressed payload of a segment: from the receiver's
    /// authenticated body, or read back from the journal and opened.
    fn plain(&mut self, pos: &FramePos, body: Option<Vec<u8>>) -> Result<Vec<u8>, SegmentError> {
        match body {
            Some(b) => match self.dctx.as_mut() {
                Some(d) => frame::decompress_owned(d, &pos.header, b),
                None => frame::decompress(&pos.header, &b),
            }
            .map_err(SegmentError::Decompress),
            None => {
                let dir = self.stream.lock_journal().dir().to_owned();
                let b = journal::read_frame(&dir, pos).map_err(SegmentError::Journal)?;
                self.open(&pos.header, &b)
            }
        }
    }

    /// The records of a payload, checked against the volume's bounds; after
    /// a gap the first must begin a resync.
    fn records<'p>(
        &self,
        h: &SegmentHeader,
        plain: &'p [u8],
        gap: bool,
    ) -> Result<Vec<RecordView<'p>>, SegmentError> {
        let r = frame::decode_records(h, plain).map_err(SegmentError::Records)?;
        check_bounds(&r, self.stream.volume().size)?;
        for rec in r.iter().filter(|r| r.op == frame::OP_CHUNK_HASHES) {
            compare::check(rec, self.stream.volume().size)?;
        }
        if gap && !r.first().is_some_and(is_resync_begin) {
            return Err(SegmentError::GapWithoutResync);
        }
        Ok(r)
    }

    /// Authenticates and decompresses a journaled frame.
    fn open(&mut self, h: &SegmentHeader, bytes: &[u8]) -> Result<Vec<u8>, SegmentError> {
        let key = self
            .keys
            .get(&self.stream.id, h)
            .map_err(SegmentError::Key)?;
        frame::open(h, bytes, key).map_err(SegmentError::Open)
    }

    /// Runs `f` until it succeeds, retrying recoverable storage errors
    /// (full disk) on a backoff that watches `stop` and the stream's
    /// failover requests: it gives way to an unplanned one, and refuses a
    /// planned one (which needs every record applied) with the error. A
    /// non-recoverable error makes the stream Critical.
    pub(super) fn retry(
        &mut self,
        what: &'static str,
        mut f: impl FnMut(&mut Self) -> Result<(), StoreError>,
    ) -> Retried {
        let mut backoff = Backoff::from_secs(&STORE_RETRY_SECS);
        loop {
            let e = match f(self) {
                Ok(()) => {
                    self.clear_replica_warning();
                    return Retried::Done;
                }
                Err(e) => e,
            };
            match backoff.on_failure(store_class(&e), Instant::now()) {
                Decision::RetryAt(until) => {
                    let why = format!("replica {what} failed, retrying: {e}");
                    tracing::warn!(volume = %self.stream.id, "{why}");
                    self.board.update(&self.stream.id, |s| {
                        s.set_reason(ReasonKind::Replica, why.clone());
                    });
                    self.check_store(true);
                    {
                        let mut st = self.stream.lock_state();
                        if st.unplanned_failover_waiting() {
                            return Retried::GaveWay;
                        }
                        if st.planned_failover_waiting() {
                            tracing::error!(volume = %self.stream.id, "planned failover refused: the replica cannot be written");
                            st.refuse_planned_failover(PromoteError::ReplicaFailing {
                                what,
                                source: e,
                            });
                        }
                    }
                    while Instant::now() < until {
                        if self.stop.load(Ordering::Acquire) {
                            return Retried::Failed;
                        }
                        {
                            let st = self.stream.lock_state();
                            if st.unplanned_failover_waiting() {
                                return Retried::GaveWay;
                            }
                            if st.planned_failover_waiting() {
                                // Try now: it is refused if this fails.
                                break;
                            }
                        }
                        std::thread::sleep(Duration::from_millis(20));
                    }
                }
                Decision::Critical => {
                    self.stream
                        .go_critical(&self.board, &format!("replica {what}: {e}"));
                    return Retried::Failed;
                }
            }
        }
    }

    /// A replica operation succeeded: a Warning of an earlier failure goes.
    fn clear_replica_warning(&self) {
        self.board
            .update(&self.stream.id, |s| s.clear_reason(ReasonKind::Replica));
    }

    /// Applies the records of one segment past the applied sequence, in
    /// order; resync markers, flushes and markers on the way move the
    /// resync window and take recovery points.
    fn apply_records(
        &mut self,
        h: &SegmentHeader,
        records: &[RecordView<'_>],
    ) -> Result<(), StoreError> {
        let mut ops: Vec<ApplyOp<'_>> = Vec::new();
        let start = self.stream.lock_state().applied;
        let mut applied = start;
        for r in records {
            if r.seq <= applied {
                continue;
            }
            let off = r.sector * 512;
            if matches!(
                r.op,
                frame::ring_op::WRITE | frame::ring_op::DISCARD | frame::ring_op::WRITE_ZEROES
            ) && self.comparer.busy()
            {
                // Not before a comparison still reading there saw the
                // replica as it was at its hash record.
                let len = if r.op == frame::ring_op::WRITE {
                    r.data.len() as u64
                } else {
                    u64::from(r.len)
                };
                self.flush_ops(&mut ops)?;
                self.comparer.before_write(off, len);
            }
            match r.op {
                frame::OP_CHUNK_HASHES => {
                    // Everything before it is on the replica.
                    self.flush_ops(&mut ops)?;
                    let size = self.stream.volume().size;
                    let access = self.stream.volume().replica().reader();
                    // Checked when the segment was decoded.
                    if let Ok(job) = Job::of(h.generation, r, size, access) {
                        self.comparer.submit(job, &self.stream.answers);
                    }
                }
                frame::ring_op::WRITE => ops.push(ApplyOp::Write {
                    offset: off,
                    data: r.data,
                }),
                frame::ring_op::DISCARD => ops.push(ApplyOp::Discard {
                    offset: off,
                    len: u64::from(r.len),
                }),
                frame::ring_op::WRITE_ZEROES => ops.push(ApplyOp::Zero {
                    offset: off,
                    len: u64::from(r.len),
                }),
                frame::ring_op::MARKER if r.flags & frame::RECORD_FLAG_RESYNC != 0 => {
                    self.flush_ops(&mut ops)?;
                    match resync::Marker::from_aux(r.aux) {
                        Some(resync::Marker::Begin { full }) => {
                            self.resync_begin(r, full, h.generation)?
                        }
                        Some(resync::Marker::End) => {
                            if self.resync_end(r)? {
                                self.point(r, PointKind::Marker)?;
                            }
                        }
                        // Data and hash markers become writes and hash
                        // records on the source; a stray one carries
                        // nothing to apply.
                        Some(resync::Marker::Data { .. } | resync::Marker::Hash { .. }) | None => {}
                    }
                    applied = r.seq;
                    self.set_applied(applied);
                    continue;
                }
                frame::ring_op::FLUSH | frame::ring_op::MARKER => {
                    self.flush_ops(&mut ops)?;
                    let kind = if r.op == frame::ring_op::MARKER {
                        PointKind::Marker
                    } else {
                        PointKind::Crash
                    };
                    let interval = self.stream.settings.crash_point_interval();
                    let due = kind == PointKind::Marker
                        || self.last_point.is_none_or(|t| t.elapsed() >= interval);
                    if due && self.stream.lock_state().disk.resync_since.is_none() {
                        self.point(r, kind)?;
                    }
                    applied = r.seq;
                    self.set_applied(applied);
                    continue;
                }
                _ => {} // skipped (failed on the source)
            }
            applied = r.seq;
        }
        self.flush_ops(&mut ops)?;
        let n = records
            .iter()
            .filter(|r| r.seq > start && r.seq <= applied)
            .count() as u64;
        debug_assert!(applied <= h.last_seq);
        self.set_applied(applied);
        self.board
            .update(&self.stream.id, |s| s.applied_records += n);
        Ok(())
    }

    /// Tells the source what the replica reads as zeros at the resync
    /// BEGIN `seq` (every earlier record applied, no later one yet): it
    /// compares none of those chunks (see [`replica_proto::msg::Zeroes`]).
    /// When the backend cannot tell, nothing is claimed and the source
    /// compares as usual.
    pub(super) fn announce_zeroes(&mut self, generation: [u8; 16], seq: u64) {
        let known = self.stream.volume().replica().known_zero();
        match known {
            Ok(ranges) => {
                let z = Zeroes::new(generation, seq, ranges);
                let bytes: u64 = z.ranges().iter().map(|r| r.1).sum();
                tracing::info!(volume = %self.stream.id, seq, zero_bytes = bytes, ranges = z.ranges().len(), "the replica's zero ranges at the resync's start go to the source");
                self.stream.answers.push(Answer::Zeroes(z));
            }
            Err(e) => {
                tracing::warn!(volume = %self.stream.id, seq, error = %e, "cannot tell which parts of the replica are zeros: the source compares every chunk");
            }
        }
    }

    /// Applies the operations gathered so far and empties the list.
    fn flush_ops(&mut self, ops: &mut Vec<ApplyOp<'_>>) -> Result<(), StoreError> {
        self.stream.volume().replica().apply(ops)?;
        ops.clear();
        Ok(())
    }

    /// How far acks may report the replica applied when it is applied up
    /// to `seq`: not past a hash record whose comparison is not answered
    /// (a source that sees it applied without an answer compares again).
    pub(super) fn publishable(&self, seq: u64) -> u64 {
        self.comparer
            .unanswered_before()
            .map_or(seq, |s| seq.min(s.saturating_sub(1)))
    }

    /// Moves the stream's applied record (the applier is the only one).
    pub(super) fn set_applied(&self, seq: u64) {
        self.stream.lock_state().applied = seq;
    }

    /// Puts the backend's warnings (pool space) in the status, at most
    /// every few seconds unless `now`.
    pub(super) fn check_store(&mut self, now: bool) {
        if !now
            && self
                .warnings_checked
                .is_some_and(|t| t.elapsed() < Duration::from_secs(5))
        {
            return;
        }
        self.warnings_checked = Some(Instant::now());
        let warnings = self.stream.volume().replica().warnings();
        let new = match warnings {
            Ok(w) => w,
            Err(e) => vec![format!("replica storage status unavailable: {e}")],
        };
        if new != self.store_warnings {
            for w in &new {
                tracing::warn!(volume = %self.stream.id, "{w}");
            }
        }
        self.store_warnings.clone_from(&new);
        self.board.update(&self.stream.id, |s| {
            if new.is_empty() {
                s.clear_reason(ReasonKind::Backend);
            } else {
                s.set_reason(ReasonKind::Backend, new.join("; "));
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(seq: u64, sector: u64, len: u32) -> RecordView<'static> {
        RecordView {
            seq,
            op: frame::ring_op::WRITE,
            flags: 0,
            volume: 0,
            sector,
            len,
            aux: 0,
            submit_ns: 0,
            data: &[],
        }
    }

    #[test]
    fn a_write_past_the_volume_end_or_overflowing_is_out_of_bounds() {
        assert!(check_bounds(&[write(1, 0, 4096), write(2, 7, 512)], 4096).is_ok());
        match check_bounds(&[write(1, 0, 512), write(2, 8, 512)], 4096) {
            Err(BoundsError::BeyondEnd {
                seq: 2,
                start: 4096,
                end: 4608,
                size: 4096,
            }) => {}
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            check_bounds(&[write(3, u64::MAX / 256, 512)], 4096),
            Err(BoundsError::SectorOverflow { seq: 3 })
        ));
    }
}
