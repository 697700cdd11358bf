//! Replica storage: the interface the applier writes through, and the file
//! backend used on hosts without device-mapper (tests, development).
//!
//! Writes are submitted with io_uring in batches; two operations that touch
//! overlapping bytes are never in flight together (the batch is drained
//! first), so the replica sees the source's order.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use io_uring::{opcode, types, IoUring};

use crate::StoreError;

/// One operation to apply, in stream order.
#[derive(Debug)]
pub enum ApplyOp<'a> {
    /// Write `data` at byte `offset`.
    Write {
        /// Byte offset.
        offset: u64,
        /// Data.
        data: &'a [u8],
    },
    /// Discard (reads back as zeroes on this backend).
    Discard {
        /// Byte offset.
        offset: u64,
        /// Length.
        len: u64,
    },
    /// Write zeroes.
    Zero {
        /// Byte offset.
        offset: u64,
        /// Length.
        len: u64,
    },
}

impl ApplyOp<'_> {
    fn range(&self) -> (u64, u64) {
        match self {
            ApplyOp::Write { offset, data } => (*offset, offset + data.len() as u64),
            ApplyOp::Discard { offset, len } | ApplyOp::Zero { offset, len } => {
                (*offset, offset + len)
            }
        }
    }
}

/// Where a replica keeps its data and recovery points.
pub trait ReplicaStore: Send {
    /// Volume size in bytes.
    fn size(&self) -> u64;
    /// Applies operations in order (overlapping ones in the given order).
    fn apply(&mut self, ops: &[ApplyOp<'_>]) -> Result<(), StoreError>;
    /// Makes everything applied so far durable.
    fn flush(&mut self) -> Result<(), StoreError>;
    /// Takes a snapshot of the current (flushed) contents as point `id`.
    fn create_point(&mut self, id: u64) -> Result<(), StoreError>;
    /// Deletes the snapshot of point `id` (missing is fine).
    fn delete_point(&mut self, id: u64) -> Result<(), StoreError>;
    /// Ids of the snapshots that exist.
    fn list_points(&self) -> Result<Vec<u64>, StoreError>;
    /// A path from which the contents of point `id` can be read.
    fn point_path(&self, id: u64) -> PathBuf;
    /// Failover: makes the replica the primary volume, rolled back to
    /// point `id` or as it is now (`None`), flushed; returns the path of the
    /// volume to use on this host. Nothing is applied to it afterwards.
    fn promote(&mut self, point: Option<u64>) -> Result<PathBuf, StoreError>;
}

const QUEUE_DEPTH: u32 = 64;

/// A replica in a plain file, with recovery points as file copies (reflinks
/// where the filesystem supports them) in a sibling directory.
pub struct FileReplica {
    path: PathBuf,
    points_dir: PathBuf,
    file: File,
    size: u64,
    ring: IoUring,
}

impl FileReplica {
    /// Opens (creating and sizing if needed) the replica file. An existing
    /// file of another size is refused.
    pub fn open(path: &Path, size: u64, points_dir: &Path) -> Result<Self, StoreError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|e| StoreError::io("open replica", path, e))?;
        let cur = file
            .metadata()
            .map_err(|e| StoreError::io("stat replica", path, e))?
            .len();
        if cur == 0 {
            file.set_len(size)
                .map_err(|e| StoreError::io("size replica", path, e))?;
            // Reserve the space up front, as a block device has it: applying
            // must never fail for lack of space once the replica exists.
            // SAFETY: plain syscall on an fd we own; no memory is passed.
            let r = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, size as libc::off_t) };
            if r != 0 {
                let e = std::io::Error::last_os_error();
                if e.raw_os_error() != Some(libc::EOPNOTSUPP) {
                    let _ = std::fs::remove_file(path);
                    return Err(StoreError::io("reserve replica space", path, e));
                }
            }
        } else if cur != size {
            return Err(StoreError::Invalid(format!(
                "replica {} is {cur} bytes but the volume is {size} bytes",
                path.display()
            )));
        }
        std::fs::create_dir_all(points_dir)
            .map_err(|e| StoreError::io("create points directory", points_dir, e))?;
        let ring = IoUring::new(QUEUE_DEPTH * 2)
            .map_err(|e| StoreError::io("create io_uring", path, e))?;
        Ok(Self {
            path: path.to_owned(),
            points_dir: points_dir.to_owned(),
            file,
            size,
            ring,
        })
    }

    fn submit_batch(&mut self, batch: &[&ApplyOp<'_>]) -> Result<(), StoreError> {
        if batch.is_empty() {
            return Ok(());
        }
        let fd = types::Fd(self.file.as_raw_fd());
        // user_data = op index << 1 | second entry of that op.
        let mut entries = Vec::with_capacity(batch.len() * 2);
        for (i, op) in batch.iter().enumerate() {
            let ud = (i as u64) << 1;
            match op {
                ApplyOp::Write { offset, data } => entries.push(
                    opcode::Write::new(fd, data.as_ptr(), data.len() as u32)
                        .offset(*offset)
                        .build()
                        .user_data(ud),
                ),
                ApplyOp::Discard { offset, len } | ApplyOp::Zero { offset, len } => {
                    // Punch (reads back as zeroes), then allocate the range
                    // again (linked, in order): the replica keeps the space
                    // it reserved, so a later write there cannot hit a full
                    // disk.
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
            // SAFETY: the buffers referenced by the entries (`data` slices) are
            // borrowed from `batch`, which outlives this function, and we wait
            // for every completion below before returning, so the kernel never
            // reads them after they are gone. The fd stays open (owned by
            // self) for the same span.
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
        for (op, (res, res2)) in batch.iter().zip(results) {
            // A cancelled second entry only follows a failed first one.
            let err = if res < 0 { res } else { res2.min(0) };
            if err < 0 {
                return Err(StoreError::io(
                    "write replica",
                    &self.path,
                    std::io::Error::from_raw_os_error(-err),
                ));
            }
            if let ApplyOp::Write { offset, data } = op {
                let done = res as usize;
                if done < data.len() {
                    // Short write: finish it synchronously.
                    use std::os::unix::fs::FileExt;
                    self.file
                        .write_all_at(&data[done..], offset + done as u64)
                        .map_err(|e| StoreError::io("write replica", &self.path, e))?;
                }
            }
        }
        Ok(())
    }
}

impl FileReplica {
    fn apply_ops(&mut self, ops: &[ApplyOp<'_>]) -> Result<(), StoreError> {
        let mut batch: Vec<&ApplyOp<'_>> = Vec::with_capacity(QUEUE_DEPTH as usize);
        for op in ops {
            let (s, e) = op.range();
            if e > self.size {
                return Err(StoreError::Invalid(format!(
                    "operation [{s}, {e}) beyond the volume end {}",
                    self.size
                )));
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

    fn create_point_inner(&mut self, dst: &Path, tmp: &Path) -> Result<(), StoreError> {
        let _ = std::fs::remove_file(tmp);
        let out = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(tmp)
            .map_err(|e| StoreError::io("create point", tmp, e))?;
        // FICLONE shares extents on filesystems that support reflinks;
        // otherwise copy (copy_file_range via std::io::copy).
        // SAFETY: FICLONE takes the source fd as its argument and touches no
        // user memory; both fds are open for the duration of the call.
        let cloned =
            unsafe { libc::ioctl(out.as_raw_fd(), libc::FICLONE, self.file.as_raw_fd()) } == 0;
        if !cloned {
            let mut src = File::open(&self.path)
                .map_err(|e| StoreError::io("open replica", &self.path, e))?;
            let mut o = &out;
            std::io::copy(&mut src, &mut o).map_err(|e| StoreError::io("copy point", tmp, e))?;
        }
        out.sync_all()
            .map_err(|e| StoreError::io("sync point", tmp, e))?;
        std::fs::rename(tmp, dst).map_err(|e| StoreError::io("publish point", dst, e))?;
        crate::journal::sync_dir(&self.points_dir)
    }
}

impl ReplicaStore for FileReplica {
    fn size(&self) -> u64 {
        self.size
    }

    fn apply(&mut self, ops: &[ApplyOp<'_>]) -> Result<(), StoreError> {
        self.apply_ops(ops)
    }

    fn flush(&mut self) -> Result<(), StoreError> {
        self.file
            .sync_data()
            .map_err(|e| StoreError::io("flush replica", &self.path, e))
    }

    fn create_point(&mut self, id: u64) -> Result<(), StoreError> {
        let dst = self.point_path(id);
        let tmp = dst.with_extension("tmp");
        let r = self.create_point_inner(&dst, &tmp);
        if r.is_err() {
            // Leave no partial image behind: it would hold the space.
            let _ = std::fs::remove_file(&tmp);
        }
        r
    }

    fn delete_point(&mut self, id: u64) -> Result<(), StoreError> {
        let p = self.point_path(id);
        match std::fs::remove_file(&p) {
            Ok(()) => crate::journal::sync_dir(&self.points_dir),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(StoreError::io("delete point", &p, e)),
        }
    }

    fn list_points(&self) -> Result<Vec<u64>, StoreError> {
        let mut v = Vec::new();
        for e in std::fs::read_dir(&self.points_dir)
            .map_err(|e| StoreError::io("list points", &self.points_dir, e))?
        {
            let e = e.map_err(|e| StoreError::io("list points", &self.points_dir, e))?;
            let name = e.file_name();
            if let Some(id) = name
                .to_string_lossy()
                .strip_suffix(".img")
                .and_then(|s| s.parse().ok())
            {
                v.push(id);
            }
        }
        v.sort_unstable();
        Ok(v)
    }

    fn point_path(&self, id: u64) -> PathBuf {
        self.points_dir.join(format!("{id:020}.img"))
    }

    fn promote(&mut self, point: Option<u64>) -> Result<PathBuf, StoreError> {
        if let Some(id) = point {
            let src_path = self.point_path(id);
            let src = File::open(&src_path)
                .map_err(|e| StoreError::io("open recovery point", &src_path, e))?;
            // SAFETY: FICLONE takes the source fd as its argument and
            // touches no user memory; both fds are open for the call.
            let cloned =
                unsafe { libc::ioctl(self.file.as_raw_fd(), libc::FICLONE, src.as_raw_fd()) } == 0;
            if !cloned {
                use std::io::{Seek, SeekFrom};
                let mut dst = &self.file;
                dst.seek(SeekFrom::Start(0))
                    .map_err(|e| StoreError::io("roll back replica", &self.path, e))?;
                let mut s = &src;
                std::io::copy(&mut s, &mut dst)
                    .map_err(|e| StoreError::io("roll back replica", &self.path, e))?;
            }
        }
        self.file
            .sync_all()
            .map_err(|e| StoreError::io("flush replica", &self.path, e))?;
        Ok(self.path.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlapping_ops_apply_in_order() {
        let d = tempfile::tempdir().expect("tmp");
        let mut r = FileReplica::open(&d.path().join("r.img"), 1 << 20, &d.path().join("points"))
            .expect("open");
        let a = vec![1u8; 8192];
        let b = vec![2u8; 4096];
        let c = vec![3u8; 512];
        let ops = [
            ApplyOp::Write {
                offset: 0,
                data: &a,
            },
            ApplyOp::Write {
                offset: 4096,
                data: &b,
            },
            ApplyOp::Zero {
                offset: 0,
                len: 512,
            },
            ApplyOp::Write {
                offset: 4096,
                data: &c,
            },
        ];
        r.apply(&ops).expect("apply");
        r.flush().expect("flush");
        let got = std::fs::read(d.path().join("r.img")).expect("read");
        assert!(got[..512].iter().all(|&x| x == 0));
        assert!(got[512..4096].iter().all(|&x| x == 1));
        assert!(got[4096..4608].iter().all(|&x| x == 3));
        assert!(got[4608..8192].iter().all(|&x| x == 2));
        r.create_point(7).expect("point");
        assert_eq!(r.list_points().expect("list"), vec![7]);
        assert_eq!(std::fs::read(r.point_path(7)).expect("point"), got);
        assert!(
            r.apply(&[ApplyOp::Write {
                offset: (1 << 20) - 512,
                data: &a
            }])
            .is_err(),
            "past the end"
        );
    }

    #[test]
    fn promote_rolls_back_to_a_point_or_keeps_the_current_contents() {
        let d = tempfile::tempdir().expect("tmp");
        let path = d.path().join("r.img");
        let mut r = FileReplica::open(&path, 1 << 20, &d.path().join("points")).expect("open");
        let a = vec![1u8; 4096];
        r.apply(&[ApplyOp::Write {
            offset: 0,
            data: &a,
        }])
        .expect("apply");
        r.flush().expect("flush");
        r.create_point(5).expect("point");
        let at5 = std::fs::read(&path).expect("read");
        let b = vec![2u8; 4096];
        r.apply(&[ApplyOp::Write {
            offset: 8192,
            data: &b,
        }])
        .expect("apply");
        let now = r.promote(None).expect("promote as is");
        assert_eq!(now, path);
        assert!(std::fs::read(&path).expect("read")[8192..12288]
            .iter()
            .all(|&x| x == 2));
        assert_eq!(r.promote(Some(5)).expect("promote at 5"), path);
        assert_eq!(std::fs::read(&path).expect("read"), at5);
        assert!(r.promote(Some(6)).is_err(), "no such point");
    }
}
