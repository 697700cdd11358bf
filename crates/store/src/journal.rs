//! The target's segment journal: still-encrypted segments appended in
//! arrival order to numbered files, fsynced before they are acknowledged.
//!
//! Frames are stored exactly as they arrived; each carries its own magic,
//! lengths and checksums, so a scan at start-up finds every whole frame and
//! truncates a torn tail left by a crash. Corruption anywhere but the tail of
//! the newest file is reported, never skipped.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use replica_proto::frame::{self, SegmentHeader, HEADER_LEN};

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

/// The journal of one volume.
pub struct Journal {
    dir: PathBuf,
    max_file_bytes: u64,
    current: File,
    current_no: u64,
    current_len: u64,
    durable_seq: u64,
    pending_seq: u64,
    /// Highest record sequence in each journal file.
    file_max: std::collections::BTreeMap<u64, u64>,
}

/// What a start-up scan found.
#[derive(Debug, Default)]
pub struct Scan {
    /// Every whole frame, in order.
    pub frames: Vec<FramePos>,
    /// Bytes cut off a torn tail, if any.
    pub truncated_bytes: u64,
}

fn file_name(no: u64) -> String {
    format!("{no:016}.jnl")
}

fn list_files(dir: &Path) -> Result<Vec<u64>, StoreError> {
    let mut v = Vec::new();
    for e in std::fs::read_dir(dir).map_err(|e| StoreError::io("read journal directory", dir, e))? {
        let e = e.map_err(|e| StoreError::io("read journal directory", dir, e))?;
        let name = e.file_name();
        let name = name.to_string_lossy();
        if let Some(stem) = name.strip_suffix(".jnl") {
            if let Ok(n) = stem.parse::<u64>() {
                v.push(n);
            }
        }
    }
    v.sort_unstable();
    Ok(v)
}

/// Fsyncs a directory so a created or removed entry is durable.
pub fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| StoreError::io("sync directory", dir, e))
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
/// tail is left alone): for tools that inspect a live daemon's journal.
pub fn frames(dir: &Path) -> Result<Vec<FramePos>, StoreError> {
    let mut out = Vec::new();
    for no in list_files(dir)? {
        scan_file(&dir.join(file_name(no)), no, &mut out)?;
    }
    Ok(out)
}

fn scan_file(path: &Path, no: u64, frames: &mut Vec<FramePos>) -> Result<(u64, u64), StoreError> {
    let mut f = File::open(path).map_err(|e| StoreError::io("open journal file", path, e))?;
    let len = f
        .metadata()
        .map_err(|e| StoreError::io("stat journal file", path, e))?
        .len();
    let mut off = 0u64;
    let mut hdr = [0u8; HEADER_LEN];
    let mut buf = Vec::new();
    while off < len {
        let ok = (|| {
            if len - off < HEADER_LEN as u64 {
                return None;
            }
            f.seek(SeekFrom::Start(off)).ok()?;
            f.read_exact(&mut hdr).ok()?;
            let (h, _) = SegmentHeader::decode(&hdr).ok()?;
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
            None => return Ok((off, len)),
        }
    }
    Ok((off, len))
}

impl Journal {
    /// Opens (creating if needed) the journal in `dir`, scanning every file
    /// and truncating a torn tail of the newest one.
    pub fn open(dir: &Path, max_file_bytes: u64) -> Result<(Self, Scan), StoreError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| StoreError::io("create journal directory", dir, e))?;
        let files = list_files(dir)?;
        let mut scan = Scan::default();
        let last = files.last().copied();
        for &no in &files {
            let path = dir.join(file_name(no));
            let (good, len) = scan_file(&path, no, &mut scan.frames)?;
            if good < len {
                if Some(no) != last {
                    return Err(StoreError::Corrupt {
                        path,
                        offset: good,
                        why: "damaged frame in the middle of the journal".into(),
                    });
                }
                let f = OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .map_err(|e| StoreError::io("open journal file", &path, e))?;
                f.set_len(good)
                    .map_err(|e| StoreError::io("truncate torn journal tail", &path, e))?;
                f.sync_all()
                    .map_err(|e| StoreError::io("sync journal", &path, e))?;
                scan.truncated_bytes = len - good;
                tracing::warn!(file = %path.display(), offset = good, bytes = len - good, "journal: truncated a torn tail");
            }
        }
        let current_no = last.unwrap_or(1);
        let path = dir.join(file_name(current_no));
        let current = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| StoreError::io("open journal file", &path, e))?;
        let current_len = current
            .metadata()
            .map_err(|e| StoreError::io("stat journal", &path, e))?
            .len();
        if last.is_none() {
            sync_dir(dir)?;
        }
        let durable_seq = scan
            .frames
            .iter()
            .map(|f| f.header.last_seq)
            .max()
            .unwrap_or(0);
        let mut file_max = std::collections::BTreeMap::new();
        for no in &files {
            file_max.insert(*no, 0);
        }
        for f in &scan.frames {
            let m = file_max.entry(f.file).or_insert(0);
            *m = (*m).max(f.header.last_seq);
        }
        let j = Self {
            dir: dir.to_owned(),
            max_file_bytes,
            current,
            current_no,
            current_len,
            durable_seq,
            pending_seq: durable_seq,
            file_max,
        };
        Ok((j, scan))
    }

    /// The journal directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Highest record sequence in a durable frame.
    pub fn durable_seq(&self) -> u64 {
        self.durable_seq
    }

    /// Appends a checked frame (not yet durable: call [`Self::sync`]). On
    /// failure (e.g. a full disk) the file is cut back so no partial frame
    /// remains.
    pub fn append(
        &mut self,
        frame_bytes: &[u8],
        header: &SegmentHeader,
    ) -> Result<FramePos, StoreError> {
        if self.current_len > 0 && self.current_len + frame_bytes.len() as u64 > self.max_file_bytes
        {
            self.rotate()?;
        }
        let path = self.dir.join(file_name(self.current_no));
        if let Err(e) = self.current.write_all(frame_bytes) {
            // Leave no partial frame behind; the scan would cut it anyway.
            let _ = self.current.set_len(self.current_len);
            return Err(StoreError::io("append to journal", &path, e));
        }
        let pos = FramePos {
            file: self.current_no,
            offset: self.current_len,
            header: header.clone(),
        };
        self.current_len += frame_bytes.len() as u64;
        self.pending_seq = self.pending_seq.max(header.last_seq);
        let m = self.file_max.entry(self.current_no).or_insert(0);
        *m = (*m).max(header.last_seq);
        Ok(pos)
    }

    /// Makes every appended frame durable.
    pub fn sync(&mut self) -> Result<u64, StoreError> {
        let path = self.dir.join(file_name(self.current_no));
        if let Err(e) = self.current.sync_data() {
            return Err(StoreError::io("sync journal", &path, e));
        }
        self.durable_seq = self.durable_seq.max(self.pending_seq);
        Ok(self.durable_seq)
    }

    fn rotate(&mut self) -> Result<(), StoreError> {
        let old = self.dir.join(file_name(self.current_no));
        self.current
            .sync_all()
            .map_err(|e| StoreError::io("sync journal", &old, e))?;
        let no = self.current_no + 1;
        let path = self.dir.join(file_name(no));
        self.current = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| StoreError::io("create journal file", &path, e))?;
        sync_dir(&self.dir)?;
        self.current_no = no;
        self.current_len = 0;
        self.file_max.insert(no, 0);
        Ok(())
    }

    /// Empties the journal (every frame must be applied): the next frames
    /// may start a new sequence space (a new ring generation).
    pub fn restart(&mut self) -> Result<(), StoreError> {
        let no = self.current_no + 1;
        let path = self.dir.join(file_name(no));
        let fresh = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| StoreError::io("create journal file", &path, e))?;
        for old in list_files(&self.dir)? {
            if old == no {
                continue;
            }
            let p = self.dir.join(file_name(old));
            match std::fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(StoreError::io("remove journal file", &p, e)),
            }
        }
        sync_dir(&self.dir)?;
        self.current = fresh;
        self.current_no = no;
        self.current_len = 0;
        self.durable_seq = 0;
        self.pending_seq = 0;
        self.file_max = [(no, 0)].into_iter().collect();
        Ok(())
    }

    /// Deletes journal files all of whose frames end at or before
    /// `applied_seq` (the current file is kept).
    pub fn trim(&mut self, applied_seq: u64) -> Result<usize, StoreError> {
        let mut removed = 0;
        let done: Vec<u64> = self
            .file_max
            .iter()
            .filter(|(no, max)| **no < self.current_no && **max <= applied_seq)
            .map(|(no, _)| *no)
            .collect();
        for no in done {
            let p = self.dir.join(file_name(no));
            match std::fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(StoreError::io("remove journal file", &p, e)),
            }
            self.file_max.remove(&no);
            removed += 1;
        }
        if removed > 0 {
            sync_dir(&self.dir)?;
        }
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use replica_proto::frame::{seal, SegmentHeader};
    use replica_proto::keys::{Direction, KeyRing, StreamContext, StreamKey};

    fn frame(first: u64, n: u32, counter: u64) -> (Vec<u8>, SegmentHeader) {
        let kr = KeyRing::generate().expect("kr");
        let k = StreamKey::derive(
            &kr,
            1,
            &StreamContext {
                stream_id: [1; 16],
                volume: "v",
                direction: Direction::Forward,
                epoch: 1,
            },
        )
        .expect("key");
        let mut plain = Vec::new();
        for s in first..first + u64::from(n) {
            replica_proto::frame::encode_record_parts(&mut plain, s, 2, 0, 0, 0, 0, 0, 0, &[]);
        }
        let h = SegmentHeader {
            features: 0,
            key_id: 1,
            stream_id: [1; 16],
            generation: [2; 16],
            volume_tag: [3; 16],
            epoch: 1,
            counter,
            first_seq: first,
            last_seq: first + u64::from(n) - 1,
            record_count: n,
            plain_len: 0,
            cipher_len: 0,
            zstd_level: 1,
            source_time_ns: 0,
        };
        let f = seal(h, &plain, 1, &k).expect("seal");
        let h = replica_proto::frame::check(&f).expect("check");
        (f, h)
    }

    #[test]
    fn torn_tail_is_truncated_and_rotation_and_trim_work() {
        let d = tempfile::tempdir().expect("tmp");
        let (mut j, scan) = Journal::open(d.path(), 400).expect("open");
        assert!(scan.frames.is_empty());
        for i in 0..4u64 {
            let (f, h) = frame(1 + i * 3, 3, i);
            j.append(&f, &h).expect("append");
        }
        assert_eq!(j.sync().expect("sync"), 12);
        // Tear the last file: append half a frame by hand.
        let files = list_files(d.path()).expect("list");
        assert!(files.len() >= 2, "small max size must rotate: {files:?}");
        let last = d.path().join(file_name(*files.last().expect("last")));
        let (f, _) = frame(13, 3, 9);
        let mut o = OpenOptions::new().append(true).open(&last).expect("open");
        o.write_all(&f[..f.len() / 2]).expect("tear");
        drop(o);
        drop(j);
        let (mut j, scan) = Journal::open(d.path(), 400).expect("reopen");
        assert_eq!(scan.frames.len(), 4);
        assert_eq!(scan.truncated_bytes as usize, f.len() / 2);
        assert_eq!(j.durable_seq(), 12);
        let back = read_frame(d.path(), &scan.frames[2]).expect("read");
        assert_eq!(replica_proto::frame::check(&back).expect("ok").first_seq, 7);
        // Trim everything applied up to 6: the files holding only 1..=6 go.
        let before = list_files(d.path()).expect("list").len();
        let removed = j.trim(6).expect("trim");
        assert!(removed >= 1 && list_files(d.path()).expect("list").len() == before - removed);
    }

    #[test]
    fn damage_in_the_middle_is_an_error() {
        let d = tempfile::tempdir().expect("tmp");
        let (mut j, _) = Journal::open(d.path(), 300).expect("open");
        for i in 0..3u64 {
            let (f, h) = frame(1 + i, 1, i);
            j.append(&f, &h).expect("append");
        }
        j.sync().expect("sync");
        drop(j);
        let first = d.path().join(file_name(1));
        let mut b = std::fs::read(&first).expect("read");
        b[HEADER_LEN + 3] ^= 1;
        std::fs::write(&first, b).expect("write");
        assert!(matches!(
            Journal::open(d.path(), 300),
            Err(StoreError::Corrupt { .. })
        ));
    }
}
