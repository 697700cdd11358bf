//! A running resync, ordered by ring markers: once a session is connected,
//! the drain asks the kernel for a BEGIN marker; from that point of the ring on,
//! records are spooled again (the stream resumes after a gap the target
//! accepts because it starts with BEGIN). Then, a few at a time and paced
//! by the target's answers and acknowledgements, it inserts markers naming
//! runs of chunks (the map's regions): HASH markers for chunks to compare,
//! DATA markers for chunks known to differ. When the drain reaches a
//! marker, every earlier record has completed on the source: for a HASH
//! marker it reads and hashes the chunks and spools their hashes *at the
//! marker's position* (the target compares its replica when its apply
//! order gets there and answers which differ, see [`super::chunks`]); for a
//! DATA marker it reads the chunks and spools them as a write at that
//! position: later writes come after it in the stream and win. When every
//! chunk is proven (equal, or sent), an END marker closes the resync; the
//! target is consistent again at END.
//!
//! An online verify is the same walk of HASH markers over the whole volume
//! without BEGIN and END: the replica stays consistent; differing chunks
//! are reported and, when asked, sent as DATA (ordinary writes in the
//! stream).
//!
//! Before it inserts END the drain takes the kernel's dirty bitmap again and
//! merges it into the run's map ([`Drainer::kernel_settled`]): regions the
//! kernel marked after the bitmap was first taken (a write that failed, a
//! write made in overflow mode that completed only after the take) must be
//! resent too. Overflow-mode writes are not ordered against ring markers, so
//! while the kernel reports any still in flight a DATA read may have missed
//! them: END waits until a take returns no new region with none in flight;
//! new regions are compared first. The map is saved as "whole volume"
//! before each take, so a daemon killed between the take and the save
//! resends everything rather than forget what it took.

use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use replica_proto::chunk::{ChunkKey, ChunkSpan, HashAux, MAX_CHUNKS_PER_RECORD};
use replica_proto::frame::{self, resync::Marker, OP_CHUNK_HASHES, OP_SKIPPED, RECORD_FLAG_RESYNC};
use replica_proto::msg::Compared;
use replica_ring::Record;

use super::chunks::Chunks;
use super::{io_err, DrainSettings, Drainer, KernelRing, Mode};
use crate::chunkio::hash_chunks;
use crate::source::dirty::{DirtyMap, ResyncState};
use crate::status::ReasonKind;
use crate::DaemonError;

/// Markers in the ring, not yet drained, at most.
pub(super) const MAX_OUTSTANDING: u32 = 4;
/// Offsets of differing chunks a verify report lists, at most.
const REPORT_OFFSETS: usize = 1000;

/// What a run is for.
#[derive(Debug, Clone)]
pub(super) enum Purpose {
    /// A resync between BEGIN and END: the replica is inconsistent until END.
    Resync,
    /// An online verify.
    Verify(Verify),
}

/// An online verify's settings and findings.
#[derive(Debug, Clone)]
pub(super) struct Verify {
    /// Send the chunks found different.
    pub(super) resync: bool,
    /// Bytes compared per second, at most (source and target reads).
    pub(super) max_rate: Option<u64>,
    /// No HASH marker before this (the rate limit).
    pub(super) next_at: Instant,
    /// Offsets of the chunks found different (the first ones).
    pub(super) offsets: Vec<u64>,
    /// The last DATA marker of its repairs.
    pub(super) repair_seq: u64,
    /// When it started (ns since the epoch).
    pub(super) started_ns: u64,
}

/// A verify's HASH record whose chunks the application may have written
/// while the source read them: writes reserved after the marker and
/// before the read ended (`until`) may be in the read, not on the target
/// at the record; a difference in such a chunk proves nothing.
#[derive(Debug, Clone)]
pub(super) struct Window {
    seq: u64,
    until: u64,
    span: ChunkSpan,
    touched: Vec<bool>,
}

/// How often a verify compares a chunk the application keeps writing
/// before it gives up on it (reported as busy).
const MAX_DOUBTS: u8 = 4;

impl Verify {
    /// A verify (`resync`: send what differs), at most `max_rate` bytes per
    /// second.
    pub(super) fn new(resync: bool, max_rate: Option<u64>) -> Self {
        Self {
            resync,
            max_rate,
            next_at: Instant::now(),
            offsets: Vec::new(),
            repair_seq: 0,
            started_ns: crate::now_ns(),
        }
    }
}

/// A resync (BEGIN is in the spool) or a verify in progress.
pub(super) struct Run {
    /// Chunks still to prove (`begin_seq` set for a resync).
    pub(super) st: ResyncState,
    /// What the answers proved so far, what is issued.
    pub(super) chunks: Chunks,
    /// Resync or verify.
    pub(super) purpose: Purpose,
    /// Markers inserted and not yet drained.
    pub(super) outstanding: u32,
    /// The END marker's sequence, once inserted.
    pub(super) end: Option<u64>,
    /// Its BEGIN said it covers every chunk.
    pub(super) full: bool,
    /// Chunks proven since the state was last saved.
    pub(super) unsaved: bool,
    pub(super) last_save: Instant,
    /// When the kernel's bitmap was last taken before END (END waits while
    /// overflow-mode writes are in flight; takes are spaced out).
    pub(super) last_kernel_take: Option<Instant>,
    /// Overflow-mode writes in flight at that take.
    pub(super) kernel_in_flight: u64,
    /// Why that take failed, once logged.
    pub(super) kernel_take_error: Option<String>,
    /// The chunk key (of the key ring's active key when last derived).
    key: Option<ChunkKey>,
    /// A verify: the chunks it found different (all of them, sent or not).
    pub(super) found: DirtyMap,
    /// A verify: its HASH records whose reads writes may have overlapped.
    windows: Vec<Window>,
    /// A verify: how often a chunk's difference was in doubt.
    doubts: std::collections::HashMap<u64, u8>,
    /// A verify: answers that came before the drain passed every write that
    /// may have been in their read (looked at again later).
    deferred: Vec<Compared>,
    /// BEGIN was spooled by this daemon: no chunk is compared until the
    /// target's zero ranges for it came, or the target reported BEGIN
    /// applied without them (it sends them first, so none are coming).
    pub(super) zeroes_due: bool,
}

impl Run {
    /// A resync that begins (`resumed`: or resumes after a restart) with
    /// the chunks still in `st`'s map.
    pub(super) fn new(st: ResyncState, full: bool, resumed: bool) -> Self {
        Self::with(st, full, resumed, Purpose::Resync)
    }

    /// A verify of every chunk of a volume of `volume_size` bytes.
    pub(super) fn verify(generation: [u8; 16], volume_size: u64, chunk: u64, v: Verify) -> Self {
        let mut map = DirtyMap::new(volume_size, chunk);
        map.mark_all();
        let st = ResyncState::new(generation, 0, "verify".into(), map);
        Self::with(st, false, false, Purpose::Verify(v))
    }

    fn with(st: ResyncState, full: bool, resumed: bool, purpose: Purpose) -> Self {
        Self {
            found: DirtyMap::new(st.map.volume_size(), st.map.region_bytes()),
            windows: Vec::new(),
            doubts: Default::default(),
            deferred: Vec::new(),
            chunks: Chunks::new(&st, resumed),
            st,
            purpose,
            outstanding: 0,
            end: None,
            full,
            unsaved: false,
            last_save: Instant::now(),
            last_kernel_take: None,
            kernel_in_flight: 0,
            kernel_take_error: None,
            key: None,
            zeroes_due: false,
        }
    }

    /// A verify's settings, if it is one.
    pub(super) fn verifying(&self) -> Option<&Verify> {
        match &self.purpose {
            Purpose::Verify(v) => Some(v),
            Purpose::Resync => None,
        }
    }

    /// What a resync that replaces this run must still cover: a resync's
    /// unproven chunks; for a verify, every chunk it found different (the
    /// ones it sent too: their writes may be in a spool that is dropped).
    pub(super) fn into_dirty(self) -> DirtyMap {
        match self.purpose {
            Purpose::Resync => self.st.map,
            Purpose::Verify(_) => self.found,
        }
    }

    /// Takes the target's answers (and those held back before) with the
    /// drain at `drained` and the target at `applied`; returns how many
    /// chunks lost their answer and are compared again.
    fn take_answers(&mut self, new: Vec<Compared>, drained: u64, applied: u64) -> u64 {
        let mut answers = std::mem::take(&mut self.deferred);
        answers.extend(new);
        for c in answers {
            // A verify's doubtful chunks: written while the source read
            // them. Known once the drain passed every write that may have
            // been in the read.
            if self
                .windows
                .iter()
                .any(|w| w.seq == c.seq && (w.until.wrapping_sub(drained) as i64) > 0)
            {
                self.deferred.push(c);
                continue;
            }
            let window = self
                .windows
                .iter()
                .position(|w| w.seq == c.seq)
                .map(|i| self.windows.swap_remove(i));
            let touched = window.as_ref().map_or(&[][..], |w| &w.touched[..]);
            let doubtful = |j: u32| touched.get(j as usize).copied().unwrap_or(false);
            let Some(differing) = self.chunks.answer(&mut self.st, &c, doubtful) else {
                continue;
            };
            self.unsaved = true;
            let Purpose::Verify(v) = &mut self.purpose else {
                continue;
            };
            let rb = self.st.map.region_bytes();
            if let Some(w) = &window {
                let base = w.span.start / rb;
                for (j, t) in w.touched.iter().enumerate() {
                    let r = base + j as u64;
                    if *t && c.differs(j as u32) && self.st.map.is_set(r) {
                        let n = self.doubts.entry(r).or_insert(0);
                        *n += 1;
                        if *n >= MAX_DOUBTS {
                            // The application keeps writing it: given up
                            // on, reported as busy.
                            self.st.map.clear(r, 1);
                            self.chunks.tally.busy += 1;
                        }
                    }
                }
            }
            for r in differing {
                self.found.set_region(r);
                if v.offsets.len() < REPORT_OFFSETS {
                    v.offsets.push(r * rb);
                }
                if !v.resync {
                    // Reported (and kept in `found`), not sent.
                    self.st.map.clear(r, 1);
                    self.st.differ.clear(r, 1);
                }
            }
        }
        let deferred = &self.deferred;
        let lost = self
            .chunks
            .lost(applied, |seq| deferred.iter().any(|c| c.seq == seq));
        self.windows.retain(|w| {
            (w.seq.wrapping_sub(applied) as i64) > 0 || deferred.iter().any(|c| c.seq == w.seq)
        });
        lost
    }

    /// A verify: write record `seq` of `len` bytes at byte `offset` was
    /// drained: chunks of an open window it touches are in doubt.
    pub(super) fn drained_write(&mut self, seq: u64, offset: u64, len: u64) {
        if self.windows.is_empty() || len == 0 {
            return;
        }
        let rb = self.st.map.region_bytes();
        let end = offset.saturating_add(len);
        for w in &mut self.windows {
            let open =
                (seq.wrapping_sub(w.seq) as i64) > 0 && (w.until.wrapping_sub(seq) as i64) > 0;
            if !open {
                continue;
            }
            let first = offset / rb;
            let last = (end - 1) / rb;
            let base = w.span.start / rb;
            for r in first.max(base)..=last.min(base + u64::from(w.span.count).saturating_sub(1)) {
                if let Some(t) = w.touched.get_mut((r - base) as usize) {
                    *t = true;
                }
            }
        }
    }
}

/// How long END waits between two takes of the kernel's bitmap while
/// overflow-mode writes are in flight.
pub(super) const KERNEL_RETAKE: Duration = Duration::from_millis(20);

/// What a take of the kernel's bitmap before END says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Settled {
    /// No new region, nothing in flight: END may go in.
    Yes,
    /// Regions added to the run's map: send them first.
    Added(u64),
    /// Overflow-mode writes still in flight: take again later.
    InFlight(u64),
    /// The bitmap could not be taken: try again later.
    Unknown,
}

/// Merges a bitmap taken from the kernel (`region_bytes` per bit) into a
/// run's map and says whether the resync may end.
pub(super) fn merge_before_end(
    map: &mut DirtyMap,
    region_bytes: u64,
    regions: impl Iterator<Item = u64>,
    in_flight_overflow: u64,
) -> Settled {
    let before = map.count();
    map.merge_regions(region_bytes, regions);
    let added = map.count().saturating_sub(before);
    if added > 0 {
        Settled::Added(added)
    } else if in_flight_overflow > 0 {
        Settled::InFlight(in_flight_overflow)
    } else {
        Settled::Yes
    }
}

impl Drainer {
    /// A resync marker reached the drain: every record before it has
    /// completed on the source.
    pub(super) fn resync_marker(&mut self, r: &Record) -> Result<(), DaemonError> {
        self.check(r)?;
        let d = r.desc;
        let marker = Marker::from_aux(d.aux);
        let spool_next = self.shared.spool.next_seq();
        match (&mut self.mode, marker) {
            // The resync begins here: spool from this record on.
            // The resync begins here: spool from this record on. Only the
            // BEGIN inserted for the map as it is now: one inserted before
            // the map was replaced (a full resync asked for meanwhile) says
            // less than this resync does.
            (Mode::Bitmap { begin, .. }, Some(Marker::Begin { full })) if *begin == Some(r.seq) => {
                self.commit()?;
                let Mode::Bitmap { mut st, .. } =
                    std::mem::replace(&mut self.mode, Mode::Spool(None))
                else {
                    return Ok(());
                };
                st.begin_seq = Some(r.seq);
                st.full = full;
                // Saved first: a restart then knows the resync began here
                // (and re-drains BEGIN if it was not spooled).
                save_state(&self.set, &self.keys, &st)?;
                tracing::info!(volume = %self.set.volume, seq = r.seq, chunks = st.map.count(), to_send = st.differ.count(), full, "resync begins");
                let mut run = Box::new(Run::new(st, full, false));
                run.zeroes_due = true;
                self.mode = Mode::Spool(Some(run));
                self.pending.gap = true;
                self.push(r.seq, d.op, d.flags, &d, 0, 0);
            }
            // BEGIN saved but not spooled when the daemon stopped.
            (Mode::Spool(Some(run)), Some(Marker::Begin { .. }))
                if run.st.begin_seq == Some(r.seq)
                    && (r.seq.wrapping_sub(spool_next) as i64) > 0 =>
            {
                run.zeroes_due = true;
                self.commit()?;
                self.pending.gap = true;
                self.push(r.seq, d.op, d.flags, &d, 0, 0);
            }
            (Mode::Spool(Some(run)), Some(Marker::Data { region, count })) => {
                run.outstanding = run.outstanding.saturating_sub(1);
                let rb = run.st.map.region_bytes();
                let start = region.saturating_mul(rb);
                let end = region
                    .saturating_add(u64::from(count))
                    .saturating_mul(rb)
                    .min(self.set.volume_size);
                if start >= end {
                    self.push(r.seq, OP_SKIPPED, 0, &d, 0, 0);
                    return Ok(());
                }
                // Chunks the target read as zeros at BEGIN need not be
                // sent if they read as zeros here too.
                let may_skip: Vec<bool> = (region..region + u64::from(count))
                    .map(|c| run.chunks.zero_proves(&run.st, c))
                    .collect();
                let len = end - start;
                let data = self.read_volume(start, len)?;
                let skip = |i: usize| {
                    may_skip[i] && {
                        let lo = i * rb as usize;
                        let hi = (lo + rb as usize).min(data.len());
                        data[lo..hi].iter().all(|b| *b == 0)
                    }
                };
                let n = (len.div_ceil(rb) as usize).min(may_skip.len());
                let lead = (0..n).take_while(|&i| skip(i)).count();
                let trail = (lead..n).rev().take_while(|&i| skip(i)).count();
                let count = u64::from(count);
                if lead > 0 {
                    self.pending.zeroed.push((region, lead as u64));
                }
                if lead == n {
                    self.push(r.seq, OP_SKIPPED, 0, &d, 0, 0);
                    return Ok(());
                }
                if trail > 0 {
                    self.pending
                        .zeroed
                        .push((region + (n - trail) as u64, trail as u64));
                }
                // The chunks between: sent (zeros inside included).
                let lo = lead * rb as usize;
                let hi = ((n - trail) * rb as usize).min(data.len());
                self.push(
                    r.seq,
                    frame::ring_op::WRITE,
                    RECORD_FLAG_RESYNC,
                    &d,
                    (start + lo as u64) / 512,
                    (hi - lo) as u32,
                );
                self.pending.plain.extend_from_slice(&data[lo..hi]);
                self.pending
                    .clears
                    .push((region + lead as u64, count - (lead + trail) as u64));
            }
            (Mode::Spool(Some(_)), Some(Marker::Hash { region, count })) => {
                self.hash_marker(r, region, count)?;
            }
            (Mode::Spool(Some(run)), Some(Marker::End)) if run.end == Some(r.seq) => {
                self.push(r.seq, d.op, d.flags, &d, 0, 0);
                self.pending.end = true;
            }
            // In the map: nothing to do with markers (their regions stay
            // set).
            (Mode::Bitmap { .. }, _) => {}
            // A marker of an abandoned resync: keep the sequence dense,
            // carry nothing.
            (Mode::Spool(_), _) => self.push(r.seq, OP_SKIPPED, 0, &d, 0, 0),
        }
        Ok(())
    }

    /// The protected volume, opened with `O_DIRECT` (writes through the
    /// filesystem do not update the block device's page cache).
    fn volume_file(&mut self) -> Result<&std::fs::File, DaemonError> {
        if self.volume.is_none() {
            let path = self.set.device.clone().ok_or_else(|| {
                DaemonError::Critical("resync needs `device` (the protected volume)".into())
            })?;
            let f = std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_DIRECT)
                .open(&path)
                .map_err(|e| DaemonError::io("open the protected volume", &path, e))?;
            self.volume = Some(f);
        }
        self.volume
            .as_ref()
            .ok_or_else(|| DaemonError::Critical("protected volume not open".into()))
    }

    /// Reads `len` bytes at `offset` of the protected volume.
    pub(super) fn read_volume(&mut self, offset: u64, len: u64) -> Result<Vec<u8>, DaemonError> {
        let f = self.volume_file()?;
        let mut buf = crate::chunkio::AlignedBuf::new(len as usize);
        f.read_exact_at(buf.bytes_mut(), offset).map_err(|e| {
            DaemonError::Critical(format!(
                "resync: cannot read the protected volume at byte {offset} (+{len}): {e}"
            ))
        })?;
        Ok(buf.bytes_mut().to_vec())
    }

    /// A HASH marker reached the drain: hashes its chunks as the volume is
    /// now (every earlier write completed) and spools them at its position.
    fn hash_marker(&mut self, r: &Record, region: u64, count: u32) -> Result<(), DaemonError> {
        let d = r.desc;
        let size = self.set.volume_size;
        let ring = self.keys.get();
        let Mode::Spool(Some(run)) = &mut self.mode else {
            return Ok(());
        };
        run.outstanding = run.outstanding.saturating_sub(1);
        let rb = run.st.map.region_bytes();
        let span = ChunkSpan {
            start: region.saturating_mul(rb),
            chunk_bytes: rb,
            count: count.min(MAX_CHUNKS_PER_RECORD),
        };
        if span.start >= size || count == 0 {
            self.push(r.seq, OP_SKIPPED, 0, &d, 0, 0);
            return Ok(());
        }
        // Clipped to the volume's last chunk.
        let span = ChunkSpan {
            count: span.count.min(((size - span.start).div_ceil(rb)) as u32),
            ..span
        };
        if run.key.as_ref().map(ChunkKey::key_id) != Some(ring.active()) {
            run.key = Some(
                ChunkKey::derive(&ring, ring.active(), &self.set.volume)
                    .map_err(|e| io_err("derive the chunk hash key", e))?,
            );
        }
        let Some(key) = run.key.clone() else {
            return Ok(());
        };
        let hashed = {
            let f = self.volume_file()?;
            hash_chunks(f, &key, &span, size)
        };
        let hashes = hashed.map_err(|e| {
            DaemonError::Critical(format!(
                "resync: cannot read the protected volume at byte {} (+{} chunks): {e}",
                span.start, span.count
            ))
        })?;
        // Writes reserved from here on were not in the read.
        let until = self.consumer.producer_seq();
        if let Mode::Spool(Some(run)) = &mut self.mode {
            if run.verifying().is_some() {
                run.windows.push(Window {
                    seq: r.seq,
                    until,
                    span,
                    touched: vec![false; span.count as usize],
                });
            }
        }
        let aux = HashAux {
            key_id: key.key_id(),
            chunk_bytes: rb as u32,
        };
        let fields = replica_ring::DescFields {
            aux: aux.aux(),
            ..d
        };
        self.push(
            r.seq,
            OP_CHUNK_HASHES,
            RECORD_FLAG_RESYNC,
            &fields,
            span.start / 512,
            (hashes.len() * replica_proto::chunk::HASH_LEN) as u32,
        );
        for h in &hashes {
            self.pending.plain.extend_from_slice(h);
        }
        Ok(())
    }

    /// Starts a needed resync, or keeps a running one (or a verify)
    /// supplied with markers, paced by the answers and the spool's
    /// unacknowledged bytes, and ends it.
    pub(super) fn resync_step(&mut self) -> Result<(), DaemonError> {
        if let Some(why) = self.resync_step_inner()? {
            self.block(why);
        }
        Ok(())
    }

    /// [`Self::resync_step`]; returns why a needed resync cannot start.
    pub(super) fn resync_step_inner(&mut self) -> Result<Option<&'static str>, DaemonError> {
        let Some(k) = &self.kernel else {
            return Ok(matches!(self.mode, Mode::Bitmap { .. })
                .then_some("the capture ring is a ring file (development mode)"));
        };
        if self.consumer.overflowing() {
            return Ok(None);
        }
        let spool = &self.shared.spool;
        match &mut self.mode {
            Mode::Bitmap { begin, st } => {
                if begin.is_some() {
                    return Ok(None);
                }
                // Full when the map holds every region: the target may then
                // count on every region being covered.
                let full = st.map.count() == st.map.regions();
                if self.set.device.is_none() {
                    return Ok(Some("`device` (the protected volume) is not configured"));
                }
                if !self.shared.connected.load(Ordering::Acquire) {
                    return Ok(None);
                }
                match k.device.insert_marker(
                    k.index,
                    RECORD_FLAG_RESYNC,
                    Marker::Begin { full }.aux(),
                ) {
                    Ok(seq) => {
                        tracing::info!(volume = %self.set.volume, seq, "resync requested");
                        *begin = Some(seq);
                        self.blocked = None;
                    }
                    Err(e) => tracing::debug!(error = %e, "resync BEGIN not inserted yet"),
                }
            }
            Mode::Spool(Some(run)) => {
                if run.end.is_some() {
                    return Ok(None);
                }
                // The answers: the target's applied record first (it acks
                // a hash record only after its answer was sent).
                let applied = self.shared.target_applied.load(Ordering::Acquire);
                let drained = self.consumer.next_seq();
                // Zero ranges: taken after the applied record was read (the
                // target sends them before any ack that reports BEGIN
                // applied).
                if let Some(z) = self.shared.take_zeroes() {
                    if run.verifying().is_none()
                        && z.generation == run.st.generation
                        && run.st.begin_seq == Some(z.seq)
                    {
                        let spared = run.chunks.zeroes_at_begin(&run.st, z.ranges());
                        run.zeroes_due = false;
                        tracing::info!(volume = %self.set.volume, begin = z.seq, chunks = spared, "the target's replica reads zeros in chunks not yet compared: they are read and sent only where the volume does not read zeros");
                    } else {
                        tracing::debug!(volume = %self.set.volume, seq = z.seq, "zero ranges for another resync: ignored");
                    }
                }
                if run.zeroes_due
                    && run
                        .st
                        .begin_seq
                        .is_none_or(|b| (applied.wrapping_sub(b) as i64) >= 0)
                {
                    tracing::debug!(volume = %self.set.volume, applied, "the target applied BEGIN without zero ranges: every chunk is compared");
                    run.zeroes_due = false;
                }
                let lost = run.take_answers(self.shared.take_answers(), drained, applied);
                if lost > 0 {
                    tracing::info!(volume = %self.set.volume, chunks = lost, applied, "answers to chunk comparisons were lost (a connection ended, or the target restarted): those chunks are compared again");
                }
                let rb = run.st.map.region_bytes();
                let max_data = (self.set.resync_max_bytes / rb).clamp(1, 65535);
                let max_hash = (self.set.resync_max_bytes.max(rb * 16) / rb)
                    .clamp(1, u64::from(MAX_CHUNKS_PER_RECORD));
                // Never let a resync itself fill the spool to its limit.
                let window = self.set.resync_window.min(self.set.limit_bytes / 4);
                // Chunks compared and not answered, at most: the target
                // reads them at its own pace.
                let hash_window = (self.set.resync_window.saturating_mul(4) / rb).max(max_hash);
                while run.outstanding < MAX_OUTSTANDING {
                    // A verify sends only when asked, compares at its rate.
                    let (verifying, send, may_hash) = match run.verifying() {
                        None => (false, true, !run.zeroes_due),
                        Some(v) => (true, v.resync, Instant::now() >= v.next_at),
                    };
                    let (marker, first, count) = if let Some((region, count)) = (send
                        && spool.unacked_bytes() < window)
                        .then(|| {
                            run.chunks
                                .next_data(&run.st, max_data)
                                .or_else(|| run.chunks.next_zero(&run.st, max_data))
                        })
                        .flatten()
                    {
                        let m = Marker::Data {
                            region,
                            count: count as u32,
                        };
                        (m, region, count)
                    } else if let Some((region, count)) =
                        (run.chunks.waiting_chunks() < hash_window && may_hash)
                            .then(|| run.chunks.next_hash(&run.st, max_hash))
                            .flatten()
                    {
                        let m = Marker::Hash {
                            region,
                            count: count as u32,
                        };
                        (m, region, count)
                    } else if run.st.map.count() == 0
                        && run.chunks.idle()
                        && run.outstanding == 0
                        && self.pending.clears.is_empty()
                        && self.pending.zeroed.is_empty()
                    {
                        if verifying {
                            self.verify_done();
                            return Ok(None);
                        }
                        // Every chunk of the map is proven and no marker is
                        // in flight: what the kernel marked since is
                        // compared before END.
                        match Self::kernel_settled(k, run, &self.set, &self.keys)? {
                            Settled::Yes => {}
                            Settled::Added(_) => continue,
                            Settled::InFlight(_) | Settled::Unknown => break,
                        }
                        match k
                            .device
                            .insert_marker(k.index, RECORD_FLAG_RESYNC, Marker::End.aux())
                        {
                            Ok(seq) => run.end = Some(seq),
                            Err(e) => tracing::debug!(error = %e, "resync END not inserted yet"),
                        }
                        break;
                    } else {
                        break;
                    };
                    match k
                        .device
                        .insert_marker(k.index, RECORD_FLAG_RESYNC, marker.aux())
                    {
                        Ok(seq) => {
                            run.outstanding += 1;
                            match marker {
                                Marker::Hash { region, count } => {
                                    run.chunks.hashing(seq, region, count);
                                    if let Purpose::Verify(v) = &mut run.purpose {
                                        if let Some(rate) = v.max_rate.filter(|r| *r > 0) {
                                            let secs = (count as f64 * rb as f64) / rate as f64;
                                            v.next_at = v.next_at.max(Instant::now())
                                                + Duration::from_secs_f64(secs);
                                        }
                                    }
                                }
                                _ => {
                                    if let Purpose::Verify(v) = &mut run.purpose {
                                        v.repair_seq = seq;
                                    }
                                }
                            }
                        }
                        Err(e) => {
                            run.chunks.unissue(first, count);
                            tracing::debug!(error = %e, "resync marker not inserted yet");
                            break;
                        }
                    }
                }
            }
            Mode::Spool(None) => {}
        }
        Ok(None)
    }

    /// Before a resync's END (every region of the run's map sent, no DATA
    /// marker in flight): takes the kernel's bitmap again into the run's
    /// map. The map is saved as "whole volume" first, since the kernel
    /// clears what it hands over; then the merged map is saved.
    pub(super) fn kernel_settled(
        k: &KernelRing,
        run: &mut Run,
        set: &DrainSettings,
        keys: &crate::keystore::KeyStore,
    ) -> Result<Settled, DaemonError> {
        if run
            .last_kernel_take
            .is_some_and(|t| run.kernel_in_flight > 0 && t.elapsed() < KERNEL_RETAKE)
        {
            return Ok(Settled::InFlight(run.kernel_in_flight));
        }
        let mut whole = run.st.clone();
        whole.map.mark_all();
        save_state(set, keys, &whole)?;
        let b = match k.device.take_bitmap(k.index) {
            Ok(b) => b,
            Err(e) => {
                // Nothing was taken (the kernel keeps the bits of a failed
                // hand-over): the map as it was.
                save_state(set, keys, &run.st)?;
                let why = e.to_string();
                if run.kernel_take_error.as_deref() != Some(why.as_str()) {
                    tracing::warn!(volume = %set.volume, error = %why, "cannot take the kernel's dirty bitmap before the resync's END; the resync does not end until it can");
                    run.kernel_take_error = Some(why);
                }
                run.last_kernel_take = Some(Instant::now());
                run.kernel_in_flight = 1;
                return Ok(Settled::Unknown);
            }
        };
        let settled = merge_before_end(
            &mut run.st.map,
            u64::from(b.region_kib) * 1024,
            b.regions_set(),
            b.in_flight_overflow,
        );
        save_state(set, keys, &run.st)?;
        run.unsaved = false;
        run.last_save = Instant::now();
        let was_in_flight = run.kernel_in_flight;
        run.kernel_take_error = None;
        run.last_kernel_take = Some(Instant::now());
        run.kernel_in_flight = b.in_flight_overflow;
        match settled {
            Settled::Added(n) => {
                run.chunks.added(n);
                run.chunks.rewind();
                run.chunks.forget_zeroes();
                tracing::warn!(
                    volume = %set.volume,
                    regions = n,
                    in_flight_overflow = b.in_flight_overflow,
                    "the kernel marked regions dirty after the resync took its bitmap (failed writes, or writes made in overflow mode that completed later): they are resent before the resync ends"
                );
            }
            Settled::InFlight(n) if was_in_flight == 0 => {
                tracing::info!(
                    volume = %set.volume,
                    in_flight_overflow = n,
                    "writes made in overflow mode are still in flight: the resync ends once they completed and their regions were resent"
                );
            }
            Settled::InFlight(_) | Settled::Yes | Settled::Unknown => {}
        }
        Ok(settled)
    }

    /// Says (once) why a needed resync cannot start.
    pub(super) fn block(&mut self, why: &str) {
        if self.blocked.as_deref() != Some(why) {
            tracing::warn!(volume = %self.set.volume, "a resync is needed but cannot start: {why}");
            self.blocked = Some(why.to_owned());
        }
    }

    /// Saves a running resync's remaining chunks (its cursor) if they
    /// changed. A verify keeps nothing: it is not a resync.
    pub(super) fn save_run(&mut self) -> Result<(), DaemonError> {
        if let Mode::Spool(Some(run)) = &mut self.mode {
            if run.unsaved && run.verifying().is_none() {
                save_state(&self.set, &self.keys, &run.st)?;
                run.last_save = Instant::now();
            }
            run.unsaved = false;
        }
        Ok(())
    }

    /// A chunk reached the spool: the regions it resends are proven; with
    /// the END in it, the resync is over.
    pub(super) fn after_spooled(&mut self) -> Result<(), DaemonError> {
        let Mode::Spool(Some(run)) = &mut self.mode else {
            return Ok(());
        };
        for (region, count) in self.pending.clears.drain(..) {
            run.chunks.spooled(&mut run.st, region, count);
            run.unsaved = true;
        }
        for (region, count) in self.pending.zeroed.drain(..) {
            run.chunks.zeroed(&mut run.st, region, count);
            run.unsaved = true;
        }
        if self.pending.end {
            let end = run.end.unwrap_or(0);
            let t = run.chunks.tally;
            let mut last = Self::progress(run);
            last.remaining_chunks = 0;
            last.end_seq = end;
            let full = run.full;
            tracing::info!(volume = %self.set.volume, end, compared = t.compared, equal = t.equal, differing = t.differing, sent = t.sent, sent_bytes = t.sent_bytes, zero = t.zero, rehashed = t.rehashed, done_before = t.done_before, "resync complete: every chunk is proven equal, zeros on both sides, or was resent");
            match std::fs::remove_file(&self.set.state_path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err("remove the resync state", e)),
            }
            self.mode = Mode::Spool(None);
            self.shared.set_resync(None);
            self.board.update(&self.set.volume, |s| {
                s.resync_end_seq = end;
                s.clear_reason(ReasonKind::Resync);
                s.resync_progress = Some(last);
                // What a verify found different is resent by a full resync,
                // and by the one its abandoned chunks joined.
                if full
                    || s.last_verify
                        .as_ref()
                        .is_some_and(|v| v.abandoned.is_some())
                {
                    s.clear_reason(ReasonKind::Verify);
                }
            });
            self.publish();
            return Ok(());
        }
        if run.unsaved && run.last_save.elapsed() >= Duration::from_millis(500) {
            self.save_run()?;
        }
        Ok(())
    }
}

/// Saves a resync state, authenticated with the key ring's active key.
pub(super) fn save_state(
    set: &DrainSettings,
    keys: &crate::keystore::KeyStore,
    st: &ResyncState,
) -> Result<(), DaemonError> {
    let ring = keys.get();
    st.save(
        &set.state_path,
        &crate::source::dirty::CursorKeys {
            ring: &ring,
            volume: &set.volume,
        },
    )
    .map_err(|e| io_err("save the resync state", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    const KIB64: u64 = 64 * 1024;

    #[test]
    fn a_resync_ends_only_after_a_take_with_nothing_new_and_nothing_in_flight() {
        // The run's map is empty at END time (every region was sent).
        let mut map = DirtyMap::new(16 << 20, KIB64);
        // An overflow-mode write in flight: its bit was cleared by the first
        // take and is not set again yet.
        assert_eq!(
            merge_before_end(&mut map, KIB64, std::iter::empty(), 1),
            Settled::InFlight(1)
        );
        assert_eq!(map.count(), 0);
        // It completed and set its two regions again; another write of a
        // region still in flight.
        assert_eq!(
            merge_before_end(&mut map, KIB64, [3, 4].into_iter(), 1),
            Settled::Added(2)
        );
        assert!(map.is_set(3) && map.is_set(4));
        // Sent (the lap), then taken again: nothing new, but still in flight.
        map.clear(3, 2);
        assert_eq!(
            merge_before_end(&mut map, KIB64, std::iter::empty(), 1),
            Settled::InFlight(1)
        );
        // The last one completed: its region comes back once more.
        assert_eq!(
            merge_before_end(&mut map, KIB64, [9].into_iter(), 0),
            Settled::Added(1)
        );
        map.clear(9, 1);
        assert_eq!(
            merge_before_end(&mut map, KIB64, std::iter::empty(), 0),
            Settled::Yes
        );
    }

    #[test]
    fn kernel_regions_of_another_size_are_merged_as_bytes() {
        // The kernel's 16 KiB regions into a map of 64 KiB regions: two
        // kernel bits in one map region add one.
        let mut map = DirtyMap::new(16 << 20, KIB64);
        assert_eq!(
            merge_before_end(&mut map, 16 * 1024, [4, 5, 8].into_iter(), 0),
            Settled::Added(2)
        );
        assert!(map.is_set(1) && map.is_set(2));
        // Bits the map already holds add nothing (but the run must not end
        // while writes are in flight).
        assert_eq!(
            merge_before_end(&mut map, 16 * 1024, [4].into_iter(), 2),
            Settled::InFlight(2)
        );
    }
}
