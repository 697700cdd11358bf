//! The target's segment journal: still-encrypted segments appended in
//! arrival order to numbered files, fsynced before they are acknowledged.
//!
//! Frames are stored exactly as they arrived; each carries its own magic,
//! lengths and checksums, so a scan at start-up finds every whole frame.
//!
//! # What may be cut, what is an error
//!
//! Writes issued after the last fsync reach the disk in no fixed order: a
//! crash can leave a hole with whole frames after it, so a valid frame
//! following damage proves nothing about whether the damaged frame was
//! acknowledged. The journal therefore records, at every group commit
//! ([`Journal::sync`]) and after the data fsync, a durable **watermark**:
//! the journal file and byte offset up to which everything is durable (and
//! so may have been acknowledged), and the last record sequence there. At
//! [`Journal::open`]:
//!
//! * damage (a bad frame, or a file shorter than the watermark) **below**
//!   the watermark (before its offset in the file it names, or anywhere in
//!   an older file) is an error, [`StoreError::Corrupt`] naming the file,
//!   the offset and the acknowledged sequence: acknowledged records would
//!   be lost, nothing is cut;
//! * damage **above** it (appended, never acknowledged) is a torn tail: the
//!   newest file is cut at the first bad frame, whatever follows;
//! * every file but the newest was fsynced whole before the next one was
//!   started, so damage in one is an error wherever it is.
//!
//! The watermark lives in the [`WATERMARK_FILE`] of the journal directory:
//! two fixed 60-byte slots at offsets 0 and 4096, each versioned and
//! checksummed (CRC-32C) with a write counter; a commit overwrites the
//! older slot in place and `fdatasync`s it, so a write torn by a crash only
//! ever spoils the slot being written and the other one still holds the
//! previous (lower, still true) watermark. A group commit costs two
//! fsyncs: the journal data, then the watermark slot (the file never
//! changes size, so the second one flushes one block and no metadata).
//! A sync with nothing new appended writes no watermark.
//!
//! A journal written by an older version has no watermark file: nothing
//! says what it acknowledged, so it is opened with the older rule (as if
//! the watermark stood at the start of the newest file: a damaged tail of
//! the newest file is cut), with a warning, and a watermark is written at
//! once; from then on the rule above holds. A watermark file with neither
//! slot readable is an error (it is never silently ignored); an operator
//! who removes it gets that older rule for one open.

mod scan;
#[cfg(test)]
mod testing;
mod watermark;

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use replica_proto::frame::SegmentHeader;

use crate::StoreError;
use replica_fs::sync_dir;
use scan::{check_below_mark, file_name, list_files, scan_file};
use watermark::{MarkFile, WATERMARK_TMP};

pub use scan::{frames, read_frame, FramePos, Scan};
pub use watermark::{Watermark, WATERMARK_FILE};

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
    mark: MarkFile,
}

impl Journal {
    /// Opens (creating if needed) the journal in `dir`: scans every file,
    /// checks what lies below the durable watermark and truncates a torn
    /// tail above it (see the [module documentation](self)).
    ///
    /// [`StoreError::Corrupt`] means durable (possibly acknowledged) frames
    /// are damaged or missing, or the watermark is unreadable; nothing is
    /// modified on disk then. [`StoreError::Invalid`]: a watermark of a
    /// newer format. Costs, besides the scan as before: reading the
    /// watermark; when whole frames lie above it (appended but not synced
    /// before a stop or crash), one fsync of the newest file and one
    /// watermark write to make them durable.
    pub fn open(dir: &Path, max_file_bytes: u64) -> Result<(Self, Scan), StoreError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| StoreError::io("create journal directory", dir, e))?;
        let loaded = MarkFile::load(dir)?;
        let mark = loaded.map(|(m, _)| m);
        let mut files = list_files(dir)?;
        // Files older than the sequence space: an interrupted restart's.
        let stale: Vec<u64> = match mark {
            Some(m) => files.iter().copied().filter(|&no| no < m.base).collect(),
            None => Vec::new(),
        };
        files.retain(|no| !stale.contains(no));
        let mut scan = Scan::default();
        let newest = files.last().copied();
        let mut torn = None;
        for &no in &files {
            let path = dir.join(file_name(no));
            let first = scan.frames.len();
            let (good, len) = scan_file(&path, no, &mut scan.frames)?;
            if let Some(m) = mark.filter(|m| m.file == no) {
                check_below_mark(&path, &m, &scan.frames[first..], good, len)?;
            }
            if good < len {
                if Some(no) != newest {
                    return Err(StoreError::Corrupt {
                        path,
                        offset: good,
                        why: "damaged frame in the middle of the journal (a file that was \
                              fsynced whole before the next one was started)"
                            .into(),
                    });
                }
                if let Some(m) = mark.filter(|m| no < m.file) {
                    return Err(StoreError::Corrupt {
                        path,
                        offset: good,
                        why: format!(
                            "damaged frame below the durable watermark (which names the \
                             later file {}, record {}): acknowledged records would be lost",
                            m.file, m.seq
                        ),
                    });
                }
                torn = Some((path, good, len));
            }
        }
        if let Some(m) = mark {
            if m.offset > 0 && !files.contains(&m.file) {
                return Err(StoreError::Corrupt {
                    path: dir.join(file_name(m.file)),
                    offset: m.offset,
                    why: format!(
                        "the journal file named by the durable watermark is missing \
                         (durable up to byte {} of it, record {}): acknowledged records \
                         are lost",
                        m.offset, m.seq
                    ),
                });
            }
        }
        // Checked: from here on, only repairs.
        for &no in &stale {
            let p = dir.join(file_name(no));
            tracing::warn!(file = %p.display(), "journal: removing a file left over from an interrupted restart");
            match std::fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(StoreError::io("remove journal file", &p, e)),
            }
        }
        match std::fs::remove_file(dir.join(WATERMARK_TMP)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(StoreError::io(
                    "remove journal file",
                    &dir.join(WATERMARK_TMP),
                    e,
                ))
            }
        }
        if let Some((path, good, len)) = torn {
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
        let current_no = newest.unwrap_or(1).max(mark.map_or(1, |m| m.file));
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
        let created = !files.contains(&current_no);
        let durable_seq = scan
            .frames
            .iter()
            .map(|f| f.header.last_seq)
            .max()
            .unwrap_or(0);
        let now = |base| Watermark {
            base,
            file: current_no,
            offset: current_len,
            seq: durable_seq,
        };
        let mark = match loaded {
            Some((m, counter)) => {
                if created || !stale.is_empty() {
                    sync_dir(dir)?;
                }
                let mut mf = MarkFile::open(dir, m, counter)?;
                if (m.file, m.offset) != (current_no, current_len) {
                    // Whole frames above the watermark survived a stop or a
                    // crash: make them durable, then move the watermark.
                    current
                        .sync_data()
                        .map_err(|e| StoreError::io("sync journal", &path, e))?;
                    mf.write(now(m.base))?;
                }
                mf
            }
            None => {
                if !files.is_empty() {
                    tracing::warn!(dir = %dir.display(), "journal: no durable watermark (written by an older version): a damaged tail of the newest file was cut as torn; writing one now");
                    current
                        .sync_data()
                        .map_err(|e| StoreError::io("sync journal", &path, e))?;
                }
                // Renamed into place and the directory fsynced: also makes
                // a newly created journal file durable.
                MarkFile::create(dir, now(files.first().copied().unwrap_or(current_no)))?
            }
        };
        let mut file_max = std::collections::BTreeMap::new();
        for no in files.iter().copied().chain([current_no]) {
            file_max.insert(no, 0);
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
            mark,
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

    /// The durable watermark in force.
    pub fn watermark(&self) -> Watermark {
        self.mark.mark
    }

    /// Appends a checked frame (not yet durable: call [`Self::sync`]). On
    /// failure (e.g. a full disk) the file is cut back so no partial frame
    /// remains. Record sequences must increase from frame to frame (within
    /// a sequence space, see [`Self::restart`]).
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

    /// The group commit: makes every appended frame durable (`fdatasync`
    /// of the journal file), then moves the durable watermark over them
    /// (one slot write and `fdatasync` of the watermark file; skipped when
    /// nothing was appended). Returns the last durable record sequence:
    /// only what it covers may be acknowledged. On error nothing new may be
    /// acknowledged.
    pub fn sync(&mut self) -> Result<u64, StoreError> {
        let path = self.dir.join(file_name(self.current_no));
        if let Err(e) = self.current.sync_data() {
            return Err(StoreError::io("sync journal", &path, e));
        }
        let seq = self.durable_seq.max(self.pending_seq);
        let m = self.mark.mark;
        if (m.file, m.offset) != (self.current_no, self.current_len) {
            self.mark.write(Watermark {
                base: m.base,
                file: self.current_no,
                offset: self.current_len,
                seq,
            })?;
        }
        self.durable_seq = seq;
        Ok(self.durable_seq)
    }

    /// The number of the file after the current one. A watermark can name
    /// any file number; after the last one there is none (and a wrapped
    /// number would name file 0, which is not a journal file).
    fn next_file_no(&self) -> Result<u64, StoreError> {
        self.current_no
            .checked_add(1)
            .ok_or_else(|| StoreError::JournalFileNumbers {
                dir: self.dir.clone(),
                file: self.current_no,
            })
    }

    /// Starts the next file; the old one is fsynced whole first (so damage
    /// in any file but the newest is an error wherever it is). The
    /// watermark keeps naming the old file until the next [`Self::sync`].
    fn rotate(&mut self) -> Result<(), StoreError> {
        let old = self.dir.join(file_name(self.current_no));
        let no = self.next_file_no()?;
        self.current
            .sync_all()
            .map_err(|e| StoreError::io("sync journal", &old, e))?;
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
    /// may start a new sequence space (a new ring generation). The new
    /// file is created and made durable, the watermark moved to its start
    /// (it becomes the base of the sequence space: a crash before the old
    /// files are gone leaves them to be removed at the next open), then the
    /// old files are removed.
    pub fn restart(&mut self) -> Result<(), StoreError> {
        let no = self.next_file_no()?;
        let path = self.dir.join(file_name(no));
        let fresh = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| StoreError::io("create journal file", &path, e))?;
        let moved = sync_dir(&self.dir)
            .map_err(StoreError::from)
            .and_then(|()| {
                self.mark.write(Watermark {
                    base: no,
                    file: no,
                    offset: 0,
                    seq: 0,
                })
            });
        if let Err(e) = moved {
            // Still the old sequence space: leave no newer empty file.
            let _ = std::fs::remove_file(&path);
            return Err(e);
        }
        self.current = fresh;
        self.current_no = no;
        self.current_len = 0;
        self.durable_seq = 0;
        self.pending_seq = 0;
        self.file_max = [(no, 0)].into_iter().collect();
        for old in list_files(&self.dir)? {
            if old >= no {
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
        Ok(())
    }

    /// Deletes journal files all of whose frames end at or before
    /// `applied_seq` (the current file, and the file the watermark names,
    /// are kept).
    pub fn trim(&mut self, applied_seq: u64) -> Result<usize, StoreError> {
        let mut removed = 0;
        let keep = self.current_no.min(self.mark.mark.file);
        let done: Vec<u64> = self
            .file_max
            .iter()
            .filter(|(no, max)| **no < keep && **max <= applied_seq)
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
    use replica_proto::frame::HEADER_LEN;

    use super::testing::*;
    use super::*;

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

    #[test]
    fn acknowledged_damage_in_the_newest_file_is_an_error() {
        let d = tempfile::tempdir().expect("tmp");
        let (mut j, _) = Journal::open(d.path(), 1 << 20).expect("open");
        let pos = append_synced(&mut j, 1, 4);
        drop(j);
        // Frame 2 of 4, all acknowledged: frames 3 and 4 follow it.
        let newest = d.path().join(file_name(1));
        flip(&newest, pos[1].offset + HEADER_LEN as u64 + 2);
        match Journal::open(d.path(), 1 << 20) {
            Err(StoreError::Corrupt { path, offset, why }) => {
                assert_eq!(path, newest);
                assert_eq!(offset, pos[1].offset);
                assert!(
                    why.contains("record 4"),
                    "names the durable sequence: {why}"
                );
            }
            Err(e) => panic!("wrong error: {e}"),
            Ok((_, scan)) => panic!(
                "acknowledged frames were cut as a torn tail: {} frame(s) kept, {} bytes cut",
                scan.frames.len(),
                scan.truncated_bytes
            ),
        }
        // Nothing was cut: the evidence stays for the operator.
        let len = std::fs::metadata(&newest).expect("stat").len();
        assert_eq!(len, pos[3].offset + pos[3].header.frame_len() as u64);
    }

    #[test]
    fn unsynced_damage_above_the_watermark_is_a_torn_tail() {
        let d = tempfile::tempdir().expect("tmp");
        let (mut j, _) = Journal::open(d.path(), 1 << 20).expect("open");
        append_synced(&mut j, 1, 2);
        let pos = append_only(&mut j, 3, 2);
        drop(j);
        // The first unsynced frame is damaged, the one after it is whole:
        // neither was acknowledged, both go.
        let newest = d.path().join(file_name(1));
        flip(&newest, pos[0].offset + HEADER_LEN as u64 + 2);
        let (j, scan) = Journal::open(d.path(), 1 << 20).expect("reopen");
        assert_eq!(scan.frames.len(), 2);
        assert_eq!(
            scan.truncated_bytes,
            (pos[0].header.frame_len() + pos[1].header.frame_len()) as u64
        );
        assert_eq!(j.durable_seq(), 2);
    }

    #[test]
    fn truncation_inside_the_synced_area_is_an_error() {
        for cut_inside_a_frame in [true, false] {
            let d = tempfile::tempdir().expect("tmp");
            let (mut j, _) = Journal::open(d.path(), 1 << 20).expect("open");
            let pos = append_synced(&mut j, 1, 3);
            drop(j);
            let newest = d.path().join(file_name(1));
            let at = if cut_inside_a_frame {
                pos[1].offset + 10
            } else {
                end(&pos[1])
            };
            let f = OpenOptions::new().write(true).open(&newest).expect("open");
            f.set_len(at).expect("truncate");
            drop(f);
            match Journal::open(d.path(), 1 << 20) {
                Err(StoreError::Corrupt { path, offset, why }) => {
                    assert_eq!(path, newest);
                    let good = if cut_inside_a_frame {
                        pos[1].offset
                    } else {
                        at
                    };
                    assert_eq!(offset, good);
                    assert!(why.contains(&format!("ends at byte {at}")), "{why}");
                    assert!(why.contains("record 3"), "{why}");
                }
                Err(e) => panic!("wrong error: {e}"),
                Ok((_, scan)) => panic!("opened with {} frame(s)", scan.frames.len()),
            }
            assert_eq!(std::fs::metadata(&newest).expect("stat").len(), at);
        }
    }

    #[test]
    fn whole_frames_above_the_watermark_become_durable_at_open() {
        let d = tempfile::tempdir().expect("tmp");
        let (mut j, _) = Journal::open(d.path(), 1 << 20).expect("open");
        append_synced(&mut j, 1, 1);
        let pos = append_only(&mut j, 2, 2);
        assert_eq!(j.watermark().seq, 1);
        drop(j);
        let (j, scan) = Journal::open(d.path(), 1 << 20).expect("reopen");
        assert_eq!((scan.frames.len(), scan.truncated_bytes), (3, 0));
        assert_eq!(j.durable_seq(), 3);
        let m = j.watermark();
        assert_eq!((m.file, m.offset, m.seq), (1, end(&pos[1]), 3));
        drop(j);
        // Reported durable at that open, so now they are protected.
        flip(&d.path().join(file_name(1)), pos[0].offset + 5);
        assert!(matches!(
            Journal::open(d.path(), 1 << 20),
            Err(StoreError::Corrupt { offset, .. }) if offset == pos[0].offset
        ));
    }

    #[test]
    fn rotation_moves_the_watermark_to_the_newest_file() {
        let d = tempfile::tempdir().expect("tmp");
        let (mut j, _) = Journal::open(d.path(), 400).expect("open");
        let synced = append_synced(&mut j, 1, 3);
        assert!(synced[2].file > synced[0].file, "must rotate: {synced:?}");
        let m = j.watermark();
        assert_eq!(
            (m.file, m.offset, m.seq),
            (synced[2].file, end(&synced[2]), 3)
        );
        // Appended after the sync, into the next file too.
        let more = append_only(&mut j, 4, 3);
        let newest = more[2].file;
        assert!(newest > m.file, "must rotate again: {more:?}");
        drop(j);
        // All of the newest file is above the watermark (which names an
        // older file): damage anywhere in it is a torn tail.
        let first_in_newest = more.iter().find(|p| p.file == newest).expect("frame");
        flip(
            &d.path().join(file_name(newest)),
            first_in_newest.offset + 1,
        );
        let (mut j, scan) = Journal::open(d.path(), 400).expect("reopen");
        let kept = more.iter().filter(|p| p.file < newest).count();
        assert_eq!(scan.frames.len(), 3 + kept);
        assert!(scan.truncated_bytes > 0);
        let m = j.watermark();
        assert_eq!((m.file, m.offset), (newest, 0));
        // Synced in the newest file: damage there is an error now.
        let again = append_synced(&mut j, 4 + kept as u64, 2);
        drop(j);
        let p = again.last().expect("frame");
        flip(&d.path().join(file_name(p.file)), p.offset + 1);
        assert!(matches!(
            Journal::open(d.path(), 400),
            Err(StoreError::Corrupt { offset, .. }) if offset == p.offset
        ));
    }

    #[test]
    fn trim_keeps_the_file_the_watermark_names() {
        let d = tempfile::tempdir().expect("tmp");
        let (mut j, _) = Journal::open(d.path(), 400).expect("open");
        let a = append_synced(&mut j, 1, 2);
        let b = append_only(&mut j, 3, 1);
        assert!(b[0].file > a[1].file, "must rotate");
        assert_eq!(j.watermark().file, a[1].file);
        // Applied, but the watermark still names it: kept until the sync.
        assert_eq!(j.trim(2).expect("trim"), 0);
        assert!(d.path().join(file_name(a[1].file)).exists());
        assert_eq!(j.sync().expect("sync"), 3);
        assert_eq!(j.trim(2).expect("trim"), 1);
        assert!(!d.path().join(file_name(a[1].file)).exists());
        drop(j);
        let (j, scan) = Journal::open(d.path(), 400).expect("reopen");
        assert_eq!(scan.frames, b);
        assert_eq!(j.durable_seq(), 3);
    }

    #[test]
    fn restart_starts_a_new_sequence_space() {
        let d = tempfile::tempdir().expect("tmp");
        let (mut j, _) = Journal::open(d.path(), 1 << 20).expect("open");
        append_synced(&mut j, 100, 3);
        let old = std::fs::read(d.path().join(file_name(1))).expect("read");
        j.restart().expect("restart");
        assert_eq!(j.durable_seq(), 0);
        assert_eq!(
            j.watermark(),
            Watermark {
                base: 2,
                file: 2,
                offset: 0,
                seq: 0
            }
        );
        assert_eq!(list_files(d.path()).expect("list"), vec![2]);
        let pos = append_synced(&mut j, 1, 2);
        drop(j);
        // A crash after the watermark moved but before the old files were
        // removed: they are left-overs, not frames of this sequence space.
        std::fs::write(d.path().join(file_name(1)), &old).expect("write");
        let (j, scan) = Journal::open(d.path(), 1 << 20).expect("reopen");
        assert_eq!(scan.frames, pos);
        assert_eq!(j.durable_seq(), 2);
        assert_eq!(list_files(d.path()).expect("list"), vec![2]);
        drop(j);
        flip(&d.path().join(file_name(2)), pos[0].offset + 1);
        assert!(matches!(
            Journal::open(d.path(), 1 << 20),
            Err(StoreError::Corrupt { offset: 0, .. })
        ));
    }

    #[test]
    fn a_journal_without_a_watermark_gets_the_older_rule_once() {
        let d = tempfile::tempdir().expect("tmp");
        let (mut j, _) = Journal::open(d.path(), 1 << 20).expect("open");
        let pos = append_synced(&mut j, 1, 4);
        drop(j);
        // As an older version left it: no watermark.
        std::fs::remove_file(wm_path(d.path())).expect("rm");
        let newest = d.path().join(file_name(1));
        flip(&newest, pos[1].offset + 1);
        let (j, scan) = Journal::open(d.path(), 1 << 20).expect("open without a watermark");
        assert_eq!(scan.frames, pos[..1]);
        assert_eq!(scan.truncated_bytes, end(&pos[3]) - pos[1].offset);
        let m = j.watermark();
        assert_eq!((m.base, m.file, m.offset, m.seq), (1, 1, end(&pos[0]), 1));
        assert!(wm_path(d.path()).exists());
        drop(j);
        // From now on the watermark holds.
        let (mut j, _) = Journal::open(d.path(), 1 << 20).expect("reopen");
        let more = append_synced(&mut j, 2, 2);
        drop(j);
        flip(&newest, more[0].offset + 1);
        assert!(matches!(
            Journal::open(d.path(), 1 << 20),
            Err(StoreError::Corrupt { offset, .. }) if offset == more[0].offset
        ));
    }

    #[test]
    fn a_watermark_that_does_not_match_the_frames_is_an_error() {
        let d = tempfile::tempdir().expect("tmp");
        let (mut j, _) = Journal::open(d.path(), 1 << 20).expect("open");
        let pos = append_synced(&mut j, 1, 2);
        let m = j.watermark();
        // Not on a frame boundary.
        j.mark
            .write(Watermark {
                offset: m.offset - 1,
                ..m
            })
            .expect("write");
        drop(j);
        assert!(matches!(
            Journal::open(d.path(), 1 << 20),
            Err(StoreError::Corrupt { why, .. }) if why.contains("frame boundary")
        ));
        // Another sequence than the frame ending there.
        let (_, counter) = MarkFile::load(d.path()).expect("load").expect("some");
        let mut mf = MarkFile::open(d.path(), m, counter).expect("open");
        mf.write(Watermark { seq: 7, ..m }).expect("write");
        assert!(matches!(
            Journal::open(d.path(), 1 << 20),
            Err(StoreError::Corrupt { offset, why, .. })
                if offset == pos[1].offset && why.contains("the watermark says 7")
        ));
        // The journal file it names is gone.
        mf.write(m).expect("write");
        std::fs::remove_file(d.path().join(file_name(1))).expect("rm");
        assert!(matches!(
            Journal::open(d.path(), 1 << 20),
            Err(StoreError::Corrupt { why, .. }) if why.contains("missing")
        ));
    }

    #[test]
    fn the_newest_file_is_below_a_watermark_naming_a_later_one() {
        let d = tempfile::tempdir().expect("tmp");
        let (mut j, _) = Journal::open(d.path(), 1 << 20).expect("open");
        let pos = append_synced(&mut j, 1, 3);
        // Everything in file 1 is durable; the watermark names file 2 (as
        // after a sync there), which is then lost.
        j.mark
            .write(Watermark {
                base: 1,
                file: 2,
                offset: 0,
                seq: 3,
            })
            .expect("write");
        drop(j);
        let first = d.path().join(file_name(1));
        flip(&first, pos[1].offset + 1);
        match Journal::open(d.path(), 1 << 20) {
            Err(StoreError::Corrupt { path, offset, why }) => {
                assert_eq!((path, offset), (first.clone(), pos[1].offset));
                assert!(why.contains("later file 2"), "{why}");
            }
            Err(e) => panic!("wrong error: {e}"),
            Ok(_) => panic!("durable frames were cut"),
        }
        assert_eq!(std::fs::metadata(&first).expect("stat").len(), end(&pos[2]));
        // Undamaged, it opens; the missing file is created (it held nothing).
        flip(&first, pos[1].offset + 1);
        let (j, scan) = Journal::open(d.path(), 1 << 20).expect("open");
        assert_eq!((scan.frames, j.durable_seq()), (pos, 3));
        assert!(d.path().join(file_name(2)).exists());
    }

    mod prop {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(48))]

            /// Groups of frames appended and (but for maybe the last group)
            /// synced, then one byte flipped or the newest file cut short
            /// somewhere: reopening fails exactly when durable bytes are
            /// hit, and otherwise keeps every synced frame.
            #[test]
            fn damage_is_an_error_exactly_below_the_watermark(
                groups in proptest::collection::vec(1u64..4, 1..5),
                last_synced in any::<bool>(),
                pick in any::<proptest::sample::Index>(),
                truncate in any::<bool>(),
            ) {
                let d = tempfile::tempdir().expect("tmp");
                let (mut j, _) = Journal::open(d.path(), 600).expect("open");
                let mut next = 1;
                let mut all = Vec::new();
                let mut synced_seq = 0;
                for (i, &n) in groups.iter().enumerate() {
                    all.extend(append_only(&mut j, next, n));
                    next += n;
                    if i + 1 < groups.len() || last_synced {
                        synced_seq = j.sync().expect("sync");
                    }
                }
                let mark = j.watermark();
                drop(j);
                let files = list_files(d.path()).expect("list");
                let newest = *files.last().expect("a file");
                let (file, at) = if truncate {
                    let len = std::fs::metadata(d.path().join(file_name(newest))).expect("stat").len();
                    (newest, pick.index(len as usize + 1) as u64)
                } else {
                    let total: u64 = all.iter().map(|p| p.header.frame_len() as u64).sum();
                    let mut k = pick.index(total as usize) as u64;
                    let p = all.iter().find(|p| {
                        let n = p.header.frame_len() as u64;
                        if k < n { true } else { k -= n; false }
                    }).expect("frame");
                    (p.file, p.offset + k)
                };
                let path = d.path().join(file_name(file));
                if truncate {
                    OpenOptions::new().write(true).open(&path).expect("open").set_len(at).expect("cut");
                } else {
                    flip(&path, at);
                }
                let below = (file, at) < (mark.file, mark.offset);
                let expect_err = below || (!truncate && file < newest);
                match Journal::open(d.path(), 600) {
                    Err(StoreError::Corrupt { .. }) => prop_assert!(expect_err, "error above the watermark"),
                    Err(e) => prop_assert!(false, "unexpected error {e}"),
                    Ok((j, scan)) => {
                        prop_assert!(!expect_err, "damage at {file}:{at} below {mark:?} was cut");
                        prop_assert!(j.durable_seq() >= synced_seq);
                        for p in all.iter().filter(|p| p.header.last_seq <= synced_seq) {
                            prop_assert!(scan.frames.contains(p), "synced frame {p:?} lost");
                        }
                    }
                }
            }
        }
    }
}
