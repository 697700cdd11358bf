//! The journal files on disk: their names and listing, reading one frame,
//! scanning a file for its whole frames, and checking what a scan found
//! against the durable watermark.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use replica_proto::frame::{self, SegmentHeader, HEADER_LEN};

use super::Watermark;
use crate::StoreError;

/// Where a frame lives in the journal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FramePos {
    /// Journal file number.
    pub file: u64,
    /// Byte offset in that file.
    pub offset: u64,
    /// Its header.
    pub header: SegmentHeader,
}

/// What a start-up scan found.
#[derive(Debug, Default)]
pub struct Scan {
    /// Every whole frame, in order.
    pub frames: Vec<FramePos>,
    /// Bytes cut off a torn tail, if any.
    pub truncated_bytes: u64,
}

pub(super) fn file_name(no: u64) -> String {
    format!("{no:016}.jnl")
}

pub(super) fn list_files(dir: &Path) -> Result<Vec<u64>, StoreError> {
    let mut v = Vec::new();
    for e in std::fs::read_dir(dir).map_err(|e| StoreError::io("read journal directory", dir, e))? {
        let e = e.map_err(|e| StoreError::io("read journal directory", dir, e))?;
        let name = e.file_name();
        let name = name.to_string_lossy();
        // Only the names the journal gives its files: numbers from 1,
        // exactly as `file_name` writes them. Another name (file 0, which
        // no journal numbers, or "+5.jnl" for file 5) would be opened
        // under a name it does not have, or become the base of a durable
        // watermark that the next open refuses as damaged.
        if let Some(n) = name
            .strip_suffix(".jnl")
            .and_then(|s| s.parse::<u64>().ok())
        {
            if n >= 1 && file_name(n) == name {
                v.push(n);
            }
        }
    }
    v.sort_unstable();
    Ok(v)
}

/// Reads the frame at `pos` (header and ciphertext).
pub fn read_frame(dir: &Path, pos: &FramePos) -> Result<Vec<u8>, StoreError> {
    let path = dir.join(file_name(pos.file));
    let mut f = File::open(&path).map_err(|e| StoreError::io("open journal file", &path, e))?;
    f.seek(SeekFrom::Start(pos.offset))
        .map_err(|e| StoreError::io("seek journal", &path, e))?;
    let mut buf = vec![0u8; pos.header.frame_len()];
    f.read_exact(&mut buf)
        .map_err(|e| StoreError::io("read journal", &path, e))?;
    let h = frame::check(&buf).map_err(|e| StoreError::Corrupt {
        path: path.clone(),
        offset: pos.offset,
        why: e.to_string(),
    })?;
    if h != pos.header {
        return Err(StoreError::Corrupt {
            path,
            offset: pos.offset,
            why: "frame changed on disk".into(),
        });
    }
    Ok(buf)
}

/// Every whole frame of the journal in `dir`, in order, read-only (a torn
/// tail is left alone, the watermark is not consulted): for tools that
/// inspect a live daemon's journal.
pub fn frames(dir: &Path) -> Result<Vec<FramePos>, StoreError> {
    let mut out = Vec::new();
    for no in list_files(dir)? {
        scan_file(&dir.join(file_name(no)), no, &mut out)?;
    }
    Ok(out)
}

pub(super) fn scan_file(
    path: &Path,
    no: u64,
    frames: &mut Vec<FramePos>,
) -> Result<(u64, u64), StoreError> {
    let mut f = File::open(path).map_err(|e| StoreError::io("open journal file", path, e))?;
    let len = f
        .metadata()
        .map_err(|e| StoreError::io("stat journal file", path, e))?
        .len();
    let mut off = 0u64;
    let mut hdr = [0u8; HEADER_LEN];
    let mut buf = Vec::new();
    while off < len {
        let mut unsupported = None;
        let ok = (|| {
            if len - off < HEADER_LEN as u64 {
                return None;
            }
            f.seek(SeekFrom::Start(off)).ok()?;
            f.read_exact(&mut hdr).ok()?;
            let (h, _) = match SegmentHeader::decode(&hdr) {
                Ok(x) => x,
                Err(e @ frame::FrameError::Unsupported(_)) => {
                    // Its checksum holds: a whole frame of another format
                    // version, not a torn one. Cutting it would drop
                    // acknowledged records.
                    unsupported = Some(e);
                    return None;
                }
                Err(_) => return None,
            };
            if (h.frame_len() as u64) > len - off {
                return None;
            }
            buf.resize(h.frame_len(), 0);
            f.seek(SeekFrom::Start(off)).ok()?;
            f.read_exact(&mut buf).ok()?;
            frame::check(&buf).ok()
        })();
        match ok {
            Some(h) => {
                let n = h.frame_len() as u64;
                frames.push(FramePos {
                    file: no,
                    offset: off,
                    header: h,
                });
                off += n;
            }
            None => {
                if let Some(e) = unsupported {
                    return Err(StoreError::Invalid(format!(
                        "{}: the frame at byte {off} is one this version cannot read ({e}): a journal written by another version; apply it with that version (let the target catch up) before changing versions",
                        path.display()
                    )));
                }
                return Ok((off, len));
            }
        }
    }
    Ok((off, len))
}

/// Checks the watermark's own file: whole frames up to `m.offset` (`good`
/// is where the scan stopped, `len` the file's length), the last of them
/// ending exactly there with record `m.seq`.
pub(super) fn check_below_mark(
    path: &Path,
    m: &Watermark,
    frames: &[FramePos],
    good: u64,
    len: u64,
) -> Result<(), StoreError> {
    let lost = format!(
        "durable up to byte {} of this file (record {}): acknowledged records would be lost",
        m.offset, m.seq
    );
    if good < m.offset {
        let what = if len < m.offset {
            format!("the file ends at byte {len}, inside the durable area")
        } else {
            "damaged frame below the durable watermark".to_owned()
        };
        return Err(StoreError::Corrupt {
            path: path.to_owned(),
            offset: good,
            why: format!("{what}; {lost}"),
        });
    }
    if m.offset == 0 {
        return Ok(());
    }
    match frames
        .iter()
        .find(|f| f.offset + f.header.frame_len() as u64 == m.offset)
    {
        None => Err(StoreError::Corrupt {
            path: path.to_owned(),
            offset: m.offset,
            why: format!("the durable watermark does not fall on a frame boundary; {lost}"),
        }),
        Some(f) if f.header.last_seq != m.seq => Err(StoreError::Corrupt {
            path: path.to_owned(),
            offset: f.offset,
            why: format!(
                "the frame ending at the durable watermark holds records up to {}, \
                 the watermark says {}; {lost}",
                f.header.last_seq, m.seq
            ),
        }),
        Some(_) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use crc32c::crc32c;

    use super::super::testing::*;
    use super::super::Journal;
    use super::*;

    /// Found by fuzzing (tests/fuzz, target `journal`): a file named as
    /// journal file 0 in a journal without a watermark became the base of
    /// the watermark written at open, which the next open refused as
    /// damaged ("base file 0"): the journal no longer opened. Names the
    /// journal does not give its files are not journal files.
    #[test]
    fn only_the_names_the_journal_writes_are_journal_files() {
        let d = tempfile::tempdir().expect("tmp");
        let (f, _) = frame(1, 1, 0);
        std::fs::write(d.path().join(file_name(0)), &f).expect("write");
        std::fs::write(d.path().join("+7.jnl"), &f).expect("write");
        std::fs::write(d.path().join("7.jnl"), &f).expect("write");
        assert_eq!(list_files(d.path()).expect("list"), Vec::<u64>::new());
        let (j, scan) = Journal::open(d.path(), 1 << 20).expect("open");
        assert!(scan.frames.is_empty());
        assert_eq!(j.watermark().base, 1);
        drop(j);
        let (mut j, _) = Journal::open(d.path(), 1 << 20).expect("open again");
        let (f2, h2) = frame(1, 1, 1);
        j.append(&f2, &h2).expect("append");
        assert_eq!(j.sync().expect("sync"), 1);
        drop(j);
        let (_, scan) = Journal::open(d.path(), 1 << 20).expect("open a third time");
        assert_eq!(scan.frames.len(), 1);
        assert_eq!(scan.frames[0].file, 1);
        // The files it does not own are left alone.
        assert_eq!(std::fs::read(d.path().join(file_name(0))).expect("read"), f);
    }

    /// A whole frame of another format version (its checksums hold) is not
    /// a torn tail: cutting it would drop acknowledged records.
    #[test]
    fn a_frame_of_another_format_version_is_an_error_not_a_torn_tail() {
        let d = tempfile::tempdir().expect("tmp");
        let (mut j, _) = Journal::open(d.path(), 1 << 20).expect("open");
        for i in 0..2u64 {
            let (f, h) = frame(1 + i * 3, 3, i);
            j.append(&f, &h).expect("append");
        }
        j.sync().expect("sync");
        drop(j);
        let files = list_files(d.path()).expect("list");
        let path = d.path().join(file_name(*files.last().expect("last")));
        let mut bytes = std::fs::read(&path).expect("read");
        // The second frame as an older version wrote it: version 1, header
        // checksum recomputed.
        let (first, _) = frame(1, 3, 0);
        let at = first.len();
        bytes[at + 4..at + 6].copy_from_slice(&1u16.to_le_bytes());
        let crc = crc32c(&bytes[at..at + 132]);
        bytes[at + 132..at + 136].copy_from_slice(&crc.to_le_bytes());
        std::fs::write(&path, &bytes).expect("write");
        let e = Journal::open(d.path(), 1 << 20).err().expect("refused");
        assert!(
            matches!(e, StoreError::Invalid(ref m) if m.contains("another version")),
            "{e}"
        );
        assert_eq!(std::fs::read(&path).expect("read"), bytes, "nothing cut");
    }
}
