//! The io_uring applier shared by the replica backends: applies a list of
//! operations to one open file or block device, in order.
//!
//! Operations are submitted in batches of up to [`QUEUE_DEPTH`]; an
//! operation that overlaps one already in the batch (or one that has to run
//! synchronously) first drains the batch, so two operations that touch the
//! same bytes are never in flight together and the replica sees the
//! source's order. An error stops at the batch it happened in: nothing after
//! it is submitted, and the caller applies the whole list again (applying in
//! order is idempotent).
//!
//! No batch leaves anything with the kernel when it returns, whatever the
//! error: every entry the kernel took (counted by the submission queue's
//! head, not assumed) is waited for until its completion is reaped
//! (`EINTR` and transient failures wait again), and entries it did not take
//! are dropped with the ring rather than left queued for the next
//! submission. A full queue is submitted and filled again. `user_data`
//! carries the batch's generation next to the operation's index, so a
//! completion of another batch is never taken for one of this batch's (it
//! is logged and ignored).

use std::alloc::Layout;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use io_uring::{opcode, squeue, types, EnterFlags, IoUring};

use crate::replica::ApplyOp;
use crate::StoreError;

/// Operations in flight at most.
pub(crate) const QUEUE_DEPTH: u32 = 64;

/// Alignment of the bounce buffer for `O_DIRECT` writes (any device's DMA
/// and logical block alignment divides it).
const DIRECT_ALIGN: usize = 4096;

/// `_IO(0x12, 119)`: discard a byte range of a block device.
const BLKDISCARD: libc::c_ulong = 0x1277;
/// `_IO(0x12, 127)`: zero a byte range of a block device.
const BLKZEROOUT: libc::c_ulong = 0x127f;

/// How the target is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Target {
    /// A regular file with its space reserved. Writes are buffered (the
    /// caller's flush makes them durable); discard and zero punch a hole and
    /// allocate the range again (linked, in the ring), so the file keeps the
    /// space it reserved.
    File,
    /// A dm-thin device opened with `O_DIRECT`, so that every write reports
    /// its own error (a full pool's `ENOSPC` included) instead of leaving it
    /// to a later writeback, whose failure a retried fsync would not see
    /// again. Data goes through an aligned bounce buffer. Discard and zero
    /// unmap the whole pool blocks (`block_bytes`) they cover — unprovisioned
    /// blocks of a thin device read as zeroes and hold no pool space — and
    /// zero the partial blocks at the edges; both run synchronously after the
    /// batch in flight has completed.
    Thin {
        /// The pool's block size in bytes.
        block_bytes: u64,
    },
}

/// A buffer aligned to [`DIRECT_ALIGN`].
///
/// # Invariants
/// `ptr` is null and `cap` 0, or `ptr` was allocated with
/// `Layout::from_size_align(cap, DIRECT_ALIGN)` and is owned by this value.
struct AlignedBuf {
    ptr: *mut u8,
    cap: usize,
}

// SAFETY: the buffer is plain owned memory with no thread affinity; the
// raw pointer is only an owning handle (like `Box<[u8]>`).
unsafe impl Send for AlignedBuf {}

impl AlignedBuf {
    const fn new() -> Self {
        Self {
            ptr: std::ptr::null_mut(),
            cap: 0,
        }
    }

    /// Makes the buffer at least `len` bytes long (contents are lost).
    fn reserve(&mut self, len: usize) -> Result<(), StoreError> {
        if len <= self.cap {
            return Ok(());
        }
        let cap = len.next_power_of_two().max(1 << 20);
        let layout = Layout::from_size_align(cap, DIRECT_ALIGN)
            .map_err(|_| StoreError::Invalid(format!("bounce buffer of {cap} bytes")))?;
        // SAFETY: `layout` has a non-zero size (at least 1 MiB).
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            return Err(StoreError::Invalid(format!(
                "cannot allocate a bounce buffer of {cap} bytes"
            )));
        }
        self.free();
        // INVARIANT: `ptr` was just allocated with `layout` of size `cap`.
        self.ptr = ptr;
        self.cap = cap;
        Ok(())
    }

    fn as_slice(&self) -> &[u8] {
        if self.ptr.is_null() {
            return &[];
        }
        // SAFETY: by the invariant, `ptr` points to `cap` initialised (zeroed
        // at allocation) bytes that this value owns.
        unsafe { std::slice::from_raw_parts(self.ptr, self.cap) }
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        if self.ptr.is_null() {
            return &mut [];
        }
        // SAFETY: by the invariant, `ptr` points to `cap` initialised (zeroed
        // at allocation) bytes that this value owns; `&mut self` makes the
        // borrow unique.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.cap) }
    }

    fn free(&mut self) {
        if !self.ptr.is_null() {
            // SAFETY: by the invariant, `ptr` was allocated with this layout
            // (it was valid then, so it is now) and is freed once: it is
            // reset right after.
            unsafe {
                std::alloc::dealloc(
                    self.ptr,
                    Layout::from_size_align_unchecked(self.cap, DIRECT_ALIGN),
                )
            };
            self.ptr = std::ptr::null_mut();
            self.cap = 0;
        }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        self.free();
    }
}

/// Applies operations to one file or device with io_uring.
pub(crate) struct UringFile {
    file: File,
    path: PathBuf,
    size: u64,
    target: Target,
    ring: IoUring,
    bounce: AlignedBuf,
    /// The generation of the batch in flight (or last in flight): the high
    /// half of its entries' `user_data`. Never 0.
    generation: u32,
    /// Completions reaped that were of no operation in flight.
    stale: u64,
    #[cfg(test)]
    faults: Faults,
}

impl UringFile {
    /// Wraps an open file of `size` bytes (opened with `O_DIRECT` for
    /// [`Target::Thin`]).
    pub(crate) fn new(
        file: File,
        path: &Path,
        size: u64,
        target: Target,
    ) -> Result<Self, StoreError> {
        if let Target::Thin { block_bytes } = target {
            if block_bytes == 0 || !block_bytes.is_multiple_of(512) {
                return Err(StoreError::Invalid(format!(
                    "pool block size {block_bytes} is not a multiple of 512 bytes"
                )));
            }
        }
        let ring = IoUring::new(QUEUE_DEPTH * 2)
            .map_err(|e| StoreError::io("create io_uring", path, e))?;
        Ok(Self {
            file,
            path: path.to_owned(),
            size,
            target,
            ring,
            bounce: AlignedBuf::new(),
            generation: 0,
            stale: 0,
            #[cfg(test)]
            faults: Faults::default(),
        })
    }

    /// The open file.
    pub(crate) fn file(&self) -> &File {
        &self.file
    }

    /// Its path.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Applies `ops` in order.
    pub(crate) fn apply(&mut self, ops: &[ApplyOp<'_>]) -> Result<(), StoreError> {
        let mut batch: Vec<&ApplyOp<'_>> = Vec::with_capacity(QUEUE_DEPTH as usize);
        for op in ops {
            let (s, e) = op.range();
            if e > self.size {
                return Err(StoreError::Invalid(format!(
                    "operation [{s}, {e}) beyond the volume end {}",
                    self.size
                )));
            }
            if let (Target::Thin { block_bytes }, ApplyOp::Discard { .. } | ApplyOp::Zero { .. }) =
                (self.target, op)
            {
                self.submit_batch(&batch)?;
                batch.clear();
                self.zero_thin(s, e, block_bytes)?;
                continue;
            }
            let overlaps = batch.iter().any(|b| {
                let (bs, be) = b.range();
                s < be && bs < e
            });
            if overlaps || batch.len() == QUEUE_DEPTH as usize {
                self.submit_batch(&batch)?;
                batch.clear();
            }
            batch.push(op);
        }
        self.submit_batch(&batch)
    }

    /// Makes everything written so far durable.
    pub(crate) fn flush(&mut self) -> Result<(), StoreError> {
        self.file
            .sync_data()
            .map_err(|e| StoreError::io("flush replica", &self.path, e))
    }

    fn write_err(&self, e: std::io::Error) -> StoreError {
        StoreError::io("write replica", &self.path, e)
    }

    /// `[start, end)` of a thin device reads as zeroes afterwards.
    fn zero_thin(&mut self, start: u64, end: u64, block: u64) -> Result<(), StoreError> {
        let first = start.div_ceil(block) * block;
        let last = end / block * block;
        if first < last {
            match self.range_ioctl(BLKDISCARD, first, last) {
                Ok(()) => {
                    return self
                        .range_ioctl(BLKZEROOUT, start, first)
                        .and_then(|()| self.range_ioctl(BLKZEROOUT, last, end))
                        .map_err(|e| self.write_err(e));
                }
                // A pool with discards disabled: write the zeroes.
                Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {}
                Err(e) => return Err(self.write_err(e)),
            }
        }
        self.range_ioctl(BLKZEROOUT, start, end)
            .map_err(|e| self.write_err(e))
    }

    fn range_ioctl(&self, req: libc::c_ulong, start: u64, end: u64) -> std::io::Result<()> {
        if start >= end {
            return Ok(());
        }
        let range: [u64; 2] = [start, end - start];
        // SAFETY: BLKDISCARD and BLKZEROOUT read two u64 (start, length)
        // from the pointer, which points to `range`, alive for the call.
        let r = unsafe { libc::ioctl(self.file.as_raw_fd(), req as _, range.as_ptr()) };
        if r != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    fn submit_batch(&mut self, batch: &[&ApplyOp<'_>]) -> Result<(), StoreError> {
        if batch.is_empty() {
            return Ok(());
        }
        self.clear_queue()?;
        let direct = matches!(self.target, Target::Thin { .. });
        // Where each write's data sits in the bounce buffer (direct I/O).
        // Nothing is in flight here (no batch returns before its operations
        // have completed), so the buffer may move.
        let mut slots = Vec::new();
        if direct {
            let mut at = 0usize;
            for op in batch {
                if let ApplyOp::Write { data, .. } = op {
                    slots.push(at);
                    at += data.len().next_multiple_of(DIRECT_ALIGN);
                } else {
                    slots.push(usize::MAX);
                }
            }
            self.bounce.reserve(at)?;
            let buf = self.bounce.as_mut_slice();
            for (op, &at) in batch.iter().zip(&slots) {
                if let ApplyOp::Write { data, .. } = op {
                    buf[at..at + data.len()].copy_from_slice(data);
                }
            }
        }
        self.generation = self.generation.wrapping_add(1).max(1);
        let generation = self.generation;
        let bounce = self.bounce.as_slice();
        let fd = types::Fd(self.file.as_raw_fd());
        // Each entry, and whether the next one is linked to it (the two of a
        // discard or zero, which go to the kernel together).
        let mut entries = Vec::with_capacity(batch.len() * 2);
        let mut linked = Vec::with_capacity(batch.len() * 2);
        for (i, op) in batch.iter().enumerate() {
            match op {
                ApplyOp::Write { offset, data } => {
                    let ptr = if direct {
                        bounce[slots[i]..].as_ptr()
                    } else {
                        data.as_ptr()
                    };
                    entries.push(
                        opcode::Write::new(fd, ptr, data.len() as u32)
                            .offset(*offset)
                            .build()
                            .user_data(tag(generation, i, false)),
                    );
                    linked.push(false);
                }
                ApplyOp::Discard { offset, len } | ApplyOp::Zero { offset, len } => {
                    // Punch (reads back as zeroes), then allocate the range
                    // again (linked, in order): the replica keeps the space
                    // it reserved, so a later write there cannot hit a full
                    // disk. (Thin targets never get here: see `apply`.)
                    entries.push(
                        opcode::Fallocate::new(fd, *len)
                            .offset(*offset)
                            .mode(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE)
                            .build()
                            .flags(squeue::Flags::IO_LINK)
                            .user_data(tag(generation, i, false)),
                    );
                    entries.push(
                        opcode::Fallocate::new(fd, *len)
                            .offset(*offset)
                            .mode(libc::FALLOC_FL_KEEP_SIZE)
                            .build()
                            .user_data(tag(generation, i, true)),
                    );
                    linked.extend([true, false]);
                }
            }
        }
        let mut flight = Flight {
            results: vec![[None; 2]; batch.len()],
            ..Flight::default()
        };
        // From the first push until every completion is reaped, unwinding
        // would hand the buffers back while the kernel may use them.
        let guard = AbortOnUnwind;
        let sent = self.send(&entries, &linked, &mut flight);
        // Whatever `send` returned, nothing of the batch stays with the
        // kernel: what it took is waited out, what it did not is dropped.
        let submitted = flight.submitted;
        self.wait(&mut flight, submitted);
        std::mem::forget(guard);
        let cleared = if flight.pushed > flight.submitted {
            self.clear_queue()
        } else {
            Ok(())
        };
        // (Were the queue not cleared, the next batch clears it first.)
        sent?;
        cleared?;
        for (i, (op, r)) in batch.iter().zip(&flight.results).enumerate() {
            let Some(res) = r[0] else {
                return Err(StoreError::Invalid(format!(
                    "io_uring: no completion for operation {i} of the batch"
                )));
            };
            // A cancelled second entry only follows a failed first one.
            let err = if res < 0 {
                res
            } else {
                r[1].unwrap_or(0).min(0)
            };
            if err < 0 {
                return Err(self.write_err(std::io::Error::from_raw_os_error(-err)));
            }
            if let ApplyOp::Write { offset, data } = op {
                let done = res as usize;
                if done < data.len() {
                    // Short write: finish it synchronously.
                    let rest = if direct {
                        &self.bounce.as_slice()[slots[i] + done..slots[i] + data.len()]
                    } else {
                        &data[done..]
                    };
                    self.file
                        .write_all_at(rest, offset + done as u64)
                        .map_err(|e| self.write_err(e))?;
                }
            }
        }
        Ok(())
    }

    /// Hands `entries` (one batch, tagged with the current generation) to
    /// the kernel, a queue's worth at a time, reaping completions as they
    /// come. On success the kernel has taken every entry; either way
    /// `flight` says how far it got, for [`Self::wait`].
    fn send(
        &mut self,
        entries: &[squeue::Entry],
        linked: &[bool],
        f: &mut Flight,
    ) -> Result<(), StoreError> {
        while f.submitted < entries.len() {
            // Queue what fits, whole operations only: the two linked entries
            // of one go to the kernel in the same submission.
            let mut room = self.sq_room();
            while f.pushed < entries.len() {
                let n = if linked[f.pushed] { 2 } else { 1 };
                if n > room {
                    break;
                }
                let group = &entries[f.pushed..f.pushed + n];
                // SAFETY: the buffers the entries point to (the `data`
                // slices borrowed from the batch, or the bounce buffer, which
                // is not resized or freed during a batch) outlive every
                // operation: `submit_batch` waits for the completion of every
                // entry the kernel took before it returns, whatever the
                // error, and drops the entries it did not take with the queue
                // (`clear_queue`), so the kernel never reads them later. Were
                // waiting impossible, the process aborts rather than return
                // (`wait`, `AbortOnUnwind`). The fd stays open (owned by
                // self) for the same span.
                if unsafe { self.ring.submission().push_multiple(group) }.is_err() {
                    break;
                }
                f.pushed += n;
                room -= n;
            }
            if f.pushed == f.submitted {
                return Err(StoreError::Invalid(
                    "io_uring submission queue has no room for an operation".into(),
                ));
            }
            // Wait for the whole batch once it is all queued.
            let want = if f.pushed == entries.len() {
                f.pushed - f.reaped
            } else {
                0
            };
            let queued = self.ring.submission().len();
            let r = self.enter(true, want);
            // What the kernel took, by the queue's head, which it moves for
            // every entry it consumed (on success it is the count `submit`
            // returns; it also holds after a failure).
            let took = queued - self.ring.submission().len();
            if let Ok(n) = r {
                if n != took {
                    tracing::warn!(
                        submitted = n,
                        took,
                        "io_uring submit count differs from the queue"
                    );
                }
            }
            f.submitted += took;
            self.reap(f);
            match r {
                // Nothing taken and no error: submitting again would spin.
                Ok(_) if took == 0 => {
                    return Err(StoreError::Invalid(format!(
                        "io_uring took none of {queued} queued entries"
                    )))
                }
                Ok(_) => {}
                // A signal: submit again.
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                // Out of resources for now: free some by completing what is
                // in flight, then submit again.
                Err(e)
                    if matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EBUSY))
                        && (took > 0 || f.reaped < f.submitted) =>
                {
                    if took == 0 {
                        let one_more = f.reaped + 1;
                        self.wait(f, one_more);
                    }
                }
                Err(e) => return Err(StoreError::io("io_uring submit", &self.path, e)),
            }
            // A submission that split a linked pair (a short one: pairs are
            // queued whole): the kernel ran the first entry alone (a link
            // does not span submissions), so the second goes once it has
            // completed, in the link's order.
            if f.submitted < entries.len() && f.submitted > 0 && linked[f.submitted - 1] {
                let submitted = f.submitted;
                self.wait(f, submitted);
            }
        }
        Ok(())
    }

    /// Reaps completions until `until` of this batch's are in. Returns only
    /// then: a signal or a transient failure waits again, and a ring that
    /// cannot wait any more aborts the process, since returning would hand
    /// the caller back buffers the kernel may still use.
    fn wait(&mut self, f: &mut Flight, until: usize) {
        debug_assert!(until <= f.submitted);
        loop {
            self.reap(f);
            if f.reaped >= until {
                return;
            }
            match self.enter(false, until - f.reaped) {
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EINTR | libc::EAGAIN | libc::EBUSY | libc::ETIME)
                    ) => {}
                Err(e) => {
                    tracing::error!(
                        path = %self.path.display(),
                        in_flight = f.submitted - f.reaped,
                        "cannot wait for io_uring operations that use live buffers: {e}"
                    );
                    std::process::abort();
                }
            }
        }
    }

    /// Records the completions in the queue. One that is not of an entry
    /// of the batch in flight (another generation, an index beyond it, or
    /// an entry already completed) is counted in `stale` and ignored.
    fn reap(&mut self, f: &mut Flight) {
        let generation = self.generation;
        for cqe in self.ring.completion() {
            let (g, op, second) = untag(cqe.user_data());
            match f.results.get_mut(op) {
                Some(r) if g == generation && r[usize::from(second)].is_none() => {
                    r[usize::from(second)] = Some(cqe.result());
                    f.reaped += 1;
                }
                _ => {
                    self.stale += 1;
                    tracing::warn!(
                        path = %self.path.display(),
                        user_data = cqe.user_data(),
                        result = cqe.result(),
                        generation,
                        "io_uring completion of no operation in flight, ignored"
                    );
                }
            }
        }
    }

    /// Room in the submission queue.
    fn sq_room(&mut self) -> usize {
        let sq = self.ring.submission();
        let room = sq.capacity() - sq.len();
        #[cfg(test)]
        let room = self
            .faults
            .sq_room
            .map_or(room, |max| room.min(max.saturating_sub(sq.len())));
        room
    }

    /// Empties the submission queue of entries the kernel has not taken.
    /// There is no taking them back out, and the next submission would hand
    /// them over (to read buffers long gone, with completions taken for the
    /// next batch's), so the ring is replaced: closing it, the kernel drops
    /// them unread. Nothing is in flight when this runs.
    fn clear_queue(&mut self) -> Result<(), StoreError> {
        let queued = self.ring.submission().len();
        if queued == 0 {
            return Ok(());
        }
        tracing::warn!(
            path = %self.path.display(),
            queued,
            "dropping io_uring entries the kernel did not take"
        );
        self.ring = IoUring::new(QUEUE_DEPTH * 2)
            .map_err(|e| StoreError::io("create io_uring", &self.path, e))?;
        Ok(())
    }

    /// Enters the kernel: submits the queue and waits for `want`
    /// completions, or (`submit` false) only waits.
    fn enter(&mut self, submit: bool, want: usize) -> std::io::Result<usize> {
        #[cfg(test)]
        if let Some(r) = self.faults.intercept(&self.ring, submit) {
            return r;
        }
        if submit {
            self.ring.submit_and_wait(want)
        } else {
            let want = u32::try_from(want).unwrap_or(u32::MAX);
            // SAFETY: no argument pointer is passed (`None`), and with
            // nothing to submit the kernel reads no queue entry: it only
            // waits for completions.
            unsafe {
                self.ring.submitter().enter::<libc::sigset_t>(
                    0,
                    want,
                    EnterFlags::GETEVENTS.bits(),
                    None,
                )
            }
        }
    }
}

/// `user_data` of an entry of a batch: the batch's generation in the high
/// 32 bits, the operation's index in the batch and whether the entry is its
/// second in the low ones. A completion of another batch is never taken for
/// one of this batch's.
fn tag(generation: u32, op: usize, second: bool) -> u64 {
    u64::from(generation) << 32 | (op as u64) << 1 | u64::from(second)
}

/// The generation, operation index and second-entry flag of a `user_data`.
fn untag(user_data: u64) -> (u32, usize, bool) {
    (
        (user_data >> 32) as u32,
        ((user_data & 0xffff_ffff) >> 1) as usize,
        user_data & 1 == 1,
    )
}

/// How far a batch has got through the ring.
#[derive(Default)]
struct Flight {
    /// Entries pushed to the submission queue (a prefix of the batch's).
    pushed: usize,
    /// Of them, those the kernel has taken: their completions are due.
    submitted: usize,
    /// Completions reaped.
    reaped: usize,
    /// Per operation, the results of its first and second entry.
    results: Vec<[Option<i32>; 2]>,
}

/// Aborts the process if dropped, which only unwinding does (it is
/// forgotten otherwise): a panic while operations are in flight would free
/// or reuse buffers the kernel still reads.
struct AbortOnUnwind;

impl Drop for AbortOnUnwind {
    fn drop(&mut self) {
        tracing::error!("panic with io_uring operations in flight");
        std::process::abort();
    }
}

/// What the tests make the next kernel entry do.
#[cfg(test)]
#[derive(Debug, Clone, Copy)]
enum Step {
    /// Fail with `EINTR` without entering (a signal came first).
    Eintr,
    /// Let the kernel take at most this many queued entries without
    /// waiting, then fail with this errno.
    Partial(u32, i32),
}

/// Failures the tests inject where the applier enters the kernel.
#[cfg(test)]
#[derive(Default)]
struct Faults {
    /// What the next kernel entries do (then they run normally).
    script: std::collections::VecDeque<Step>,
    /// The submission queue holds at most this many entries.
    sq_room: Option<usize>,
    /// Told before every entry that only waits.
    on_wait: Option<std::sync::mpsc::Sender<()>>,
    /// Kernel entries seen that submitted, and that only waited.
    submits: usize,
    waits: usize,
    /// Operations in flight when each submission entered.
    in_flight_at_submit: Vec<u32>,
}

#[cfg(test)]
impl Faults {
    /// The result of this kernel entry, if the script decides it.
    fn intercept(&mut self, ring: &IoUring, submit: bool) -> Option<std::io::Result<usize>> {
        if submit {
            self.submits += 1;
            self.in_flight_at_submit
                .push(tests::ring_state(ring).in_flight);
        } else {
            self.waits += 1;
            if let Some(tx) = &self.on_wait {
                let _ = tx.send(());
            }
        }
        match self.script.pop_front()? {
            Step::Eintr => Some(Err(std::io::Error::from_raw_os_error(libc::EINTR))),
            Step::Partial(n, errno) => {
                let n = if submit { n } else { 0 };
                // SAFETY: no argument pointer is passed; the queued entries
                // point to buffers the caller keeps alive until their
                // completions are reaped, as for any submission.
                let r = unsafe { ring.submitter().enter::<libc::sigset_t>(n, 0, 0, None) };
                Some(r.and(Err(std::io::Error::from_raw_os_error(errno))))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_buffer_is_aligned_and_grows() {
        let mut b = AlignedBuf::new();
        assert!(b.as_mut_slice().is_empty());
        b.reserve(10).expect("reserve");
        let s = b.as_mut_slice();
        assert!(s.len() >= 10);
        assert_eq!(s.as_ptr() as usize % DIRECT_ALIGN, 0);
        s[0] = 7;
        b.reserve(3 << 20).expect("grow");
        assert!(b.as_mut_slice().len() >= 3 << 20);
        assert_eq!(b.as_mut_slice().as_ptr() as usize % DIRECT_ALIGN, 0);
    }

    #[test]
    fn bounce_buffered_writes_apply_in_order() {
        // The thin path's writes (through the aligned bounce buffer) on a
        // plain file: many unaligned source slices, overlapping in places.
        let (_d, p, mut u) = rig(Target::Thin { block_bytes: 65536 }, 1 << 20);
        let backing = vec![0u8; 300 * 512 + 1];
        let mut data = backing[1..].to_vec();
        for (i, b) in data.iter_mut().enumerate() {
            *b = (i / 512) as u8;
        }
        let mut ops = Vec::new();
        let mut expect = vec![0u8; 1 << 20];
        // 150 writes of 1..=3 sectors from odd addresses, the later ones
        // overwriting earlier ones (more than one batch).
        for i in 0..150u64 {
            let len = (1 + i as usize % 3) * 512;
            let src = &data[(i as usize % 7) * 512..(i as usize % 7) * 512 + len];
            let offset = (i * 7 % 97) * 512;
            expect[offset as usize..offset as usize + len].copy_from_slice(src);
            ops.push(ApplyOp::Write { offset, data: src });
        }
        u.apply(&ops).expect("apply");
        u.flush().expect("flush");
        assert_eq!(std::fs::read(&p).expect("read"), expect);
        assert!(
            u.apply(&[ApplyOp::Write {
                offset: (1 << 20) - 512,
                data: &data[..1024]
            }])
            .is_err(),
            "past the end"
        );
    }

    #[test]
    fn thin_target_refuses_odd_block_size() {
        let d = tempfile::tempdir().expect("tmp");
        let p = d.path().join("f");
        let f = File::create(&p).expect("create");
        assert!(UringFile::new(f, &p, 4096, Target::Thin { block_bytes: 1000 }).is_err());
    }

    // ---- Nothing is left with the kernel, whatever happens ----

    /// Bytes per test write.
    const OP: usize = 4096;

    /// What the kernel holds of a ring, from `/proc/self/fdinfo`: entries
    /// queued and not consumed, operations consumed whose completion is not
    /// posted yet (in flight), completions posted and not reaped.
    #[derive(Debug, Default, PartialEq, Eq)]
    pub(super) struct WithKernel {
        pub(super) queued: u32,
        pub(super) in_flight: u32,
        pub(super) unreaped: u32,
    }

    fn with_kernel(u: &UringFile) -> WithKernel {
        ring_state(&u.ring)
    }

    pub(super) fn ring_state(ring: &IoUring) -> WithKernel {
        use std::os::fd::AsRawFd as _;
        let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", ring.as_raw_fd()))
            .expect("ring fdinfo");
        let field = |name: &str| -> u32 {
            info.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(":"))
                .unwrap_or_else(|| panic!("no {name} in {info}"))
                .trim()
                .parse()
                .expect("number")
        };
        WithKernel {
            queued: field("SqTail").wrapping_sub(field("SqHead")),
            in_flight: field("CachedSqHead").wrapping_sub(field("CqTail")),
            unreaped: field("CqTail").wrapping_sub(field("CqHead")),
        }
    }

    /// An applier for `target` on a plain file of `len` bytes.
    fn rig(target: Target, len: u64) -> (tempfile::TempDir, PathBuf, UringFile) {
        let d = tempfile::tempdir().expect("tmp");
        let p = d.path().join("f");
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&p)
            .expect("create");
        f.set_len(len).expect("size");
        let u = UringFile::new(f, &p, len, target).expect("uring");
        (d, p, u)
    }

    /// `n` writes of [`OP`] bytes from `buf`, the `i`th at `2 * OP * i`
    /// (one batch: they do not overlap).
    fn spaced_writes(buf: &[u8], n: usize) -> Vec<ApplyOp<'_>> {
        (0..n)
            .map(|i| ApplyOp::Write {
                offset: (2 * OP * i) as u64,
                data: &buf[i * OP..(i + 1) * OP],
            })
            .collect()
    }

    /// Whether the `i`th of [`spaced_writes`] holds `b` in `file`.
    fn spaced_is(file: &[u8], i: usize, b: u8) -> bool {
        file[2 * OP * i..2 * OP * i + OP].iter().all(|&x| x == b)
    }

    /// Applies eight writes of `A` (the kernel takes 3 of them, then the
    /// submit reports `errno`), then, the buffer being the caller's again,
    /// fills it with `Z` and applies a write of `R` at `OP`. Checks that
    /// nothing was left with the kernel when the first apply returned and
    /// that the kernel never read the reused buffer; returns both results
    /// and the file.
    fn partial_submit_then_reuse(
        u: &mut UringFile,
        p: &Path,
        errno: i32,
        what: &str,
    ) -> (Result<(), StoreError>, Result<(), StoreError>, Vec<u8>) {
        let mut buf = vec![b'A'; 8 * OP];
        u.faults.script.push_back(Step::Partial(3, errno));
        let r = u.apply(&spaced_writes(&buf, 8));
        let left = with_kernel(u);
        buf.fill(b'Z');
        let other = [b'R'; OP];
        let r2 = u.apply(&[ApplyOp::Write {
            offset: OP as u64,
            data: &other,
        }]);
        let file = std::fs::read(p).expect("read");
        assert!(
            !file.contains(&b'Z'),
            "{what}: the kernel read the caller's buffer after apply returned {r:?}"
        );
        assert_eq!(
            left,
            WithKernel::default(),
            "{what}: left with the kernel when apply returned {r:?}"
        );
        (r, r2, file)
    }

    #[test]
    fn interrupted_partial_submit_is_finished_before_returning() {
        for target in [Target::File, Target::Thin { block_bytes: 65536 }] {
            let (_d, p, mut u) = rig(target, 1 << 20);
            // EINTR: a signal.
            let (r, r2, file) =
                partial_submit_then_reuse(&mut u, &p, libc::EINTR, &format!("{target:?}"));
            r.expect("an interrupted submit is retried");
            r2.expect("the next apply");
            assert!(u.faults.script.is_empty(), "the fault was injected");
            assert!(
                (0..8).all(|i| spaced_is(&file, i, b'A')),
                "{target:?}: data"
            );
            assert!(file[OP..2 * OP].iter().all(|&b| b == b'R'), "{target:?}");
        }
    }

    #[test]
    fn failed_partial_submit_waits_for_what_the_kernel_took() {
        let (_d, p, mut u) = rig(Target::File, 1 << 20);
        let (r, r2, file) = partial_submit_then_reuse(&mut u, &p, libc::EIO, "EIO");
        match r {
            Err(StoreError::Io(replica_fs::IoError { source, .. })) => {
                assert_eq!(source.raw_os_error(), Some(libc::EIO))
            }
            other => panic!("a failed submit is its error, not {other:?}"),
        }
        r2.expect("the applier works after the failure");
        // What the kernel took was done before the error came back; what it
        // did not take never ran.
        assert!((0..3).all(|i| spaced_is(&file, i, b'A')), "taken");
        assert!((3..8).all(|i| spaced_is(&file, i, 0)), "not taken");
        // The caller's retry applies everything.
        let buf = vec![b'B'; 8 * OP];
        u.apply(&spaced_writes(&buf, 8)).expect("retry");
        let file = std::fs::read(&p).expect("read");
        assert!((0..8).all(|i| spaced_is(&file, i, b'B')), "retried");
        assert_eq!(with_kernel(&u), WithKernel::default());
    }

    #[test]
    fn interrupted_submits_are_retried() {
        let (_d, p, mut u) = rig(Target::File, 1 << 20);
        let buf = vec![b'A'; 8 * OP];
        u.faults.script.extend([Step::Eintr; 3]);
        let r = u.apply(&spaced_writes(&buf, 8));
        assert_eq!(with_kernel(&u), WithKernel::default(), "after {r:?}");
        r.expect("EINTR is retried");
        assert!(
            u.faults.script.is_empty(),
            "every interruption was injected"
        );
        let file = std::fs::read(&p).expect("read");
        assert!((0..8).all(|i| spaced_is(&file, i, b'A')));
    }

    #[test]
    fn interrupted_wait_with_an_operation_in_flight_is_retried() {
        // A full pipe: a write to it stays in flight until the reader drains
        // it, and the reader starts only once the applier waits.
        let mut fds = [0; 2];
        // SAFETY: `fds` has room for the two descriptors pipe2 writes.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: pipe2 just opened both; each is owned once, here.
        let (rd, wr) = unsafe {
            use std::os::fd::FromRawFd as _;
            (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1]))
        };
        // SAFETY: F_GETPIPE_SZ takes no argument.
        let cap = unsafe { libc::fcntl(wr.as_raw_fd(), libc::F_GETPIPE_SZ) };
        let prefill = vec![b'p'; usize::try_from(cap).expect("pipe size")];
        // Exactly its capacity: this does not block, and nothing more fits.
        std::io::Write::write_all(&mut &wr, &prefill).expect("fill the pipe");
        let (tx, rx) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            use std::io::Read as _;
            let _ = rx.recv();
            let mut got = Vec::new();
            (&rd).read_to_end(&mut got).expect("read pipe");
            got
        });
        let mut u = UringFile::new(wr, Path::new("pipe"), 1 << 20, Target::File).expect("uring");
        u.faults.on_wait = Some(tx);
        // The kernel takes the write and the submit reports EINTR; then the
        // first wait is interrupted too.
        u.faults
            .script
            .extend([Step::Partial(1, libc::EINTR), Step::Eintr]);
        let data = [b'A'; OP];
        let r = u.apply(&[ApplyOp::Write {
            offset: 0,
            data: &data,
        }]);
        let left = with_kernel(&u);
        let script_left = u.faults.script.len();
        drop(u); // Closes the pipe (and tells the reader if nobody did).
        let got = reader.join().expect("reader");
        assert_eq!(left, WithKernel::default(), "when apply returned {r:?}");
        r.expect("EINTR is retried");
        assert_eq!(script_left, 0, "both faults were injected");
        assert_eq!(got.len(), prefill.len() + OP);
        assert!(got[prefill.len()..].iter().all(|&b| b == b'A'));
    }

    #[test]
    fn full_submission_queue_is_submitted_and_continued() {
        let (_d, p, mut u) = rig(Target::File, 1 << 20);
        u.file()
            .write_all_at(&vec![0xee; 1 << 20], 0)
            .expect("fill");
        let mut buf = vec![0u8; 8 * OP];
        for (i, b) in buf.iter_mut().enumerate() {
            *b = (i / OP) as u8 + 1;
        }
        let mut ops = spaced_writes(&buf, 8);
        // Two discards (two linked entries each) in the gaps.
        for i in [0u64, 5] {
            ops.push(ApplyOp::Discard {
                offset: 2 * OP as u64 * i + OP as u64,
                len: OP as u64,
            });
        }
        u.faults.sq_room = Some(3);
        let r = u.apply(&ops);
        assert_eq!(with_kernel(&u), WithKernel::default(), "after {r:?}");
        r.expect("a full submission queue is submitted, not an error");
        assert!(u.faults.submits >= 4, "12 entries went 3 at a time");
        let file = std::fs::read(&p).expect("read");
        assert!((0..8).all(|i| spaced_is(&file, i, i as u8 + 1)), "writes");
        for i in 0..8 {
            let gap = &file[2 * OP * i + OP..2 * OP * (i + 1)];
            let want = if i == 0 || i == 5 { 0 } else { 0xee };
            assert!(gap.iter().all(|&b| b == want), "gap {i}");
        }
    }

    #[test]
    fn stale_completion_is_not_taken_for_the_batch() {
        let (_d, p, mut u) = rig(Target::File, 1 << 20);
        // A completion this batch did not ask for, as an earlier batch's
        // would be had it been left in flight: a failed write whose
        // user_data 1 is "operation 0, second entry" untagged, and a
        // generation no batch has.
        let junk = [0u8; 512];
        let stale = opcode::Write::new(types::Fd(-1), junk.as_ptr(), 512)
            .build()
            .user_data(1);
        // SAFETY: `junk` outlives the operation: its completion is waited
        // for right below.
        unsafe { u.ring.submission().push(&stale).expect("push") };
        u.ring.submit_and_wait(1).expect("submit");
        assert_eq!(
            u.ring.completion().len(),
            1,
            "the stale completion is there"
        );
        let data = [b'A'; OP];
        let r = u.apply(&[ApplyOp::Write {
            offset: 0,
            data: &data,
        }]);
        assert_eq!(with_kernel(&u), WithKernel::default(), "after {r:?}");
        r.expect("the stale EBADF is not this batch's");
        assert_eq!(u.stale, 1, "the stale completion was seen and ignored");
        let file = std::fs::read(&p).expect("read");
        assert!(file[..OP].iter().all(|&b| b == b'A'));
    }

    #[test]
    fn split_link_runs_its_second_entry_after_the_first() {
        use std::os::unix::fs::MetadataExt as _;
        let (_d, p, mut u) = rig(Target::File, 1 << 20);
        u.file()
            .write_all_at(&vec![0xee; 1 << 20], 0)
            .expect("fill");
        u.flush().expect("flush");
        let blocks = std::fs::metadata(&p).expect("stat").blocks();
        // The kernel takes the punch but not the allocation linked to it.
        u.faults.script.push_back(Step::Partial(1, libc::EINTR));
        let r = u.apply(&[ApplyOp::Discard {
            offset: 65536,
            len: 65536,
        }]);
        assert_eq!(with_kernel(&u), WithKernel::default(), "after {r:?}");
        r.expect("EINTR is retried");
        let file = std::fs::read(&p).expect("read");
        assert!(file[65536..131072].iter().all(|&b| b == 0), "discarded");
        assert!(file[..65536]
            .iter()
            .chain(&file[131072..])
            .all(|&b| b == 0xee));
        assert_eq!(
            std::fs::metadata(&p).expect("stat").blocks(),
            blocks,
            "the range is allocated again after the punch"
        );
        // The allocation was submitted once the punch had completed.
        assert_eq!(u.faults.in_flight_at_submit, [0, 0]);
    }
}
