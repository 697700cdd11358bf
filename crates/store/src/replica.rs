//! Replica storage: the interface the applier writes through, and the file
//! backend used on hosts without device-mapper (tests, development).
//!
//! Both backends (this one and [`crate::thin`]) write with the io_uring
//! applier of [`crate::uring`]: two operations that touch overlapping bytes
//! are never in flight together, so the replica sees the source's order.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use crate::uring::{Target, UringFile};
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
    /// The byte range `[start, end)` it touches.
    pub(crate) fn range(&self) -> (u64, u64) {
        match self {
            ApplyOp::Write { offset, data } => (*offset, offset + data.len() as u64),
            ApplyOp::Discard { offset, len } | ApplyOp::Zero { offset, len } => {
                (*offset, offset + len)
            }
        }
    }
}

/// How a recovery point is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PointAccess {
    /// The point itself, read-only (verification, copying out).
    ReadOnly,
    /// A writable copy of the point (test failover): writes go to the
    /// copy, never to the point, and replication goes on meanwhile.
    Writable,
}

/// Where a replica keeps its data and recovery points. The applier owns
/// one per volume and calls it from one thread.
pub trait ReplicaStore: Send {
    /// Volume size in bytes.
    fn size(&self) -> u64;
    /// Applies operations in order (overlapping ones in the given order).
    /// On error, some of them may have been applied: the caller applies
    /// the same operations again (in order, that is idempotent).
    fn apply(&mut self, ops: &[ApplyOp<'_>]) -> Result<(), StoreError>;
    /// Makes everything applied so far durable.
    fn flush(&mut self) -> Result<(), StoreError>;
    /// Takes a snapshot of the current (flushed) contents as point `id`
    /// (replacing one of the same id). Once it returns, the snapshot is
    /// listed by `list_points` until `delete_point`, also after a crash;
    /// a crash during it leaves either nothing or a listed snapshot, so the
    /// caller's start-up cleanup (delete what it has no record of) never
    /// leaks one.
    fn create_point(&mut self, id: u64) -> Result<(), StoreError>;
    /// Deletes the snapshot of point `id` (missing is fine).
    fn delete_point(&mut self, id: u64) -> Result<(), StoreError>;
    /// Ids of the snapshots that exist, ascending.
    fn list_points(&self) -> Result<Vec<u64>, StoreError>;
    /// Makes point `id` readable (or a writable copy of it) and returns the
    /// path of the file or block device that holds it. Opening an open
    /// point again returns the same path.
    fn open_point(&mut self, id: u64, access: PointAccess) -> Result<PathBuf, StoreError>;
    /// Undoes `open_point` (a writable copy is discarded). Closing a point
    /// that is not open is fine.
    fn close_point(&mut self, id: u64, access: PointAccess) -> Result<(), StoreError>;
    /// Conditions an operator should know about (e.g. a thin pool above
    /// its low-water mark), each a sentence with the figures; empty when all
    /// is well.
    fn warnings(&mut self) -> Result<Vec<String>, StoreError> {
        Ok(Vec::new())
    }
    /// Failover: makes the replica the primary volume, rolled back to
    /// point `id` or as it is now (`None`), flushed; returns the path of the
    /// volume to use on this host. Nothing is applied to it afterwards.
    fn promote(&mut self, point: Option<u64>) -> Result<PathBuf, StoreError>;
    /// Where the replica's current contents can be read by another open
    /// file (a chunk comparison reads it while the applier goes on), and
    /// whether to read it with `O_DIRECT` (a block device the applier
    /// writes with `O_DIRECT`). Writes are visible there once `apply`
    /// returned.
    fn reader(&self) -> ReadAccess;
    /// Byte ranges, `(start, length)`, that read as zeros now (everything
    /// `apply` returned for included) because nothing was ever stored
    /// there: a file's holes, a thin device's unprovisioned blocks. A
    /// backend that cannot tell says nothing; saying less than is true is
    /// always safe, saying more never is.
    fn known_zero(&mut self) -> Result<Vec<(u64, u64)>, StoreError> {
        Ok(Vec::new())
    }
}

/// Most ranges [`file_holes`] lists (the first ones of the file).
pub const MAX_HOLES: usize = 4096;
/// Holes shorter than this are left out: they cannot hold a whole chunk
/// (64 KiB at the least), and many small ones would use up [`MAX_HOLES`].
pub const MIN_HOLE: u64 = 64 << 10;

/// The holes of `file` of `size` bytes (`SEEK_DATA`/`SEEK_HOLE`: the
/// filesystem's own map; unwritten extents count as holes where it says
/// so), at most [`MAX_HOLES`] of at least [`MIN_HOLE`] bytes. A filesystem
/// without hole support reports the whole file as data: no holes.
pub fn file_holes(file: &File, path: &Path, size: u64) -> Result<Vec<(u64, u64)>, StoreError> {
    let fd = file.as_raw_fd();
    let seek = |at: u64, whence: libc::c_int| -> Result<Option<u64>, StoreError> {
        // SAFETY: lseek on an fd we hold open; no memory is passed. It
        // moves the file offset, which nothing here relies on (the replica
        // is read and written with positioned I/O).
        let r = unsafe { libc::lseek(fd, at as libc::off_t, whence) };
        if r >= 0 {
            return Ok(Some(r as u64));
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENXIO) {
            Ok(None) // no data (or hole) at or after `at`
        } else {
            Err(StoreError::io("look for holes in replica", path, e))
        }
    };
    let mut holes = Vec::new();
    let mut at = 0u64;
    while at < size && holes.len() < MAX_HOLES {
        let data = seek(at, libc::SEEK_DATA)?.unwrap_or(size).min(size);
        if data >= at.saturating_add(MIN_HOLE) || (data > at && data == size) {
            holes.push((at, data - at));
        }
        if data >= size {
            break;
        }
        at = seek(data, libc::SEEK_HOLE)?.unwrap_or(size);
        if at <= data {
            break; // a filesystem that contradicts itself: stop, say less
        }
    }
    Ok(holes)
}

/// How a replica's current contents are read from outside the applier.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadAccess {
    /// The file or block device.
    pub path: PathBuf,
    /// Read it with `O_DIRECT`.
    pub direct: bool,
}

/// A replica in a plain file, with recovery points as file copies (reflinks
/// where the filesystem supports them) in a sibling directory.
pub struct FileReplica {
    points_dir: PathBuf,
    io: UringFile,
    size: u64,
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
        remove_partial_images(points_dir)?;
        Ok(Self {
            points_dir: points_dir.to_owned(),
            io: UringFile::new(file, path, size, Target::File)?,
            size,
        })
    }

    fn point_path(&self, id: u64) -> PathBuf {
        self.points_dir.join(format!("{id:020}.img"))
    }

    fn clone_path(&self, id: u64) -> PathBuf {
        self.points_dir.join(format!("{id:020}.clone"))
    }

    /// Copies `src` to `dst` (a reflink where the filesystem can), durably
    /// and atomically (through `tmp`).
    fn copy_image(&self, src: &File, dst: &Path, tmp: &Path) -> Result<(), StoreError> {
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
        let cloned = unsafe { libc::ioctl(out.as_raw_fd(), libc::FICLONE, src.as_raw_fd()) } == 0;
        if !cloned {
            let mut s = src
                .try_clone()
                .map_err(|e| StoreError::io("open replica", self.io.path(), e))?;
            use std::io::Seek;
            s.rewind()
                .map_err(|e| StoreError::io("open replica", self.io.path(), e))?;
            let mut o = &out;
            std::io::copy(&mut s, &mut o).map_err(|e| StoreError::io("copy point", tmp, e))?;
        }
        out.sync_all()
            .map_err(|e| StoreError::io("sync point", tmp, e))?;
        std::fs::rename(tmp, dst).map_err(|e| StoreError::io("publish point", dst, e))?;
        Ok(replica_fs::sync_dir(&self.points_dir)?)
    }

    fn copy_or_clean(&self, src: &File, dst: &Path) -> Result<(), StoreError> {
        let tmp = dst.with_extension("tmp");
        let r = self.copy_image(src, dst, &tmp);
        if r.is_err() {
            // Leave no partial image behind: it would hold the space.
            let _ = std::fs::remove_file(&tmp);
        }
        r
    }
}

/// Start-up recovery: deletes the partial images (`*.tmp`) a crash left
/// while a point or a writable copy was being written; they hold space and
/// are no point.
fn remove_partial_images(points_dir: &Path) -> Result<(), StoreError> {
    let list = |e| StoreError::io("list points", points_dir, e);
    let mut removed = false;
    for e in std::fs::read_dir(points_dir).map_err(list)? {
        let p = e.map_err(list)?.path();
        if p.extension().is_some_and(|x| x == "tmp") {
            tracing::warn!(path = %p.display(), "deleting a partial point image (a copy interrupted by a crash)");
            std::fs::remove_file(&p).map_err(|e| StoreError::io("delete partial image", &p, e))?;
            removed = true;
        }
    }
    if removed {
        replica_fs::sync_dir(points_dir)?;
    }
    Ok(())
}

impl ReplicaStore for FileReplica {
    fn known_zero(&mut self) -> Result<Vec<(u64, u64)>, StoreError> {
        file_holes(self.io.file(), self.io.path(), self.size)
    }

    fn reader(&self) -> ReadAccess {
        ReadAccess {
            path: self.io.path().to_owned(),
            direct: false,
        }
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn apply(&mut self, ops: &[ApplyOp<'_>]) -> Result<(), StoreError> {
        self.io.apply(ops)
    }

    fn flush(&mut self) -> Result<(), StoreError> {
        self.io.flush()
    }

    fn create_point(&mut self, id: u64) -> Result<(), StoreError> {
        self.copy_or_clean(self.io.file(), &self.point_path(id))
    }

    fn delete_point(&mut self, id: u64) -> Result<(), StoreError> {
        let p = self.point_path(id);
        match std::fs::remove_file(&p) {
            Ok(()) => Ok(replica_fs::sync_dir(&self.points_dir)?),
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

    fn open_point(&mut self, id: u64, access: PointAccess) -> Result<PathBuf, StoreError> {
        let p = self.point_path(id);
        if !p.exists() {
            return Err(StoreError::NoSuchPoint(id));
        }
        match access {
            PointAccess::ReadOnly => Ok(p),
            PointAccess::Writable => {
                let c = self.clone_path(id);
                if !c.exists() {
                    let src = File::open(&p).map_err(|e| StoreError::io("open point", &p, e))?;
                    self.copy_or_clean(&src, &c)?;
                }
                Ok(c)
            }
        }
    }

    fn close_point(&mut self, id: u64, access: PointAccess) -> Result<(), StoreError> {
        if access == PointAccess::ReadOnly {
            return Ok(());
        }
        let c = self.clone_path(id);
        match std::fs::remove_file(&c) {
            Ok(()) => Ok(replica_fs::sync_dir(&self.points_dir)?),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(StoreError::io("discard point copy", &c, e)),
        }
    }

    fn promote(&mut self, point: Option<u64>) -> Result<PathBuf, StoreError> {
        if let Some(id) = point {
            let src_path = self.point_path(id);
            let src = File::open(&src_path)
                .map_err(|e| StoreError::io("open recovery point", &src_path, e))?;
            // SAFETY: FICLONE takes the source fd as its argument and
            // touches no user memory; both fds are open for the call.
            let cloned =
                unsafe { libc::ioctl(self.io.file().as_raw_fd(), libc::FICLONE, src.as_raw_fd()) }
                    == 0;
            if !cloned {
                use std::io::{Seek, SeekFrom};
                let mut dst = self.io.file();
                dst.seek(SeekFrom::Start(0))
                    .map_err(|e| StoreError::io("roll back replica", self.io.path(), e))?;
                let mut s = &src;
                std::io::copy(&mut s, &mut dst)
                    .map_err(|e| StoreError::io("roll back replica", self.io.path(), e))?;
            }
        }
        self.io
            .file()
            .sync_all()
            .map_err(|e| StoreError::io("flush replica", self.io.path(), e))?;
        Ok(self.io.path().to_owned())
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
        let p = r.open_point(7, PointAccess::ReadOnly).expect("open point");
        assert_eq!(std::fs::read(&p).expect("point"), got);
        // A writable copy is separate from the point and not listed.
        let c = r.open_point(7, PointAccess::Writable).expect("copy");
        assert_ne!(c, p);
        std::fs::write(&c, b"changed").expect("write copy");
        assert_eq!(std::fs::read(&p).expect("point"), got);
        assert_eq!(r.list_points().expect("list"), vec![7]);
        r.close_point(7, PointAccess::Writable).expect("close");
        assert!(!c.exists());
        assert!(
            r.open_point(8, PointAccess::ReadOnly).is_err(),
            "no such point"
        );
        assert!(
            r.apply(&[ApplyOp::Write {
                offset: (1 << 20) - 512,
                data: &a
            }])
            .is_err(),
            "past the end"
        );
    }

    /// Whether `ranges` say that byte `at` reads as zero.
    fn claimed(ranges: &[(u64, u64)], at: u64) -> bool {
        ranges.iter().any(|&(s, l)| at >= s && at < s + l)
    }

    #[test]
    fn known_zero_never_names_written_bytes() {
        let d = tempfile::tempdir().expect("tmp");
        let size = 8 << 20;
        let mut r = FileReplica::open(&d.path().join("r.img"), size, &d.path().join("points"))
            .expect("open");
        let fresh = r.known_zero().expect("holes");
        let a = vec![7u8; 4096];
        let b = vec![0u8; 65536];
        let ops = [
            ApplyOp::Write {
                offset: 1 << 20,
                data: &a,
            },
            ApplyOp::Write {
                offset: 5 << 20,
                data: &b,
            },
        ];
        r.apply(&ops).expect("apply");
        let after = r.known_zero().expect("holes");
        for at in [1 << 20, (1 << 20) + 4095, 5 << 20, (5 << 20) + 65535] {
            assert!(
                !claimed(&after, at),
                "written byte {at} claimed zero: {after:?}"
            );
        }
        r.flush().expect("flush");
        let flushed = r.known_zero().expect("holes");
        assert!(!claimed(&flushed, 1 << 20), "{flushed:?}");
        // A filesystem with holes (and unwritten extents as holes) names
        // the rest; one without names nothing, which is safe.
        if !fresh.is_empty() {
            eprintln!("holes of a fresh replica: {fresh:?}; after two writes: {flushed:?}");
            assert!(claimed(&flushed, 3 << 20), "{flushed:?}");
        } else {
            eprintln!("this filesystem reports no holes: nothing is claimed zero");
        }
        for &(s, l) in &flushed {
            assert!(l > 0 && s + l <= size, "{flushed:?}");
        }
    }

    #[test]
    fn opening_deletes_partial_images_and_keeps_points_and_copies() {
        let d = tempfile::tempdir().expect("tmp");
        let points = d.path().join("points");
        let path = d.path().join("r.img");
        let mut r = FileReplica::open(&path, 1 << 20, &points).expect("open");
        r.create_point(3).expect("point");
        let copy = r.open_point(3, PointAccess::Writable).expect("copy");
        drop(r);
        let partial = points.join(format!("{:020}.tmp", 4));
        std::fs::write(&partial, b"half a point").expect("partial");
        let r = FileReplica::open(&path, 1 << 20, &points).expect("reopen");
        assert!(!partial.exists(), "the partial image is deleted");
        assert!(copy.exists(), "a writable copy stays open across a restart");
        assert_eq!(r.list_points().expect("list"), vec![3]);
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
