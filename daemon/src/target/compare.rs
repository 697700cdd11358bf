//! Chunk comparison on the target: when the apply order reaches a hash
//! record, the replica's chunks it names are compared with the source's
//! hashes, and the answer ([`Compared`]) goes back to the source, which
//! sends only the chunks that differ.
//!
//! The comparison must see the replica exactly as the apply order left it
//! at the record, without stopping the applier for the reads: the applier
//! hands the job to the comparer thread and goes on; a later write that
//! overlaps a job still being read waits for that job only (a guard per
//! job's byte range). Resync and verify walk the volume in order and
//! applications write elsewhere most of the time, so the applier rarely
//! waits. Acks do not report a record as applied before every comparison at
//! or before it was answered (see [`Comparer::unanswered_before`]): a source
//! that sees its hash record applied without an answer knows the answer was
//! lost (a connection that ended, a restart) and compares those chunks
//! again.
//!
//! A chunk that cannot be read or whose key is unknown here is answered as
//! differing: the source then sends it, which is never wrong.

use std::collections::VecDeque;
use std::fs::File;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender};
use replica_proto::chunk::{self, ChunkKey, ChunkSpan, HashAux, HASH_LEN};
use replica_proto::frame::RecordView;
use replica_proto::msg::{Compared, Message, Zeroes};
use replica_store::replica::ReadAccess;

use crate::chunkio::hash_chunks;

use crate::keystore::KeyStore;
use crate::status::StatusBoard;

/// Answers kept for the source while no connection takes them; older ones
/// are dropped (the source compares again what it hears no answer for).
const MAX_ANSWERS: usize = 4096;
/// Jobs queued to the comparer before the applier waits.
const MAX_JOBS: usize = 8;

/// One hash record to compare.
#[derive(Debug)]
pub(super) struct Job {
    /// The record's ring generation.
    generation: [u8; 16],
    /// The record.
    seq: u64,
    span: ChunkSpan,
    aux: HashAux,
    hashes: Vec<[u8; HASH_LEN]>,
    /// Where to read the replica.
    access: ReadAccess,
}

/// Why a hash record is malformed (the stream goes Critical: the source
/// built it wrong).
#[derive(Debug, thiserror::Error)]
pub(super) enum HashRecordError {
    /// Its aux names no chunk size.
    #[error("hash record {seq}: bad chunk geometry {aux:#x}")]
    Geometry {
        /// The record.
        seq: u64,
        /// Its aux.
        aux: u64,
    },
    /// Its payload is not a list of hashes.
    #[error("hash record {seq}: payload of {len} bytes is not a list of chunk hashes")]
    Payload {
        /// The record.
        seq: u64,
        /// Payload bytes.
        len: usize,
    },
    /// It names chunks past the volume's end.
    #[error("hash record {seq}: chunks past the volume's end")]
    Bounds {
        /// The record.
        seq: u64,
    },
}

/// The geometry of hash record `r` on a volume of `size` bytes, checked:
/// its chunk size, where its chunks lie, and its payload of hashes.
fn geometry<'r>(
    r: &RecordView<'r>,
    size: u64,
) -> Result<(HashAux, ChunkSpan, impl Iterator<Item = &'r [u8; HASH_LEN]>), HashRecordError> {
    let seq = r.seq;
    let aux = HashAux::from_aux(r.aux).ok_or(HashRecordError::Geometry { seq, aux: r.aux })?;
    let count = r.data.len() / HASH_LEN;
    let hashes = chunk::hashes(r.data).ok_or(HashRecordError::Payload {
        seq,
        len: r.data.len(),
    })?;
    let span = ChunkSpan {
        start: r.sector.saturating_mul(512),
        chunk_bytes: u64::from(aux.chunk_bytes),
        count: count as u32,
    };
    // Every chunk starts inside the volume (the last one may be clipped).
    if !span.start.is_multiple_of(span.chunk_bytes) || span.chunk(span.count - 1, size).1 == 0 {
        return Err(HashRecordError::Bounds { seq });
    }
    Ok((aux, span, hashes))
}

/// Checks hash record `r` on a volume of `size` bytes (a malformed one
/// makes its segment's stream Critical before anything of it is applied).
pub(super) fn check(r: &RecordView<'_>, size: u64) -> Result<(), HashRecordError> {
    geometry(r, size).map(|_| ())
}

impl Job {
    /// The job of hash record `r` on a volume of `size` bytes.
    pub(super) fn of(
        generation: [u8; 16],
        r: &RecordView<'_>,
        size: u64,
        access: ReadAccess,
    ) -> Result<Self, HashRecordError> {
        let (aux, span, hashes) = geometry(r, size)?;
        Ok(Self {
            generation,
            seq: r.seq,
            span,
            aux,
            hashes: hashes.copied().collect(),
            access,
        })
    }

    /// Its byte range on the replica.
    fn range(&self, size: u64) -> (u64, u64) {
        (self.span.start, self.span.end(size))
    }
}

/// A job handed over and not answered yet: its record and byte range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Pending {
    generation: [u8; 16],
    seq: u64,
    start: u64,
    end: u64,
}

/// Jobs handed over and not answered yet.
#[derive(Default)]
struct InFlight {
    jobs: Mutex<Vec<Pending>>,
    done: Condvar,
    /// How many `jobs` holds, read without the lock by the applier before
    /// each write (only the applier adds jobs, so it never misses one of
    /// its own).
    count: AtomicUsize,
}

impl InFlight {
    fn lock(&self) -> MutexGuard<'_, Vec<Pending>> {
        self.jobs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds the job `p`.
    fn add(&self, p: Pending) {
        let mut jobs = self.lock();
        jobs.push(p);
        self.count.store(jobs.len(), Ordering::Release);
    }

    /// The job of (`generation`, `seq`) is answered.
    fn finished(&self, generation: [u8; 16], seq: u64) {
        let mut jobs = self.lock();
        if let Some(i) = jobs
            .iter()
            .position(|j| j.generation == generation && j.seq == seq)
        {
            jobs.remove(i);
        }
        self.count.store(jobs.len(), Ordering::Release);
        drop(jobs);
        self.done.notify_all();
    }
}

/// What the target tells the source about its replica during a resync or
/// verify, sent before the next ack.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Answer {
    /// A hash record's chunks compared.
    Compared(Compared),
    /// What reads as zeros at a resync's BEGIN.
    Zeroes(Zeroes),
}

impl Answer {
    /// The message that carries it.
    pub(super) fn into_message(self) -> Message {
        match self {
            Answer::Compared(c) => Message::Compared(c),
            Answer::Zeroes(z) => Message::Zeroes(z),
        }
    }
}

/// The answers waiting for the source's connection.
#[derive(Default)]
pub(super) struct Answers {
    queue: Mutex<VecDeque<Answer>>,
}

impl Answers {
    /// Takes every answer waiting.
    pub(super) fn take(&self) -> Vec<Answer> {
        self.queue
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
            .collect()
    }

    /// Whether any answer waits.
    pub(super) fn waiting(&self) -> bool {
        !self
            .queue
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_empty()
    }

    pub(super) fn push(&self, c: Answer) {
        let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        if q.len() >= MAX_ANSWERS {
            q.pop_front();
        }
        q.push_back(c);
    }
}

/// The applier's side of the comparer thread.
pub(super) struct Comparer {
    tx: Option<Sender<Job>>,
    in_flight: Arc<InFlight>,
    size: u64,
    thread: Option<JoinHandle<()>>,
}

impl Comparer {
    /// Starts the comparer of volume `volume` (`size` bytes), answering
    /// into `answers`.
    pub(super) fn start(
        volume: &str,
        size: u64,
        keys: Arc<KeyStore>,
        answers: Arc<Answers>,
        board: Arc<StatusBoard>,
    ) -> Self {
        let (tx, rx) = crossbeam_channel::bounded(MAX_JOBS);
        let in_flight = Arc::new(InFlight::default());
        let worker = Worker {
            volume: volume.to_owned(),
            size,
            keys,
            answers,
            board,
            in_flight: in_flight.clone(),
            key: None,
            file: None,
        };
        let thread = std::thread::Builder::new()
            .name(format!("compare-{volume}"))
            .spawn(move || worker.run(rx))
            .map_err(|e| tracing::error!(volume = %volume, "cannot start the chunk comparer: {e}; hash records are answered as differing"))
            .ok();
        Self {
            tx: thread.is_some().then_some(tx),
            in_flight,
            size,
            thread,
        }
    }

    /// Hands `job` to the comparer (waits while its queue is full). Every
    /// write the applier made before is complete.
    pub(super) fn submit(&self, job: Job, answers: &Answers) {
        let (start, end) = job.range(self.size);
        let seq = job.seq;
        let generation = job.generation;
        let count = job.span.count;
        let pending = Pending {
            generation,
            seq,
            start,
            end,
        };
        // A segment applied again after a failed attempt hands its hash
        // records over again: one comparison each is enough.
        if self.in_flight.lock().contains(&pending) {
            return;
        }
        let Some(tx) = &self.tx else {
            if let Some(c) = Compared::new(generation, seq, &vec![true; count as usize]) {
                answers.push(Answer::Compared(c));
            }
            return;
        };
        self.in_flight.add(pending);
        if let Err(e) = tx.send(job) {
            self.in_flight.finished(generation, seq);
            if let Some(c) = Compared::new(generation, e.0.seq, &vec![true; count as usize]) {
                answers.push(Answer::Compared(c));
            }
        }
    }

    /// Waits until no job still reading overlaps `[offset, offset + len)`:
    /// called before the applier writes there.
    pub(super) fn before_write(&self, offset: u64, len: u64) {
        let end = offset.saturating_add(len.max(1));
        let mut jobs = self.in_flight.lock();
        while jobs.iter().any(|j| j.start < end && offset < j.end) {
            jobs = self
                .in_flight
                .done
                .wait(jobs)
                .unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Whether any job is in flight (a check before each write, without
    /// the lock, before `before_write`).
    pub(super) fn busy(&self) -> bool {
        self.in_flight.count.load(Ordering::Acquire) > 0
    }

    /// The oldest hash record not answered yet: acks report nothing at or
    /// after it as applied.
    pub(super) fn unanswered_before(&self) -> Option<u64> {
        self.in_flight.lock().iter().map(|j| j.seq).min()
    }
}

impl Drop for Comparer {
    fn drop(&mut self) {
        self.tx = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The comparer thread.
struct Worker {
    volume: String,
    size: u64,
    keys: Arc<KeyStore>,
    answers: Arc<Answers>,
    board: Arc<StatusBoard>,
    in_flight: Arc<InFlight>,
    /// The chunk key last used (by key id).
    key: Option<ChunkKey>,
    /// The replica, open (by path and access).
    file: Option<(ReadAccess, File)>,
}

impl Worker {
    fn run(mut self, rx: Receiver<Job>) {
        for job in rx {
            // Whatever happens in the comparison, the job is answered and
            // leaves the in-flight list (the applier waits on it).
            let differs = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.compare(&job)))
                .unwrap_or_else(|_| {
                    tracing::error!(volume = %self.volume, seq = job.seq, "the chunk comparison failed unexpectedly; the chunks are resent");
                    vec![true; job.hashes.len()]
                });
            let n = differs.iter().filter(|d| **d).count() as u64;
            if n > 0 {
                tracing::debug!(volume = %self.volume, seq = job.seq, chunks = job.span.count, differing = n, "chunks compared");
            }
            if let Some(c) = Compared::new(job.generation, job.seq, &differs) {
                self.answers.push(Answer::Compared(c));
            }
            self.board.update(&self.volume, |s| {
                s.compared_chunks += u64::from(job.span.count);
                s.differing_chunks += n;
            });
            self.in_flight.finished(job.generation, job.seq);
        }
    }

    /// Which chunks of `job` differ on the replica (all of them when the
    /// key or the replica cannot be had).
    fn compare(&mut self, job: &Job) -> Vec<bool> {
        let all = vec![true; job.hashes.len()];
        if self.key.as_ref().map(ChunkKey::key_id) != Some(job.aux.key_id) {
            match ChunkKey::derive(&self.keys.get(), job.aux.key_id, &self.volume) {
                Ok(k) => self.key = Some(k),
                Err(e) => {
                    tracing::warn!(volume = %self.volume, seq = job.seq, "cannot compare chunks: {e}; they are resent");
                    return all;
                }
            }
        }
        match self.open(&job.access) {
            Ok(()) => {}
            Err(e) => {
                tracing::warn!(volume = %self.volume, path = %job.access.path.display(), "cannot open the replica to compare chunks: {e}; they are resent");
                return all;
            }
        };
        let (Some(key), Some((_, file))) = (&self.key, &self.file) else {
            return all;
        };
        match hash_chunks(file, key, &job.span, self.size) {
            Ok(mine) => mine
                .iter()
                .zip(&job.hashes)
                // blake3's comparison is constant-time.
                .map(|(a, b)| blake3::Hash::from_bytes(*a) != *b)
                .collect(),
            Err(e) => {
                tracing::warn!(volume = %self.volume, seq = job.seq, "cannot read the replica to compare chunks: {e}; they are resent");
                self.file = None;
                all
            }
        }
    }

    fn open(&mut self, access: &ReadAccess) -> std::io::Result<()> {
        if self.file.as_ref().is_none_or(|(a, _)| a != access) {
            let mut o = std::fs::OpenOptions::new();
            o.read(true);
            if access.direct {
                o.custom_flags(libc::O_DIRECT);
            }
            let f = o.open(&access.path)?;
            self.file = Some((access.clone(), f));
        }
        Ok(())
    }
}
