//! The batcher: reads the spool from where the target's durable position
//! leaves off and packs records into segment jobs for the sealing workers.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::Sender;
use replica_proto::frame::{self, SegmentHeader};

use super::drain::Shared;
use super::seal::Job;
use super::seal::SealError;
use super::session::SessionError;
use super::spool::SpoolError;

pub(super) struct BatchCtx {
    pub(super) header: SegmentHeader,
    pub(super) max_bytes: usize,
    /// First record to send.
    pub(super) resume: u64,
    /// The segment being packed starts a resync after a gap.
    pub(super) gap: bool,
    pub(super) shared: Arc<Shared>,
    pub(super) stop: Arc<AtomicBool>,
    pub(super) global_stop: Arc<AtomicBool>,
}

impl BatchCtx {
    pub(super) fn stopping(&self) -> bool {
        self.stop.load(Ordering::Acquire) || self.global_stop.load(Ordering::Acquire)
    }

    pub(super) fn run(mut self, tx: Sender<Job>) -> Result<(), SessionError> {
        let r = self.batch_loop(&tx);
        if let Err(SessionError::Spool(s)) = &r {
            self.shared.report_damage(format!("spool: {s}"));
        }
        r
    }

    /// Reads spool chunks from `resume` on and packs them into segments: a
    /// segment closes at `max_bytes` or when the spool has nothing more.
    pub(super) fn batch_loop(&mut self, tx: &Sender<Job>) -> Result<(), SessionError> {
        let spool = self.shared.spool.clone();
        let mut reader = spool.reader(self.resume);
        let mut plain: Vec<u8> = Vec::with_capacity(self.max_bytes + (1 << 20));
        let mut first: Option<u64> = None;
        let mut last = 0u64;
        let mut last_time = 0u64;
        loop {
            if self.stopping() {
                return Ok(());
            }
            match reader.next_chunk() {
                Ok(Some(c)) => {
                    // A resync after a gap starts a segment of its own, which
                    // tells the target the gap is intended.
                    if first.is_some()
                        && (c.gap_from.is_some()
                            || plain.len() + c.plain.len() > frame::MAX_PLAIN_LEN as usize)
                    {
                        self.emit(tx, &mut plain, &mut first, last, last_time)?;
                    }
                    if first.is_none() {
                        self.gap = c.gap_from.is_some();
                    }
                    first.get_or_insert(c.first_seq);
                    last = c.last_seq;
                    last_time = c.last_ns;
                    plain.extend_from_slice(&c.plain);
                    if plain.len() >= self.max_bytes {
                        self.emit(tx, &mut plain, &mut first, last, last_time)?;
                    }
                }
                Ok(None) => {
                    if first.is_some() {
                        self.emit(tx, &mut plain, &mut first, last, last_time)?;
                        continue;
                    }
                    spool.wait_for(reader.seq(), reader.drops(), Duration::from_millis(100));
                }
                Err(SpoolError::Dropped) => {
                    // The drain switched to a dirty map: what was read and
                    // not sent is covered by it. The stream goes on from
                    // where the spool starts again (after the gap, a resync).
                    plain.clear();
                    first = None;
                    self.gap = false;
                    reader = spool.reader(spool.oldest_seq());
                }
                Err(e) => return Err(SessionError::Spool(e)),
            }
        }
    }

    pub(super) fn emit(
        &mut self,
        tx: &Sender<Job>,
        plain: &mut Vec<u8>,
        first: &mut Option<u64>,
        last: u64,
        last_time: u64,
    ) -> Result<(), SessionError> {
        let Some(f) = first.take() else { return Ok(()) };
        let mut h = self.header.clone();
        h.first_seq = f;
        h.last_seq = last;
        h.record_count = last
            .checked_sub(f)
            .and_then(|d| d.checked_add(1))
            .and_then(|n| u32::try_from(n).ok())
            .ok_or(SessionError::Seal(SealError::TooMany { first: f, last }))?;
        h.source_time_ns = last_time;
        if std::mem::take(&mut self.gap) {
            h.features |= frame::FEATURE_RESYNC_GAP;
        }
        self.header.counter += 1;
        let job = Job {
            header: h,
            plain: std::mem::replace(plain, Vec::with_capacity(self.max_bytes + (1 << 20))),
        };
        let mut job = Some(job);
        while let Some(j) = job.take() {
            match tx.send_timeout(j, Duration::from_millis(100)) {
                Ok(()) => {}
                Err(crossbeam_channel::SendTimeoutError::Timeout(j)) => {
                    if self.stopping() {
                        return Ok(());
                    }
                    job = Some(j);
                }
                Err(crossbeam_channel::SendTimeoutError::Disconnected(_)) => return Ok(()),
            }
        }
        Ok(())
    }
}
