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

use std::alloc::Layout;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use io_uring::{opcode, types, IoUring};

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
        let direct = matches!(self.target, Target::Thin { .. });
        // Where each write's data sits in the bounce buffer (direct I/O).
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
        let bounce = self.bounce.as_slice();
        let fd = types::Fd(self.file.as_raw_fd());
        // user_data = op index << 1 | second entry of that op.
        let mut entries = Vec::with_capacity(batch.len() * 2);
        for (i, op) in batch.iter().enumerate() {
            let ud = (i as u64) << 1;
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
                            .user_data(ud),
                    )
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
                            .flags(io_uring::squeue::Flags::IO_LINK)
                            .user_data(ud),
                    );
                    entries.push(
                        opcode::Fallocate::new(fd, *len)
                            .offset(*offset)
                            .mode(libc::FALLOC_FL_KEEP_SIZE)
                            .build()
                            .user_data(ud | 1),
                    );
                }
            }
        }
        for entry in &entries {
            // SAFETY: the buffers the entries point to (the `data` slices
            // borrowed from `batch`, or the bounce buffer, which is not
            // resized or freed before this function returns) outlive every
            // operation: we wait for every completion below before
            // returning. The fd stays open (owned by self) for the same span.
            unsafe {
                self.ring
                    .submission()
                    .push(entry)
                    .map_err(|_| StoreError::Invalid("io_uring submission queue full".into()))?;
            }
        }
        self.ring
            .submit_and_wait(entries.len())
            .map_err(|e| StoreError::io("io_uring submit", &self.path, e))?;
        let mut results = vec![(i32::MIN, 0i32); batch.len()];
        let mut seen = 0;
        while seen < entries.len() {
            let cqes: Vec<_> = self
                .ring
                .completion()
                .map(|c| (c.user_data(), c.result()))
                .collect();
            if cqes.is_empty() {
                self.ring
                    .submit_and_wait(1)
                    .map_err(|e| StoreError::io("io_uring wait", &self.path, e))?;
                continue;
            }
            for (ud, res) in cqes {
                if let Some(r) = results.get_mut((ud >> 1) as usize) {
                    if ud & 1 == 0 {
                        r.0 = res;
                    } else {
                        r.1 = res;
                    }
                    seen += 1;
                }
            }
        }
        for (i, (op, (res, res2))) in batch.iter().zip(results).enumerate() {
            // A cancelled second entry only follows a failed first one.
            let err = if res < 0 { res } else { res2.min(0) };
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
        let d = tempfile::tempdir().expect("tmp");
        let p = d.path().join("f");
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&p)
            .expect("create");
        f.set_len(1 << 20).expect("size");
        let mut u =
            UringFile::new(f, &p, 1 << 20, Target::Thin { block_bytes: 65536 }).expect("uring");
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
}
