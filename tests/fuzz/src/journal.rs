//! `journal`: the target's segment journal opened from arbitrary files
//! (`replica_store::journal`: the start-up scan of the journal files, the
//! durable watermark's two slots, the checks of one against the other).
//!
//! The input is a control byte, the watermark file (as two 60-byte slots
//! placed where the journal writes them, or as raw bytes, or absent) and
//! up to four journal files (a number and the bytes), their checksums made
//! to match if the control byte says so (the checks behind them then see
//! the content). [`Journal::open`]
//! then either fails with [`StoreError::Corrupt`] or
//! [`StoreError::Invalid`] having changed nothing on disk (as documented),
//! or opens a journal that is consistent:
//!
//! * the frames it found are what the read-only listing ([`frames`]) finds
//!   and each one reads back ([`read_frame`]);
//! * its durable sequence is the highest record sequence found;
//! * frames appended and synced after it are found by the next open, with
//!   the frames before them unchanged and nothing more to cut;
//! * it can be trimmed and restarted (a new sequence space), and the
//!   restarted journal opens with only what was appended after.

use std::collections::BTreeMap;
use std::path::Path;

use replica_proto::frame::{self, SegmentHeader, HEADER_LEN};
use replica_store::journal::{frames, read_frame, FramePos, Journal, WATERMARK_FILE};
use replica_store::StoreError;

use crate::input::{scratch_dir, Reader, Writer};
use crate::keys::stream_key;

/// Largest allocation the target may make: frames are read only once their
/// length was checked against the file, and the inputs are a few KiB.
pub const ALLOC_LIMIT: usize = 1 << 20;

const SLOT_LEN: usize = 60;
const SLOT_STRIDE: usize = 4096;
const MAX_FILES: usize = 4;

fn file_name(no: u64) -> String {
    format!("{no:016}.jnl")
}

/// Runs one input.
pub fn run(data: &[u8]) {
    let mut r = Reader::new(data);
    let flags = r.u8();
    let dir = scratch_dir();
    let jdir = dir.path().join("journal");
    std::fs::create_dir(&jdir).expect("create the journal directory");
    let fix = flags & 8 != 0;
    let slots = |r: &mut Reader<'_>| {
        let mut wm = vec![0u8; 2 * SLOT_STRIDE];
        for at in [0, SLOT_STRIDE] {
            let mut slot = r.array::<SLOT_LEN>();
            if fix {
                let crc = crc32c::crc32c(&slot[..56]);
                slot[56..].copy_from_slice(&crc.to_le_bytes());
            }
            wm[at..at + SLOT_LEN].copy_from_slice(&slot);
        }
        wm
    };
    match flags & 3 {
        // Slots where the journal writes them.
        1 => std::fs::write(jdir.join(WATERMARK_FILE), slots(&mut r)).expect("write the watermark"),
        // A file of any length.
        2 => std::fs::write(jdir.join(WATERMARK_FILE), r.section()).expect("write the watermark"),
        // None (a journal of an older version), or (3) the two slots and a
        // leftover temporary file.
        3 => {
            std::fs::write(jdir.join(WATERMARK_FILE), slots(&mut r)).expect("write the watermark");
            std::fs::write(jdir.join("watermark.tmp"), b"x").expect("write");
        }
        _ => {}
    }
    for _ in 0..MAX_FILES {
        if r.is_empty() {
            break;
        }
        let no = u64::from(r.u8());
        let mut bytes = r.section().to_vec();
        if fix {
            fix_checksums(&mut bytes);
        }
        std::fs::write(jdir.join(file_name(no)), bytes).expect("write a journal file");
    }
    // Small files make an append start a new one.
    let max_file_bytes = if flags & 4 != 0 { 1 } else { 1 << 20 };
    exercise(&jdir, max_file_bytes);
}

/// Makes both checksums of every frame match (found by walking the
/// declared lengths), as a writer with a bug (or a forger without the key)
/// would: the checks behind the checksums then see the content.
fn fix_checksums(f: &mut [u8]) {
    let mut off = 0usize;
    while f.len() - off >= HEADER_LEN {
        let h = off;
        let cipher_len = u32::from_le_bytes([f[h + 104], f[h + 105], f[h + 106], f[h + 107]]);
        let end = (h + HEADER_LEN)
            .saturating_add(cipher_len as usize)
            .min(f.len());
        let pcrc = crc32c::crc32c(&f[h + HEADER_LEN..end]);
        f[h + 128..h + 132].copy_from_slice(&pcrc.to_le_bytes());
        let hcrc = crc32c::crc32c(&f[h..h + 132]);
        f[h + 132..h + 136].copy_from_slice(&hcrc.to_le_bytes());
        off = end;
    }
}

/// Every file of the directory and its bytes.
fn snapshot(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut m = BTreeMap::new();
    for e in std::fs::read_dir(dir).expect("list") {
        let e = e.expect("list");
        let bytes = std::fs::read(e.path()).expect("read");
        m.insert(e.file_name().to_string_lossy().into_owned(), bytes);
    }
    m
}

fn exercise(dir: &Path, max_file_bytes: u64) {
    let before = snapshot(dir);
    let (mut j, scan) = match Journal::open(dir, max_file_bytes) {
        Ok(x) => x,
        Err(e @ (StoreError::Corrupt { .. } | StoreError::Invalid(_))) => {
            assert_eq!(
                snapshot(dir),
                before,
                "a refused open changed the journal ({e})"
            );
            return;
        }
        Err(e) => panic!("open failed with neither Corrupt nor Invalid: {e}"),
    };
    check_frames(dir, &scan.frames);
    let max = scan
        .frames
        .iter()
        .map(|f| f.header.last_seq)
        .max()
        .unwrap_or(0);
    assert_eq!(j.durable_seq(), max);
    assert_eq!(frames(dir).expect("list the frames"), scan.frames);

    // Two frames (with small files, the second starts a new file).
    let mut want = scan.frames.clone();
    for seq in [max.wrapping_add(1), max.wrapping_add(2)] {
        if seq == 0 || seq >= u64::MAX - 1 {
            continue;
        }
        let (f, h) = flush_frame(seq, seq);
        let pos = match j.append(&f, &h) {
            Ok(p) => p,
            // A watermark named the last file number: the journal refuses
            // to start another rather than wrap (checked, typed).
            Err(replica_store::StoreError::JournalFileNumbers { .. }) => return,
            Err(e) => panic!("appending record {seq} to an opened journal failed: {e}"),
        };
        match j.sync() {
            Ok(d) => assert_eq!(d, seq),
            Err(e) => panic!("syncing record {seq} failed: {e}"),
        }
        want.push(pos);
    }
    drop(j);
    let (mut j, again) = reopen(dir, max_file_bytes);
    assert_eq!(again.truncated_bytes, 0, "a second open cut more");
    assert_eq!(again.frames, want, "a second open found other frames");
    let durable = want.iter().map(|f| f.header.last_seq).max().unwrap_or(0);
    assert_eq!(j.durable_seq(), durable);

    // Everything applied: the files before the current one go; then a new
    // sequence space (a new ring generation) starts empty.
    if let Err(e) = j.trim(durable) {
        panic!("trimming an opened journal failed: {e}");
    }
    match j.restart() {
        Ok(()) => {}
        // At the last file number: refused, typed, not wrapped.
        Err(replica_store::StoreError::JournalFileNumbers { .. }) => return,
        Err(e) => panic!("restarting an opened journal failed: {e}"),
    }
    assert_eq!(j.durable_seq(), 0);
    let (f, h) = flush_frame(1, 1);
    j.append(&f, &h).expect("append after a restart");
    assert_eq!(j.sync().expect("sync after a restart"), 1);
    drop(j);
    let (j, fresh) = reopen(dir, max_file_bytes);
    assert_eq!(
        fresh.frames.len(),
        1,
        "a restarted journal holds other frames"
    );
    assert_eq!(j.durable_seq(), 1);
}

fn reopen(dir: &Path, max_file_bytes: u64) -> (Journal, replica_store::journal::Scan) {
    match Journal::open(dir, max_file_bytes) {
        Ok(x) => x,
        Err(e) => panic!("a journal this build wrote does not open again: {e}"),
    }
}

fn check_frames(dir: &Path, found: &[FramePos]) {
    for w in found.windows(2) {
        assert!(
            (w[0].file, w[0].offset) < (w[1].file, w[1].offset),
            "frames out of order"
        );
    }
    for p in found {
        let b = match read_frame(dir, p) {
            Ok(b) => b,
            Err(e) => panic!("a frame the scan found does not read back: {e}"),
        };
        assert_eq!(frame::check(&b).as_ref(), Ok(&p.header));
    }
}

/// A sealed frame of one FLUSH record at `seq`.
fn flush_frame(seq: u64, counter: u64) -> (Vec<u8>, SegmentHeader) {
    let mut plain = Vec::new();
    frame::encode_record_parts(
        &mut plain,
        seq,
        frame::ring_op::FLUSH,
        0,
        0,
        0,
        0,
        0,
        0,
        &[],
    );
    let h = SegmentHeader {
        features: 0,
        key_id: 1,
        stream_id: crate::keys::STREAM_ID,
        generation: crate::frame::GENERATION,
        volume_tag: replica_proto::keys::volume_tag(crate::keys::VOLUME),
        epoch: 1,
        counter,
        first_seq: seq,
        last_seq: seq,
        record_count: 1,
        plain_len: 0,
        cipher_len: 0,
        zstd_level: 1,
        source_time_ns: 0,
    };
    let f = frame::seal(h, &plain, 1, stream_key()).expect("seal");
    let h = frame::check(&f).expect("check");
    (f, h)
}

/// Seed inputs: journals written by [`Journal`], with their watermark.
pub fn seeds() -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for (name, frames_n, max_bytes, synced, flags) in [
        ("one-file", 3u64, 1u64 << 20, true, 1u8),
        ("two-files", 3, 300, true, 1),
        ("unsynced-tail", 3, 1 << 20, false, 1),
        ("one-file-checksummed", 3, 1 << 20, true, 1 | 8),
        ("two-files-checksummed", 3, 300, true, 1 | 4 | 8),
    ] {
        let d = scratch_dir();
        let (mut j, _) = Journal::open(d.path(), max_bytes).expect("open");
        for s in 1..=frames_n {
            let (f, h) = flush_frame(s, s);
            j.append(&f, &h).expect("append");
            if synced || s < frames_n {
                j.sync().expect("sync");
            }
        }
        drop(j);
        let wm = std::fs::read(d.path().join(WATERMARK_FILE)).expect("read");
        let mut w = Writer::new()
            .u8(flags)
            .bytes(&wm[..SLOT_LEN])
            .bytes(&wm[SLOT_STRIDE..SLOT_STRIDE + SLOT_LEN]);
        for no in 1..=4u8 {
            if let Ok(b) = std::fs::read(d.path().join(file_name(u64::from(no)))) {
                w = w.u8(no).section(&b);
            }
        }
        out.push((name.to_string(), w.finish()));
    }
    out
}
