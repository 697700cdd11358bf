//! The source's local spool: every record drained from the capture ring,
//! in ring order, on a local disk, until the target has it durably.
//!
//! The ring is kernel memory sized for seconds of writes; the spool holds
//! outages. The drain thread appends chunks (a run of consecutive records in
//! the segment plaintext encoding) and releases ring space as soon as a chunk
//! is written; sessions read chunks from any sequence onwards; acknowledged
//! files are deleted.
//!
//! Layout: `<dir>/<first seq, 20 digits>.spool`, each a 64-byte file header
//! (magic, version, ring generation, volume tag, first sequence, CRC32C)
//! followed by chunks: a 64-byte header (magic, record count, first and last
//! sequence, first and last submission time, plaintext length, flags, the
//! start of a gap before it, CRC32C over header and plaintext) and the
//! plaintext. Sequences are consecutive across chunks and files, except
//! before a chunk flagged as starting a resync, which records where the gap
//! begins. Files are read in the order of their names, so a file whose
//! header does not start at the record its name says is damage.
//!
//! Durability: chunks are written, not synced. A spool outlives the daemon
//! (a killed daemon's writes are in the page cache), not the host: after a
//! host crash the ring has a new generation and the volume needs a resync
//! anyway. A write torn by a kill is found at start-up (short header, bad
//! CRC, broken sequence) and the spool is cut at the last whole chunk; the
//! ring still holds what follows, because ring space is released only after
//! a chunk is written.

mod format;
mod open;
mod reader;

pub use format::{ChunkHeader, CHUNK_HEADER_LEN, FILE_HEADER_LEN};
pub use reader::SpoolReader;

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;

use replica_proto::frame::{self, RecordView};

use format::*;
use open::*;

/// Spool errors.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// An I/O operation failed.
    #[error("spool: {what} {}: {source}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// On what.
        path: PathBuf,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
    /// The spool holds something it should not.
    #[error("spool {}: {message}", path.display())]
    Corrupt {
        /// File.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The spool was dropped while being read.
    #[error("spool dropped")]
    Dropped,
}

impl SpoolError {
    fn io(what: &'static str, path: &Path, source: std::io::Error) -> Self {
        Self::Io {
            what,
            path: path.to_owned(),
            source,
        }
    }

    /// Whether this is "no space left" (or quota).
    pub fn is_no_space(&self) -> bool {
        matches!(self, Self::Io { source, .. }
            if matches!(source.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT)))
    }
}

/// The oldest record the target does not have yet, as a position.
#[derive(Debug, Clone, Copy)]
struct AckCursor {
    /// First sequence not acknowledged.
    seq: u64,
    /// File and offset of the chunk holding it (or the end).
    file: u64,
    offset: u64,
    /// Logical offset of that chunk.
    logical: u64,
    /// Submission time of that chunk's first record, if there is one.
    first_ns: Option<u64>,
    /// That chunk starts a resync after a gap beginning here, and `seq`
    /// lies in the gap or at the chunk's start: the target may be anywhere
    /// from here on.
    gap_from: Option<u64>,
}

impl AckCursor {
    /// Everything is acknowledged: the next record, `seq`, is not in the
    /// spool yet (logical offset `logical`).
    fn at_end(seq: u64, logical: u64) -> Self {
        Self {
            seq,
            file: seq,
            offset: 0,
            logical,
            first_ns: None,
            gap_from: None,
        }
    }
}

struct Inner {
    files: BTreeMap<u64, FileInfo>,
    /// The file being appended to.
    writer: Option<(u64, File)>,
    /// Sequence the next appended chunk must start with.
    next_seq: u64,
    /// Logical bytes ever appended (file headers included).
    logical_end: u64,
    acked: AckCursor,
    /// Bumped by [`Spool::drop_all`]; readers of an older value stop.
    drops: u64,
}

/// What opening a spool found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Recovery {
    /// Records found, and the sequence after the last whole chunk; `None`
    /// when the spool was empty.
    pub next_seq: Option<u64>,
    /// Chunks found.
    pub chunks: u64,
    /// Bytes cut off a torn or damaged tail.
    pub truncated_bytes: u64,
    /// Damage found (the spool was cut at the first bad chunk, or a file of
    /// another ring generation or volume was removed).
    pub damage: Vec<String>,
    /// A file of another ring generation was found (and removed).
    pub other_generation: bool,
}

/// A chunk read back: its header and plaintext (records from the sequence
/// asked for).
#[derive(Debug)]
pub struct Chunk {
    /// First record's sequence (after skipping, when read from the middle).
    pub first_seq: u64,
    /// Last record's sequence.
    pub last_seq: u64,
    /// Records.
    pub count: u32,
    /// Last record's submission time.
    pub last_ns: u64,
    /// The chunk starts a resync after a gap from this sequence.
    pub gap_from: Option<u64>,
    /// Plaintext records.
    pub plain: Vec<u8>,
}

/// The spool of one volume (or group).
pub struct Spool {
    dir: PathBuf,
    generation: [u8; 16],
    volume_tag: [u8; 16],
    file_bytes: u64,
    inner: Mutex<Inner>,
    cond: Condvar,
}

impl Spool {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Sequence the next appended chunk starts with.
    pub fn next_seq(&self) -> u64 {
        self.lock().next_seq
    }

    /// Oldest sequence the spool still holds (the first not acknowledged);
    /// equal to [`Self::next_seq`] when it holds nothing.
    pub fn oldest_seq(&self) -> u64 {
        let g = self.lock();
        g.acked.gap_from.unwrap_or(g.acked.seq)
    }

    /// Bytes holding records not acknowledged yet.
    pub fn unacked_bytes(&self) -> u64 {
        let g = self.lock();
        g.logical_end.saturating_sub(g.acked.logical)
    }

    /// Submission time of the oldest chunk not acknowledged.
    pub fn oldest_unacked_ns(&self) -> Option<u64> {
        self.lock().acked.first_ns
    }

    /// Times the spool was dropped.
    pub fn drops(&self) -> u64 {
        self.lock().drops
    }

    /// Starts an empty spool at `seq` (the first record it will receive).
    /// Only valid while it holds nothing.
    pub fn restart_at(&self, seq: u64) {
        let mut g = self.lock();
        if g.files.is_empty() {
            g.next_seq = seq;
            g.acked = AckCursor::at_end(seq, g.logical_end);
        }
    }

    /// Appends a chunk of `count` consecutive records starting at
    /// `first_seq`, which must be [`Self::next_seq`] or, for the chunk that
    /// starts a resync (`gap`), any later sequence.
    pub fn append(
        &self,
        first_seq: u64,
        count: u32,
        first_ns: u64,
        last_ns: u64,
        plain: &[u8],
        gap: bool,
    ) -> Result<(), SpoolError> {
        let mut g = self.lock();
        let placed = if gap {
            (first_seq.wrapping_sub(g.next_seq) as i64) >= 0
        } else {
            first_seq == g.next_seq
        };
        if !placed || count == 0 || plain.len() > MAX_CHUNK_PLAIN as usize {
            return Err(SpoolError::Corrupt {
                path: self.dir.clone(),
                message: format!(
                    "append of {count} records at {first_seq} but the spool is at {}",
                    g.next_seq
                ),
            });
        }
        let h = ChunkHeader {
            count,
            first_seq,
            last_seq: first_seq.wrapping_add(u64::from(count) - 1),
            first_ns,
            last_ns,
            plain_len: plain.len() as u32,
            gap_from: gap.then_some(g.next_seq),
        };
        let rotate = match &g.writer {
            None => true,
            Some((key, _)) => g.files.get(key).is_none_or(|f| f.len >= self.file_bytes),
        };
        if rotate {
            g.writer = None;
            let path = self.dir.join(file_name(first_seq));
            let mut f = OpenOptions::new()
                .create(true)
                .truncate(true)
                .write(true)
                .open(&path)
                .map_err(|e| SpoolError::io("create", &path, e))?;
            let fh = FileHeader {
                generation: self.generation,
                volume_tag: self.volume_tag,
                first_seq,
            };
            if let Err(e) = f.write_all(&fh.encode()) {
                drop(f);
                let _ = std::fs::remove_file(&path);
                return Err(SpoolError::io("write", &path, e));
            }
            let base = g.logical_end;
            g.files.insert(
                first_seq,
                FileInfo {
                    path,
                    len: FILE_HEADER_LEN,
                    next_seq: first_seq,
                    base,
                },
            );
            g.logical_end += FILE_HEADER_LEN;
            g.writer = Some((first_seq, f));
        }
        let key = match &g.writer {
            Some((k, _)) => *k,
            None => unreachable_writer(),
        };
        let len = g.files.get(&key).map_or(0, |f| f.len);
        let hdr = h.encode(plain);
        let r = match &mut g.writer {
            Some((_, f)) => f.write_all(&hdr).and_then(|()| f.write_all(plain)),
            None => unreachable_writer(),
        };
        if let Err(e) = r {
            // Cut what a failed write may have left, so the file stays a
            // sequence of whole chunks.
            let path = g
                .files
                .get(&key)
                .map(|f| f.path.clone())
                .unwrap_or_default();
            if let Some((_, f)) = &mut g.writer {
                let _ = f.set_len(len);
                let _ = f.seek(SeekFrom::Start(len));
            }
            return Err(SpoolError::io("write", &path, e));
        }
        let stored = h.stored_len();
        if let Some(fi) = g.files.get_mut(&key) {
            fi.len += stored;
            fi.next_seq = h.last_seq.wrapping_add(1);
        }
        g.logical_end += stored;
        g.next_seq = h.last_seq.wrapping_add(1);
        // The first chunk after everything was acknowledged is where the
        // target's next record is.
        if g.acked.first_ns.is_none() && (first_seq.wrapping_sub(g.acked.seq) as i64) >= 0 {
            g.acked.first_ns = Some(first_ns);
            g.acked.file = key;
            g.acked.offset = len;
            g.acked.logical = g.files.get(&key).map_or(0, |f| f.base) + len;
            g.acked.gap_from = h.gap_from;
        }
        drop(g);
        self.cond.notify_all();
        Ok(())
    }

    /// Waits up to `timeout` until the spool holds `seq` (or was dropped).
    pub fn wait_for(&self, seq: u64, drops: u64, timeout: Duration) {
        let g = self.lock();
        if g.next_seq.wrapping_sub(seq) as i64 > 0 || g.drops != drops {
            return;
        }
        let _ = self
            .cond
            .wait_timeout(g, timeout)
            .unwrap_or_else(|p| p.into_inner());
    }

    /// Wakes every waiter (shutdown).
    pub fn wake(&self) {
        self.cond.notify_all();
    }

    /// The target has every record up to `durable`: deletes the files that
    /// hold only such records and moves the acknowledged position.
    pub fn acknowledge(&self, durable: u64) -> Result<(), SpoolError> {
        let seq = durable.wrapping_add(1);
        let mut g = self.lock();
        if (seq.wrapping_sub(g.acked.seq) as i64) <= 0 {
            return Ok(());
        }
        self.set_acked(&mut g, seq)
    }

    fn set_acked(&self, g: &mut Inner, seq: u64) -> Result<(), SpoolError> {
        // Whole files before `seq` go.
        let done: Vec<u64> = g
            .files
            .iter()
            .filter(|(_, f)| (seq.wrapping_sub(f.next_seq) as i64) >= 0)
            .map(|(k, _)| *k)
            .collect();
        for k in done {
            if g.writer.as_ref().is_some_and(|(w, _)| *w == k) {
                g.writer = None;
            }
            if let Some(f) = g.files.remove(&k) {
                remove(&f.path)?;
            }
        }
        // The chunk holding `seq` (or the first after it, past a gap),
        // searched from the last position.
        let Some((&key, fi)) = g
            .files
            .iter()
            .find(|(_, f)| (f.next_seq.wrapping_sub(seq) as i64) > 0)
        else {
            g.acked = AckCursor::at_end(seq, g.logical_end);
            return Ok(());
        };
        let fi = fi.clone();
        let mut off = if g.acked.file == key && g.acked.offset >= FILE_HEADER_LEN {
            g.acked.offset
        } else {
            FILE_HEADER_LEN
        };
        let f = File::open(&fi.path).map_err(|e| SpoolError::io("open", &fi.path, e))?;
        while off < fi.len {
            let (h, _) = read_chunk_header(&f, &fi.path, off)?;
            if (h.last_seq.wrapping_sub(seq) as i64) >= 0 {
                g.acked = AckCursor {
                    seq,
                    file: key,
                    offset: off,
                    logical: fi.base + off,
                    first_ns: Some(h.first_ns),
                    gap_from: h
                        .gap_from
                        .filter(|_| (h.first_seq.wrapping_sub(seq) as i64) >= 0),
                };
                return Ok(());
            }
            off += h.stored_len();
        }
        Err(SpoolError::Corrupt {
            path: fi.path.clone(),
            message: format!("record {seq} not found in the file that should hold it"),
        })
    }

    /// A reader positioned at `seq`, which must lie between
    /// [`Self::oldest_seq`] and [`Self::next_seq`] (or beyond: the reader
    /// then skips records until it reaches it).
    pub fn reader(&self, seq: u64) -> SpoolReader<'_> {
        SpoolReader {
            spool: self,
            seq,
            pos: None,
            file: None,
            drops: self.drops(),
        }
    }

    /// Every record from `seq` on, in order, for one last look (the spool
    /// is about to be dropped). Stops at damage, returning an error.
    pub fn for_each_record(
        &self,
        seq: u64,
        mut f: impl FnMut(&RecordView<'_>),
    ) -> Result<(), SpoolError> {
        let mut r = self.reader(seq);
        while let Some(c) = r.next_chunk()? {
            let recs = frame::decode_record_run(c.first_seq, c.count, &c.plain).map_err(|e| {
                SpoolError::Corrupt {
                    path: self.dir.clone(),
                    message: format!("chunk at {}: {e}", c.first_seq),
                }
            })?;
            for rv in &recs {
                f(rv);
            }
        }
        Ok(())
    }

    /// Removes every file; the spool starts again, empty, at `next_seq`.
    pub fn drop_all(&self, next_seq: u64) -> Result<(), SpoolError> {
        let mut g = self.lock();
        g.writer = None;
        let files = std::mem::take(&mut g.files);
        for f in files.values() {
            remove(&f.path)?;
        }
        g.drops += 1;
        g.next_seq = next_seq;
        g.acked = AckCursor::at_end(next_seq, g.logical_end);
        drop(g);
        let _ = replica_fs::sync_dir(&self.dir);
        self.cond.notify_all();
        Ok(())
    }
}

#[cold]
fn unreachable_writer() -> ! {
    // The writer was installed just above, under the same lock.
    std::process::abort()
}

fn remove(path: &Path) -> Result<(), SpoolError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(SpoolError::io("remove", path, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GEN: [u8; 16] = [7; 16];
    const TAG: [u8; 16] = [9; 16];

    fn records(first: u64, n: u32, fill: u8) -> Vec<u8> {
        let mut p = Vec::new();
        for i in 0..u64::from(n) {
            let data = vec![fill.wrapping_add(i as u8); 512];
            frame::encode_record_parts(
                &mut p,
                first + i,
                1,
                0,
                0,
                i,
                512,
                1000 + first + i,
                0,
                &data,
            );
        }
        p
    }

    fn open(dir: &Path) -> (Spool, Recovery) {
        Spool::open(dir, GEN, TAG, 1 << 20).expect("open")
    }

    fn fill(s: &Spool, from: u64, chunks: u64, per: u32) -> u64 {
        let mut seq = from;
        for c in 0..chunks {
            s.append(
                seq,
                per,
                1000 + seq,
                1000 + seq + u64::from(per),
                &records(seq, per, c as u8),
                false,
            )
            .expect("append");
            seq += u64::from(per);
        }
        seq
    }

    fn read_all(s: &Spool, from: u64) -> Vec<u64> {
        let mut r = s.reader(from);
        let mut seqs = Vec::new();
        while let Some(c) = r.next_chunk().expect("read") {
            for rv in frame::decode_record_run(c.first_seq, c.count, &c.plain).expect("decode") {
                seqs.push(rv.seq);
            }
        }
        seqs
    }

    #[test]
    fn chunks_read_back_in_order_from_any_sequence_across_files() {
        let d = tempfile::tempdir().expect("tmp");
        let (s, rec) = open(d.path());
        assert_eq!(rec.next_seq, None);
        s.restart_at(5);
        // 40 chunks of 100 records of 512 bytes: about 2 MiB, so several files.
        let end = fill(&s, 5, 40, 100);
        assert!(std::fs::read_dir(d.path()).expect("ls").count() >= 2);
        assert_eq!(read_all(&s, 5), (5..end).collect::<Vec<_>>());
        // From the middle of a chunk in a later file.
        assert_eq!(read_all(&s, 2345), (2345..end).collect::<Vec<_>>());
        // Reopen: the same, found by scanning.
        drop(s);
        let (s, rec) = open(d.path());
        assert_eq!(rec.next_seq, Some(end));
        assert_eq!(rec.chunks, 40);
        assert!(rec.damage.is_empty(), "{:?}", rec.damage);
        assert_eq!(read_all(&s, 1111), (1111..end).collect::<Vec<_>>());
    }

    #[test]
    fn acknowledge_deletes_whole_files_and_tracks_the_oldest_record() {
        let d = tempfile::tempdir().expect("tmp");
        let (s, _) = open(d.path());
        s.restart_at(1);
        let end = fill(&s, 1, 40, 100);
        let before = s.unacked_bytes();
        let files_before = std::fs::read_dir(d.path()).expect("ls").count();
        s.acknowledge(2550).expect("ack");
        assert_eq!(s.oldest_seq(), 2551);
        assert!(s.unacked_bytes() < before);
        assert!(std::fs::read_dir(d.path()).expect("ls").count() < files_before);
        // Chunks start at 1, 101, ...: 2551 is in the one starting at 2501.
        assert_eq!(s.oldest_unacked_ns(), Some(1000 + 2501));
        assert_eq!(read_all(&s, 2551), (2551..end).collect::<Vec<_>>());
        s.acknowledge(end - 1).expect("ack all");
        assert_eq!(s.unacked_bytes(), 0);
        assert_eq!(s.oldest_unacked_ns(), None);
        assert_eq!(std::fs::read_dir(d.path()).expect("ls").count(), 0);
        // Appending goes on in a new file.
        let end2 = fill(&s, end, 2, 10);
        assert_eq!(read_all(&s, end), (end..end2).collect::<Vec<_>>());
    }

    #[test]
    fn reader_follows_when_its_file_is_acknowledged_and_deleted() {
        let d = tempfile::tempdir().expect("tmp");
        let (s, _) = open(d.path());
        s.restart_at(1);
        let end = fill(&s, 1, 2, 10);
        let mut r = s.reader(1);
        let mut got = Vec::new();
        while let Some(c) = r.next_chunk().expect("read") {
            got.push(c.first_seq);
        }
        s.acknowledge(end - 1).expect("ack all: the file goes");
        assert!(r.next_chunk().expect("nothing yet").is_none());
        let end2 = fill(&s, end, 1, 10);
        let c = r.next_chunk().expect("read").expect("the new chunk");
        assert_eq!((c.first_seq, c.last_seq), (end, end2 - 1));
        assert_eq!(got, vec![1, 11]);
    }

    #[test]
    fn torn_tail_is_cut_at_the_last_whole_chunk() {
        let d = tempfile::tempdir().expect("tmp");
        let (s, _) = open(d.path());
        s.restart_at(1);
        let end = fill(&s, 1, 5, 10);
        drop(s);
        let path = d.path().join(file_name(1));
        let len = std::fs::metadata(&path).expect("stat").len();
        for cut in [len - 1, len - 300, len - 600] {
            let f = OpenOptions::new().write(true).open(&path).expect("open");
            f.set_len(cut).expect("cut");
            drop(f);
            let (s, rec) = open(d.path());
            assert_eq!(rec.next_seq, Some(end - 10), "cut at {cut}");
            assert!(rec.truncated_bytes > 0);
            assert_eq!(read_all(&s, 1), (1..end - 10).collect::<Vec<_>>());
            // Appending resumes where the whole chunks end.
            let e2 = fill(&s, end - 10, 1, 10);
            assert_eq!(e2, end);
            drop(s);
        }
    }

    #[test]
    fn flipped_byte_cuts_the_spool_there_and_drops_later_files() {
        let d = tempfile::tempdir().expect("tmp");
        let (s, _) = open(d.path());
        s.restart_at(1);
        let end = fill(&s, 1, 40, 100);
        drop(s);
        let mut names: Vec<_> = std::fs::read_dir(d.path())
            .expect("ls")
            .map(|e| e.expect("ent").path())
            .collect();
        names.sort();
        assert!(names.len() >= 2);
        // A byte inside the second chunk of the first file.
        let mut b = std::fs::read(&names[0]).expect("read");
        let off = (FILE_HEADER_LEN + CHUNK_HEADER_LEN * 2 + records(1, 100, 0).len() as u64 + 77)
            as usize;
        b[off] ^= 0x40;
        std::fs::write(&names[0], &b).expect("write");
        let (s, rec) = open(d.path());
        assert_eq!(rec.next_seq, Some(101), "{rec:?}");
        assert!(!rec.damage.is_empty());
        assert_eq!(read_all(&s, 1), (1..101).collect::<Vec<_>>());
        assert!(!names[1].exists(), "later files are removed");
        assert!(end > 101);
    }

    /// Found by fuzzing (tests/fuzz, target `spool`): a file whose name
    /// is not its first record was taken where the previous file ended;
    /// once the next file was started (named by its own first record) the
    /// following open read the files in name order, found the new one out
    /// of sequence and cut it and every file after it: records not yet
    /// acknowledged were lost.
    #[test]
    fn a_file_named_for_another_record_is_damage_and_later_opens_stay_clean() {
        let d = tempfile::tempdir().expect("tmp");
        let (s, _) = open(d.path());
        s.restart_at(1);
        let end = fill(&s, 1, 1, 10);
        drop(s);
        // Records 11..=12 in a file named for record 99.
        let other = tempfile::tempdir().expect("tmp");
        let (s, _) = open(other.path());
        s.restart_at(end);
        fill(&s, end, 1, 2);
        drop(s);
        let misnamed = d.path().join(file_name(99));
        std::fs::copy(other.path().join(file_name(end)), &misnamed).expect("copy");

        let (s, rec) = open(d.path());
        assert_eq!(rec.next_seq, Some(end), "{rec:?}");
        assert_eq!(rec.damage.len(), 1, "{:?}", rec.damage);
        assert!(rec.damage[0].contains("its name at 99"), "{:?}", rec.damage);
        assert!(!misnamed.exists());
        let end2 = fill(&s, end, 1, 2);
        drop(s);
        let (s, rec) = open(d.path());
        assert!(rec.damage.is_empty(), "{:?}", rec.damage);
        assert_eq!(rec.next_seq, Some(end2));
        assert_eq!(read_all(&s, 1), (1..end2).collect::<Vec<_>>());
    }

    #[test]
    fn files_of_another_generation_are_removed_and_reported() {
        let d = tempfile::tempdir().expect("tmp");
        let (s, _) = open(d.path());
        s.restart_at(1);
        fill(&s, 1, 3, 10);
        drop(s);
        let (s, rec) = Spool::open(d.path(), [8; 16], TAG, 1 << 20).expect("open");
        assert!(rec.other_generation);
        assert_eq!(rec.next_seq, None);
        assert_eq!(s.unacked_bytes(), 0);
        assert_eq!(std::fs::read_dir(d.path()).expect("ls").count(), 0);
    }

    #[test]
    fn out_of_order_append_is_refused_and_changes_nothing() {
        let d = tempfile::tempdir().expect("tmp");
        let (s, _) = open(d.path());
        s.restart_at(1);
        fill(&s, 1, 1, 10);
        assert!(s.append(12, 1, 0, 0, &records(12, 1, 0), false).is_err());
        assert_eq!(s.next_seq(), 11);
        assert_eq!(read_all(&s, 1), (1..11).collect::<Vec<_>>());
    }

    #[test]
    fn a_resync_gap_is_kept_across_reopen_and_the_target_may_be_anywhere_in_it() {
        let d = tempfile::tempdir().expect("tmp");
        let (s, _) = open(d.path());
        s.restart_at(1);
        let g = fill(&s, 1, 3, 10); // 1..=30
                                    // Records 31..=99 were tracked as regions; the resync starts at 100.
        s.append(100, 5, 5000, 5005, &records(100, 5, 1), true)
            .expect("gap chunk");
        assert!(s.append(200, 1, 0, 0, &records(200, 1, 0), false).is_err());
        let end = fill(&s, 105, 2, 10);
        let mut want: Vec<u64> = (1..g).collect();
        want.extend(100..end);
        assert_eq!(read_all(&s, 1), want);
        // A target that has everything before the gap resumes anywhere in it.
        s.acknowledge(g - 1).expect("ack");
        assert_eq!(s.oldest_seq(), g);
        s.acknowledge(60).expect("ack inside the gap");
        assert_eq!(s.oldest_seq(), g, "the gap still starts at {g}");
        let mut r = s.reader(61);
        let c = r.next_chunk().expect("read").expect("gap chunk");
        assert_eq!((c.first_seq, c.gap_from), (100, Some(g)));
        drop(s);
        let (s, rec) = open(d.path());
        assert!(rec.damage.is_empty(), "{:?}", rec.damage);
        assert_eq!(rec.next_seq, Some(end));
        // Acknowledgements are not persisted: the file still holds 1..
        assert_eq!(s.oldest_seq(), 1);
        s.acknowledge(60).expect("ack inside the gap");
        assert_eq!(s.oldest_seq(), g);
        assert_eq!(read_all(&s, g), (100..end).collect::<Vec<_>>());
        s.acknowledge(102).expect("ack past the gap");
        assert_eq!(s.oldest_seq(), 103);
    }

    #[test]
    fn drop_all_empties_the_spool_and_stops_readers() {
        let d = tempfile::tempdir().expect("tmp");
        let (s, _) = open(d.path());
        s.restart_at(1);
        fill(&s, 1, 4, 10);
        let mut r = s.reader(1);
        assert!(r.next_chunk().expect("read").is_some());
        s.drop_all(41).expect("drop");
        assert!(matches!(r.next_chunk(), Err(SpoolError::Dropped)));
        assert_eq!(s.next_seq(), 41);
        assert_eq!(s.oldest_seq(), 41);
        assert_eq!(s.unacked_bytes(), 0);
        assert_eq!(std::fs::read_dir(d.path()).expect("ls").count(), 0);
    }
}
