//! The durable watermark file of a journal: two checksummed slots, one
//! overwritten in place per group commit (see the [journal
//! documentation](super)).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crc32c::crc32c;

use super::sync_dir;
use crate::StoreError;

/// The durable watermark of a journal: everything before byte `offset` of
/// journal file `file` (and every older file) is durable; `seq` is the
/// last record sequence there. See the [journal documentation](super).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Watermark {
    /// First journal file of the current sequence space (set by
    /// [`Journal::restart`](super::Journal::restart)); older files are
    /// leftovers of an interrupted restart.
    pub base: u64,
    /// Journal file number.
    pub file: u64,
    /// Byte offset in that file (a frame boundary).
    pub offset: u64,
    /// Last durable record sequence.
    pub seq: u64,
}

/// Name of the durable watermark file in a journal directory.
pub const WATERMARK_FILE: &str = "watermark";
pub(super) const WATERMARK_TMP: &str = "watermark.tmp";
const WM_MAGIC: [u8; 8] = *b"DMRJWMK\0";
const WM_VERSION: u32 = 1;
/// Slot `i` starts at `i * WM_STRIDE`: the two never share a block.
const WM_STRIDE: u64 = 4096;
const WM_FILE_LEN: u64 = 2 * WM_STRIDE;
/// magic 8, version 4, reserved 4, counter 8, base 8, file 8, offset 8,
/// seq 8, crc32c (of the 56 bytes before it) 4; little endian.
const WM_SLOT_LEN: usize = 60;

fn encode_slot(counter: u64, m: &Watermark) -> [u8; WM_SLOT_LEN] {
    let mut b = [0u8; WM_SLOT_LEN];
    b[0..8].copy_from_slice(&WM_MAGIC);
    b[8..12].copy_from_slice(&WM_VERSION.to_le_bytes());
    for (i, v) in [counter, m.base, m.file, m.offset, m.seq]
        .into_iter()
        .enumerate()
    {
        b[16 + i * 8..24 + i * 8].copy_from_slice(&v.to_le_bytes());
    }
    let crc = crc32c(&b[..56]);
    b[56..60].copy_from_slice(&crc.to_le_bytes());
    b
}

enum SlotError {
    Damaged(String),
    Newer(u32),
}

fn decode_slot(b: &[u8], slot: u64) -> Result<(u64, Watermark), SlotError> {
    let u64_at = |o: usize| replica_proto::le::u64_at(b, o);
    let u32_at = |o: usize| replica_proto::le::u32_at(b, o);
    if b[0..8] != WM_MAGIC {
        return Err(SlotError::Damaged("bad magic".into()));
    }
    if crc32c(&b[..56]) != u32_at(56) {
        return Err(SlotError::Damaged("checksum mismatch".into()));
    }
    let version = u32_at(8);
    if version != WM_VERSION {
        return Err(SlotError::Newer(version));
    }
    let counter = u64_at(16);
    let m = Watermark {
        base: u64_at(24),
        file: u64_at(32),
        offset: u64_at(40),
        seq: u64_at(48),
    };
    if counter % 2 != slot {
        return Err(SlotError::Damaged(format!(
            "write counter {counter} does not belong in slot {slot}"
        )));
    }
    if m.base > m.file || m.base == 0 {
        return Err(SlotError::Damaged(format!(
            "base file {} after watermark file {}",
            m.base, m.file
        )));
    }
    Ok((counter, m))
}

/// The open watermark file: the slot to write next is `(counter + 1) % 2`,
/// never the one holding the watermark in force.
pub(super) struct MarkFile {
    file: File,
    path: PathBuf,
    pub(super) counter: u64,
    pub(super) mark: Watermark,
}

impl MarkFile {
    /// The watermark in force and its write counter; `None` without a file.
    pub(super) fn load(dir: &Path) -> Result<Option<(Watermark, u64)>, StoreError> {
        let path = dir.join(WATERMARK_FILE);
        let b = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(StoreError::io("read journal watermark", &path, e)),
        };
        let unusable = "the journal cannot tell acknowledged frames from a torn tail \
                        (removing the file opens it with the older rule: a damaged \
                        tail of the newest file is cut)";
        if b.len() as u64 != WM_FILE_LEN {
            return Err(StoreError::Corrupt {
                path,
                offset: 0,
                why: format!(
                    "durable watermark file has {} bytes, not {WM_FILE_LEN}: {unusable}",
                    b.len()
                ),
            });
        }
        let mut best: Option<(u64, Watermark)> = None;
        let mut bad = Vec::new();
        for slot in 0..2u64 {
            let at = (slot * WM_STRIDE) as usize;
            match decode_slot(&b[at..at + WM_SLOT_LEN], slot) {
                Ok((c, m)) => {
                    if best.is_none_or(|(bc, _)| c > bc) {
                        best = Some((c, m));
                    }
                }
                Err(SlotError::Newer(v)) => {
                    return Err(StoreError::Invalid(format!(
                        "{}: journal watermark format {v} is newer than this version \
                         understands ({WM_VERSION})",
                        path.display()
                    )))
                }
                Err(SlotError::Damaged(why)) => bad.push(format!("slot {slot}: {why}")),
            }
        }
        match best {
            None => Err(StoreError::Corrupt {
                path,
                offset: 0,
                why: format!(
                    "durable watermark unreadable ({}): {unusable}",
                    bad.join(", ")
                ),
            }),
            Some((c, m)) => {
                if !bad.is_empty() {
                    // A write torn by a crash spoils the slot being written:
                    // the other holds the previous watermark, still true.
                    tracing::warn!(file = %path.display(), problem = %bad.join(", "), "journal: one watermark slot unreadable (torn by a crash, or damaged); using the other");
                }
                Ok(Some((m, c)))
            }
        }
    }

    pub(super) fn open(dir: &Path, mark: Watermark, counter: u64) -> Result<Self, StoreError> {
        let path = dir.join(WATERMARK_FILE);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| StoreError::io("open journal watermark", &path, e))?;
        Ok(Self {
            file,
            path,
            counter,
            mark,
        })
    }

    /// Creates the file atomically (temporary file, fsync, rename, fsync of
    /// the directory) with `mark` in both slots.
    pub(super) fn create(dir: &Path, mark: Watermark) -> Result<Self, StoreError> {
        let tmp = dir.join(WATERMARK_TMP);
        let mut b = vec![0u8; WM_FILE_LEN as usize];
        b[..WM_SLOT_LEN].copy_from_slice(&encode_slot(0, &mark));
        let s1 = WM_STRIDE as usize;
        b[s1..s1 + WM_SLOT_LEN].copy_from_slice(&encode_slot(1, &mark));
        let mut f =
            File::create(&tmp).map_err(|e| StoreError::io("create journal watermark", &tmp, e))?;
        f.write_all(&b)
            .map_err(|e| StoreError::io("write journal watermark", &tmp, e))?;
        f.sync_all()
            .map_err(|e| StoreError::io("sync journal watermark", &tmp, e))?;
        drop(f);
        let path = dir.join(WATERMARK_FILE);
        std::fs::rename(&tmp, &path)
            .map_err(|e| StoreError::io("publish journal watermark", &path, e))?;
        sync_dir(dir)?;
        Self::open(dir, mark, 1)
    }

    /// Persists `mark` (one slot write and one `fdatasync`).
    pub(super) fn write(&mut self, mark: Watermark) -> Result<(), StoreError> {
        let Some(counter) = self.counter.checked_add(1) else {
            // The write counter is used up (no journal writes that many
            // times; a file set this way does): a wrapped counter would
            // lose to the slot it should replace at the next open, so both
            // slots start again, atomically, as when the file is created.
            let dir = self.path.parent().ok_or_else(|| {
                StoreError::Invalid(format!("{}: no directory", self.path.display()))
            })?;
            *self = Self::create(dir, mark)?;
            return Ok(());
        };
        let at = (counter % 2) * WM_STRIDE;
        self.file
            .write_all_at(&encode_slot(counter, &mark), at)
            .map_err(|e| StoreError::io("write journal watermark", &self.path, e))?;
        self.file
            .sync_data()
            .map_err(|e| StoreError::io("sync journal watermark", &self.path, e))?;
        self.counter = counter;
        self.mark = mark;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use super::super::{file_name, Journal};
    use super::*;

    #[test]
    fn a_group_commit_writes_one_watermark_slot() {
        let d = tempfile::tempdir().expect("tmp");
        let (mut j, _) = Journal::open(d.path(), 1 << 20).expect("open");
        append_synced(&mut j, 1, 1);
        let before = std::fs::read(wm_path(d.path())).expect("read");
        assert_eq!(before.len() as u64, WM_FILE_LEN);
        let counter = j.mark.counter;
        append_synced(&mut j, 2, 3);
        assert_eq!(
            j.mark.counter,
            counter + 1,
            "one watermark write per group commit"
        );
        let after = std::fs::read(wm_path(d.path())).expect("read");
        let written = ((counter + 1) % 2 * WM_STRIDE) as usize;
        let kept = ((counter % 2) * WM_STRIDE) as usize;
        assert_ne!(
            before[written..written + WM_SLOT_LEN],
            after[written..written + WM_SLOT_LEN]
        );
        assert_eq!(
            before[kept..kept + WM_SLOT_LEN],
            after[kept..kept + WM_SLOT_LEN]
        );
        // Nothing new: no watermark write.
        assert_eq!(j.sync().expect("sync"), 4);
        assert_eq!(j.mark.counter, counter + 1);
        assert_eq!(std::fs::read(wm_path(d.path())).expect("read"), after);
    }

    #[test]
    fn a_damaged_watermark_is_an_error() {
        let d = tempfile::tempdir().expect("tmp");
        let (mut j, _) = Journal::open(d.path(), 1 << 20).expect("open");
        let pos = append_synced(&mut j, 1, 2);
        drop(j);
        let wm = wm_path(d.path());
        let good = std::fs::read(&wm).expect("read");
        flip(&wm, 20);
        flip(&wm, WM_STRIDE + 20);
        match Journal::open(d.path(), 1 << 20) {
            Err(StoreError::Corrupt { path, why, .. }) => {
                assert_eq!(path, wm);
                assert!(
                    why.contains("slot 0: checksum") && why.contains("slot 1: checksum"),
                    "{why}"
                );
            }
            Err(e) => panic!("wrong error: {e}"),
            Ok(_) => panic!("opened with an unreadable watermark"),
        }
        std::fs::write(&wm, &good[..100]).expect("write");
        assert!(matches!(
            Journal::open(d.path(), 1 << 20),
            Err(StoreError::Corrupt { path, .. }) if path == wm
        ));
        // Nothing was touched meanwhile.
        std::fs::write(&wm, &good).expect("write");
        let (_, scan) = Journal::open(d.path(), 1 << 20).expect("open");
        assert_eq!(scan.frames, pos);
    }

    #[test]
    fn a_torn_watermark_slot_falls_back_to_the_previous_watermark() {
        let d = tempfile::tempdir().expect("tmp");
        let (mut j, _) = Journal::open(d.path(), 1 << 20).expect("open");
        append_synced(&mut j, 1, 2);
        let pos = append_synced(&mut j, 3, 2);
        let slot = (j.mark.counter % 2) * WM_STRIDE;
        drop(j);
        // The latest slot write torn by a crash: the previous watermark
        // (after record 2) is in force, the frames after it are above it.
        flip(&wm_path(d.path()), slot + 40);
        flip(&d.path().join(file_name(1)), pos[1].offset + 1);
        let (j, scan) = Journal::open(d.path(), 1 << 20).expect("open");
        assert_eq!(scan.frames.len(), 3);
        assert_eq!(j.durable_seq(), 3);
        assert_eq!(j.watermark().offset, end(&pos[0]));
    }

    /// Found by fuzzing (tests/fuzz, target `journal`): a watermark naming
    /// the last file number made the next file's number overflow (a panic
    /// with overflow checks, file 0 without them, which the next open
    /// does not read).
    #[test]
    fn no_file_follows_the_last_file_number() {
        let d = tempfile::tempdir().expect("tmp");
        let last = Watermark {
            base: u64::MAX,
            file: u64::MAX,
            offset: 0,
            seq: 0,
        };
        let mut b = vec![0u8; WM_FILE_LEN as usize];
        b[..WM_SLOT_LEN].copy_from_slice(&encode_slot(0, &last));
        let s1 = WM_STRIDE as usize;
        b[s1..s1 + WM_SLOT_LEN].copy_from_slice(&encode_slot(1, &last));
        std::fs::write(wm_path(d.path()), &b).expect("write");
        // Small files: the second frame needs a new one.
        let (mut j, _) = Journal::open(d.path(), 1).expect("open");
        let (f, h) = frame(1, 1, 1);
        j.append(&f, &h)
            .expect("the first frame fits the current file");
        assert_eq!(j.sync().expect("sync"), 1);
        let (f, h) = frame(2, 1, 2);
        assert!(matches!(
            j.append(&f, &h),
            Err(StoreError::JournalFileNumbers { .. })
        ));
        assert!(matches!(
            j.restart(),
            Err(StoreError::JournalFileNumbers { .. })
        ));
        drop(j);
        let (j, scan) = Journal::open(d.path(), 1).expect("open again");
        assert_eq!(scan.frames.len(), 1);
        assert_eq!(scan.frames[0].file, u64::MAX);
        assert_eq!(j.durable_seq(), 1);
    }

    /// Found by fuzzing (tests/fuzz, target `journal`): a slot holding the
    /// last write counter made the next write's counter overflow (a panic
    /// with overflow checks; without them counter 0, which loses to the
    /// slot it replaces: the next open used the older watermark).
    #[test]
    fn the_write_counter_does_not_wrap() {
        let d = tempfile::tempdir().expect("tmp");
        let (mut j, _) = Journal::open(d.path(), 1 << 20).expect("open");
        let pos = append_synced(&mut j, 1, 1);
        drop(j);
        // Both slots hold the watermark after record 1, the odd one with
        // the last counter there is.
        let m = Watermark {
            base: 1,
            file: 1,
            offset: end(&pos[0]),
            seq: 1,
        };
        let mut b = std::fs::read(wm_path(d.path())).expect("read");
        b[..WM_SLOT_LEN].copy_from_slice(&encode_slot(u64::MAX - 1, &m));
        let s1 = WM_STRIDE as usize;
        b[s1..s1 + WM_SLOT_LEN].copy_from_slice(&encode_slot(u64::MAX, &m));
        std::fs::write(wm_path(d.path()), &b).expect("write");
        let (mut j, _) = Journal::open(d.path(), 1 << 20).expect("open");
        assert_eq!(j.mark.counter, u64::MAX);
        let more = append_synced(&mut j, 2, 2);
        assert_eq!(j.watermark().offset, end(&more[1]));
        // Counting starts again.
        assert_eq!(j.mark.counter, 1);
        let last = append_synced(&mut j, 4, 1);
        assert_eq!(j.mark.counter, 2);
        drop(j);
        let (j, scan) = Journal::open(d.path(), 1 << 20).expect("open again");
        assert_eq!(scan.frames.len(), 4);
        assert_eq!(j.durable_seq(), 4);
        assert_eq!(j.watermark().offset, end(&last[0]));
        assert_eq!(scan.truncated_bytes, 0);
    }

    #[test]
    fn a_newer_watermark_format_is_refused() {
        let d = tempfile::tempdir().expect("tmp");
        let (j, _) = Journal::open(d.path(), 1 << 20).expect("open");
        drop(j);
        let wm = wm_path(d.path());
        let mut b = std::fs::read(&wm).expect("read");
        b[8..12].copy_from_slice(&2u32.to_le_bytes());
        let crc = crc32c(&b[..56]);
        b[56..60].copy_from_slice(&crc.to_le_bytes());
        std::fs::write(&wm, &b).expect("write");
        assert!(matches!(
            Journal::open(d.path(), 1 << 20),
            Err(StoreError::Invalid(why)) if why.contains("format 2")
        ));
    }
}
