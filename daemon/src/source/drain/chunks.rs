//! Which chunks a running resync or verify compares and sends next, and
//! what the target's answers prove: the bookkeeping of a checksum resync,
//! apart from the ring and the spool so it can be tested on its own.
//!
//! A chunk of the run's map is *unproven* until either the target answered
//! that it equals the source's at one ring position (then every later write
//! reaches both sides in the same order, so they stay equal), or its data
//! was spooled at a later position (then the replica holds what the volume
//! held there). Unproven chunks are in the map (persisted: the resync's
//! cursor); those an answer found different are also in `differ` (sent
//! without comparing again, also after a restart). In memory only: the
//! chunks named by a marker not yet answered or spooled (`issued`), and the
//! hash records waiting for an answer.
//!
//! A chunk the target said reads as zeros when the resync began (its
//! [`replica_proto::msg::Zeroes`] for the run's BEGIN: a hole, an
//! unprovisioned thin block) is not compared: it is read at a DATA marker
//! like a differing chunk, and proven without sending when it reads as
//! zeros there too (every write between the BEGIN and that marker reached
//! both sides in order, so the replica reads zeros there as well), sent
//! otherwise.
//!
//! An answer is looked for until the target reports the hash record
//! applied: the target sends its answer before any ack that says so, so a
//! record applied without an answer means the answer was lost (a connection
//! that ended, a target restart) and its chunks are compared again. Late
//! or repeated answers are harmless: "equal" at any position proves a
//! chunk; "differs" only asks for data that was not sent yet.

use std::collections::VecDeque;
use std::time::Instant;

use replica_proto::msg::Compared;

use crate::source::dirty::{DirtyMap, ResyncState};

/// A hash record in the ring or the stream, waiting for its answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Waiting {
    seq: u64,
    region: u64,
    count: u32,
}

/// What a run has done, for the status.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Tally {
    /// Chunks in the map when the run started (or resumed), plus those
    /// added since.
    pub(crate) total: u64,
    /// Chunks proven before this start (a resumed run).
    pub(crate) done_before: u64,
    /// Chunks answered.
    pub(crate) compared: u64,
    /// Of those, found equal.
    pub(crate) equal: u64,
    /// Found different.
    pub(crate) differing: u64,
    /// Chunks whose data was spooled.
    pub(crate) sent: u64,
    /// Chunks neither compared nor sent: zeros on the source where the
    /// target said its replica reads zeros.
    pub(crate) zero: u64,
    /// Their bytes.
    pub(crate) sent_bytes: u64,
    /// Chunks compared again: an answer was lost, or (a verify) the
    /// application wrote the chunk while the source read it.
    pub(crate) rehashed: u64,
    /// Chunks a verify gave up on: written by the application every time
    /// they were compared.
    pub(crate) busy: u64,
    /// Bytes covered so far (compared equal, or sent).
    pub(crate) covered_bytes: u64,
    /// When the run started (this daemon's start for a resumed one).
    pub(crate) started: Instant,
}

/// The chunk bookkeeping of one run.
pub(crate) struct Chunks {
    issued: DirtyMap,
    waiting: VecDeque<Waiting>,
    hash_cursor: u64,
    data_cursor: u64,
    zero_cursor: u64,
    /// Chunks the target said read as zeros at the run's BEGIN (empty
    /// until it said so).
    zeroes: DirtyMap,
    pub(crate) tally: Tally,
}

/// The first run of regions at or after `from` set in `a`, in all of
/// `and` and in none of `not`, at most `max` long; wraps around to the
/// start once. (All maps of one geometry: searched a word at a time.)
fn next_run(
    a: &DirtyMap,
    and: &[&DirtyMap],
    not: &[&DirtyMap],
    from: u64,
    max: u64,
) -> Option<(u64, u64)> {
    let n = a.regions();
    let ok =
        |r: u64| a.is_set(r) && and.iter().all(|m| m.is_set(r)) && not.iter().all(|m| !m.is_set(r));
    for (lo, hi) in [(from.min(n), n), (0, from.min(n))] {
        if let Some(f) = a.first_masked(and, not, lo, hi) {
            let mut end = f + 1;
            while end < n && end - f < max.max(1) && ok(end) {
                end += 1;
            }
            return Some((f, end - f));
        }
    }
    None
}

impl Chunks {
    /// The bookkeeping of a run over `st`'s map (`resumed`: the regions the
    /// map no longer holds were proven before a restart).
    pub(crate) fn new(st: &ResyncState, resumed: bool) -> Self {
        let m = &st.map;
        Self {
            issued: DirtyMap::new(m.volume_size(), m.region_bytes()),
            waiting: VecDeque::new(),
            hash_cursor: 0,
            data_cursor: 0,
            zero_cursor: 0,
            zeroes: DirtyMap::new(m.volume_size(), m.region_bytes()),
            tally: Tally {
                total: m.count(),
                done_before: if resumed {
                    m.regions().saturating_sub(m.count())
                } else {
                    0
                },
                compared: 0,
                equal: 0,
                differing: 0,
                sent: 0,
                zero: 0,
                sent_bytes: 0,
                rehashed: 0,
                busy: 0,
                covered_bytes: 0,
                started: Instant::now(),
            },
        }
    }

    /// Regions the kernel added to the map after the run started.
    pub(crate) fn added(&mut self, n: u64) {
        self.tally.total = self.tally.total.saturating_add(n);
    }

    fn issue(&mut self, first: u64, count: u64) {
        for r in first..first + count {
            self.issued.set_region(r);
        }
    }

    /// The next run of chunks known to differ, at most `max`: marked issued.
    pub(crate) fn next_data(&mut self, st: &ResyncState, max: u64) -> Option<(u64, u64)> {
        let run = next_run(&st.differ, &[], &[&self.issued], self.data_cursor, max)?;
        // Only chunks still unproven (the map holds every one of `differ`).
        self.issue(run.0, run.1);
        self.data_cursor = run.0 + run.1;
        Some(run)
    }

    /// The target reads zeros in `ranges` (bytes, `(start, length)`) at
    /// the run's BEGIN: the chunks wholly inside them are not compared.
    /// Returns how many unproven chunks that spares a comparison.
    pub(crate) fn zeroes_at_begin(&mut self, st: &ResyncState, ranges: &[(u64, u64)]) -> u64 {
        let rb = st.map.region_bytes();
        let size = st.map.volume_size();
        for &(start, len) in ranges {
            let end = start.saturating_add(len).min(size);
            let mut r = start.div_ceil(rb);
            while r < st.map.regions() && r * rb + chunk_len(st, r, rb) <= end {
                self.zeroes.set_region(r);
                r += 1;
            }
        }
        (0..st.map.regions())
            .filter(|&r| self.spares(st, r))
            .count() as u64
    }

    /// Whether chunk `r` is unproven, not issued, not known to differ, and
    /// read as zeros on the target at BEGIN.
    fn spares(&self, st: &ResyncState, r: u64) -> bool {
        st.map.is_set(r) && self.zeroes.is_set(r) && !self.issued.is_set(r) && !st.differ.is_set(r)
    }

    /// Whether chunk `r`, read as zeros at a DATA marker, is proven
    /// without sending: the target read zeros there at BEGIN, and no
    /// answer (or `--full`) asked for its data.
    pub(crate) fn zero_proves(&self, st: &ResyncState, r: u64) -> bool {
        self.zeroes.is_set(r) && !st.differ.is_set(r)
    }

    /// The kernel added chunks to the map (writes that failed, or were made
    /// in overflow mode and completed later): those writes are not records,
    /// so nothing orders them with the DATA markers, and what the target
    /// said about its zeros proves nothing any more. Every chunk is
    /// compared again.
    pub(crate) fn forget_zeroes(&mut self) {
        self.zeroes = DirtyMap::new(self.zeroes.volume_size(), self.zeroes.region_bytes());
    }

    /// The next run of chunks the target read as zeros at BEGIN, to read
    /// at a DATA marker, at most `max`: marked issued.
    pub(crate) fn next_zero(&mut self, st: &ResyncState, max: u64) -> Option<(u64, u64)> {
        if self.zeroes.count() == 0 {
            return None;
        }
        let run = next_run(
            &st.map,
            &[&self.zeroes],
            &[&self.issued, &st.differ],
            self.zero_cursor,
            max,
        )?;
        self.issue(run.0, run.1);
        self.zero_cursor = run.0 + run.1;
        Some(run)
    }

    /// The next run of chunks to compare, at most `max`: marked issued.
    pub(crate) fn next_hash(&mut self, st: &ResyncState, max: u64) -> Option<(u64, u64)> {
        let run = next_run(
            &st.map,
            &[],
            &[&self.issued, &st.differ, &self.zeroes],
            self.hash_cursor,
            max,
        )?;
        self.issue(run.0, run.1);
        self.hash_cursor = run.0 + run.1;
        Some(run)
    }

    /// A marker for chunks from `next_*` could not be inserted.
    pub(crate) fn unissue(&mut self, first: u64, count: u64) {
        self.issued.clear(first, count);
    }

    /// A hash marker for `count` chunks from `region` went into the ring at
    /// `seq`.
    pub(crate) fn hashing(&mut self, seq: u64, region: u64, count: u32) {
        self.waiting.push_back(Waiting { seq, region, count });
    }

    /// Chunks waiting for an answer.
    pub(crate) fn waiting_chunks(&self) -> u64 {
        self.waiting.iter().map(|w| u64::from(w.count)).sum()
    }

    /// Nothing issued is unanswered or unsent.
    pub(crate) fn idle(&self) -> bool {
        self.waiting.is_empty() && self.issued.count() == 0
    }

    /// An answer of the target: returns the chunks found different (region
    /// numbers), or `None` if it answers no record this run waits for. A
    /// chunk found different for which `doubtful(i)` (its `i` in the
    /// record) is neither different nor proven: it is compared again.
    pub(crate) fn answer(
        &mut self,
        st: &mut ResyncState,
        c: &Compared,
        doubtful: impl Fn(u32) -> bool,
    ) -> Option<Vec<u64>> {
        if c.generation != st.generation {
            return None;
        }
        let i = self
            .waiting
            .iter()
            .position(|w| w.seq == c.seq && w.count == c.count())?;
        let w = self.waiting.remove(i)?;
        let rb = st.map.region_bytes();
        let mut differing = Vec::new();
        for j in 0..w.count {
            let r = w.region + u64::from(j);
            self.issued.clear(r, 1);
            if !st.map.is_set(r) {
                continue; // proven meanwhile (sent, or an earlier answer)
            }
            if c.differs(j) && doubtful(j) {
                self.tally.rehashed += 1;
                self.hash_cursor = self.hash_cursor.min(r);
                continue;
            }
            self.tally.compared += 1;
            if c.differs(j) {
                st.differ.set_region(r);
                self.tally.differing += 1;
                differing.push(r);
            } else {
                st.map.clear(r, 1);
                st.differ.clear(r, 1);
                self.tally.equal += 1;
                self.tally.covered_bytes += chunk_len(st, r, rb);
            }
        }
        Some(differing)
    }

    /// The target reports record `applied` applied: hash records at or
    /// before it still waiting lost their answer; their chunks are compared
    /// again. Returns how many chunks.
    /// (`answered(seq)`: its answer is here, held back; not lost.)
    pub(crate) fn lost(&mut self, applied: u64, answered: impl Fn(u64) -> bool) -> u64 {
        let mut n = 0;
        let issued = &mut self.issued;
        self.waiting.retain(|w| {
            if (applied.wrapping_sub(w.seq) as i64) >= 0 && !answered(w.seq) {
                issued.clear(w.region, u64::from(w.count));
                n += u64::from(w.count);
                false
            } else {
                true
            }
        });
        if n > 0 {
            self.hash_cursor = 0;
        }
        self.tally.rehashed += n;
        n
    }

    /// The data of `count` chunks from `region` is in the spool: proven.
    pub(crate) fn spooled(&mut self, st: &mut ResyncState, region: u64, count: u64) {
        self.proven(st, region, count, |t, len| {
            t.sent += 1;
            t.sent_bytes += len;
        });
    }

    /// `count` chunks from `region` read as zeros at a DATA marker that is
    /// in the spool, where the target read zeros at BEGIN: proven, nothing
    /// sent.
    pub(crate) fn zeroed(&mut self, st: &mut ResyncState, region: u64, count: u64) {
        self.proven(st, region, count, |t, _| t.zero += 1);
    }

    /// `count` chunks from `region` are proven by what reached the spool:
    /// `tally` counts each one still unproven (with its length), and none
    /// is unproven, known to differ or issued any more.
    fn proven(
        &mut self,
        st: &mut ResyncState,
        region: u64,
        count: u64,
        tally: impl Fn(&mut Tally, u64),
    ) {
        let rb = st.map.region_bytes();
        for r in region..region.saturating_add(count).min(st.map.regions()) {
            if st.map.is_set(r) {
                let len = chunk_len(st, r, rb);
                tally(&mut self.tally, len);
                self.tally.covered_bytes += len;
            }
        }
        st.map.clear(region, count);
        st.differ.clear(region, count);
        self.issued.clear(region, count);
    }

    /// The run lapped: chunks the kernel added behind the cursors are
    /// looked at from the start again.
    pub(crate) fn rewind(&mut self) {
        self.hash_cursor = 0;
        self.data_cursor = 0;
        self.zero_cursor = 0;
    }
}

/// Bytes of region `r` (the last one clipped to the volume).
fn chunk_len(st: &ResyncState, r: u64, rb: u64) -> u64 {
    let start = r * rb;
    (start + rb).min(st.map.volume_size()).saturating_sub(start)
}

#[cfg(test)]
mod tests;
