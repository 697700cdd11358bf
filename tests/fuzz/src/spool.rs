//! `spool`: the source's spool read back from arbitrary files
//! (`replicad::source::spool`: its file and chunk formats, the start-up
//! scan that cuts a damaged tail, and the reader).
//!
//! The input is a control block and up to four files, each a name (the
//! sequence in its file name) and its bytes, written into an empty spool
//! directory (with their checksums made to match, if the control block
//! says so, so that the checks behind them see the content). Then, as the
//! daemon does at start and after:
//!
//! * [`Spool::open`] succeeds whatever the files hold (damage is cut and
//!   reported, never an error: an error would keep the daemon from
//!   starting);
//! * every record left is read back without an error, from the oldest one;
//!   a reader started anywhere ends (after at most one chunk per chunk
//!   found) with a value or an error;
//! * an acknowledgement of any sequence succeeds, and reading still works;
//! * a chunk appended after the recovered records reads back;
//! * opening the spool again finds no damage and the same records: the
//!   first open left only whole chunks;
//! * dropping it (a resync) leaves it empty, and appending goes on.

use std::path::Path;

use replica_proto::frame::{self, ring_op};
use replicad::source::spool::Spool;

use crate::input::{scratch_dir, Reader, Writer};

/// Largest allocation the target may make: chunk plaintexts are read only
/// after their length was checked against the file, and the inputs are a
/// few KiB.
pub const ALLOC_LIMIT: usize = 1 << 20;

/// The ring generation the spool is opened for.
pub const GENERATION: [u8; 16] = [0x22; 16];
/// The volume tag the spool is opened for.
pub const VOLUME_TAG: [u8; 16] = [0x33; 16];
const FILE_BYTES: u64 = 1 << 20;
const MAX_FILES: usize = 4;

fn file_name(seq: u64) -> String {
    format!("{seq:020}.spool")
}

/// Runs one input.
pub fn run(data: &[u8]) {
    let mut r = Reader::new(data);
    let flags = r.u8();
    let read_at = r.u64();
    let ack = r.u64();
    let dir = scratch_dir();
    let spool_dir = dir.path().join("spool");
    std::fs::create_dir(&spool_dir).expect("create the spool directory");
    for _ in 0..MAX_FILES {
        if r.is_empty() {
            break;
        }
        let name = r.u64();
        let mut bytes = r.section().to_vec();
        if flags & 8 != 0 {
            fix_checksums(&mut bytes);
        }
        std::fs::write(spool_dir.join(file_name(name)), bytes).expect("write a spool file");
    }
    if flags & 1 != 0 {
        // What an interrupted rotation and a stray file leave.
        std::fs::write(spool_dir.join("00000000000000000001.spool.tmp"), b"x").expect("write");
        std::fs::write(spool_dir.join("notes.txt"), b"x").expect("write");
    }
    exercise(&spool_dir, flags, read_at, ack);
}

/// Makes the file header's and every chunk's checksum match, as a writer
/// with a bug (or a forger) would: the checks behind the checksums then
/// see the content.
fn fix_checksums(f: &mut [u8]) {
    const HDR: usize = 64;
    if f.len() < HDR {
        return;
    }
    let crc = crc32c::crc32c(&f[..60]);
    f[60..64].copy_from_slice(&crc.to_le_bytes());
    let mut off = HDR;
    while f.len() - off >= HDR {
        let plain_len = u32::from_le_bytes([f[off + 40], f[off + 41], f[off + 42], f[off + 43]]);
        let end = (off + HDR).saturating_add(plain_len as usize).min(f.len());
        let crc = crc32c::crc32c_append(crc32c::crc32c(&f[off..off + 60]), &f[off + HDR..end]);
        f[off + 60..off + 64].copy_from_slice(&crc.to_le_bytes());
        off = end;
    }
}

fn open(dir: &Path) -> (Spool, replicad::source::spool::Recovery) {
    match Spool::open(dir, GENERATION, VOLUME_TAG, FILE_BYTES) {
        Ok(x) => x,
        Err(e) => panic!("opening a damaged spool failed instead of cutting the damage: {e}"),
    }
}

/// Every record from the oldest on, as `(seq, op)`.
fn all_records(s: &Spool) -> Vec<(u64, u8)> {
    let mut out = Vec::new();
    if let Err(e) = s.for_each_record(s.oldest_seq(), |r| out.push((r.seq, r.op))) {
        panic!("records the start-up scan accepted do not read back: {e}");
    }
    out
}

fn exercise(dir: &Path, flags: u8, read_at: u64, ack: u64) {
    let (s, rec) = open(dir);
    let chunks = rec.chunks;
    let before = all_records(&s);
    // Records read back are in sequence order (a gap chunk may skip ahead).
    for w in before.windows(2) {
        assert!(
            (w[1].0.wrapping_sub(w[0].0) as i64) > 0,
            "records out of order: {w:?}"
        );
    }

    // A reader started anywhere near the spool ends.
    let from = if flags & 2 != 0 {
        read_at
    } else {
        s.oldest_seq().wrapping_add(read_at % 16).wrapping_sub(4)
    };
    let mut reader = s.reader(from);
    let mut n = 0u64;
    while let Ok(Some(c)) = reader.next_chunk() {
        n += 1;
        assert!(
            n <= chunks,
            "the reader returned more chunks than the spool holds"
        );
        assert!(frame::decode_record_run(c.first_seq, c.count, &c.plain).is_ok());
    }

    // Any acknowledgement is taken.
    let durable = if flags & 4 != 0 {
        ack
    } else {
        s.oldest_seq().wrapping_add(ack % 16).wrapping_sub(2)
    };
    if let Err(e) = s.acknowledge(durable) {
        panic!("acknowledging {durable} failed: {e}");
    }
    let _ = all_records(&s);

    // The writer continues after the recovered records.
    if s.next_seq() == 0 {
        s.restart_at(1);
    }
    let next = s.next_seq();
    let mut plain = Vec::new();
    frame::encode_record_parts(&mut plain, next, ring_op::FLUSH, 0, 0, 0, 0, 7, 0, &[]);
    if let Err(e) = s.append(next, 1, 7, 7, &plain, false) {
        panic!("appending record {next} after recovery failed: {e}");
    }
    let mut got = Vec::new();
    s.for_each_record(next, |r| got.push(r.seq))
        .expect("read the appended record");
    assert_eq!(got, [next], "the appended record does not read back alone");
    let after = all_records(&s);
    drop(s);

    // The first open left only whole chunks. Acknowledgements are not
    // kept across opens: the second one reads from the start of the oldest
    // file left, so it finds what the first one read after the
    // acknowledgement, possibly preceded by what came before it.
    let (s2, rec2) = open(dir);
    assert!(
        rec2.damage.is_empty(),
        "damage found again: {:?}",
        rec2.damage
    );
    assert_eq!(rec2.truncated_bytes, 0);
    let again = all_records(&s2);
    let mut whole = before;
    whole.push((next, ring_op::FLUSH));
    assert!(
        again.ends_with(&after) && whole.ends_with(&again),
        "a second open reads other records: {again:?}, after the first {after:?} of {whole:?}"
    );

    // A resync drops the spool; it starts again, empty, where it was.
    let at = s2.next_seq();
    if let Err(e) = s2.drop_all(at) {
        panic!("dropping the spool failed: {e}");
    }
    assert!(all_records(&s2).is_empty());
    let mut plain = Vec::new();
    frame::encode_record_parts(&mut plain, at, ring_op::FLUSH, 0, 0, 0, 0, 8, 0, &[]);
    s2.append(at, 1, 8, 8, &plain, false)
        .expect("append after dropping the spool");
    assert_eq!(all_records(&s2), [(at, ring_op::FLUSH)]);
}

/// Seed inputs: spools written by [`Spool::append`], whole, two files of
/// one spool, and with a resync gap.
pub fn seeds() -> Vec<(String, Vec<u8>)> {
    let a = scratch_dir();
    let (s, _) = Spool::open(a.path(), GENERATION, VOLUME_TAG, FILE_BYTES).expect("open");
    s.restart_at(1);
    append(&s, 1, 3);
    append(&s, 4, 2);
    // A resync starts at 10: 6..=9 were not spooled.
    let plain = records(10, 2);
    s.append(10, 2, 10_000, 11_000, &plain, true)
        .expect("append");
    drop(s);
    let b = scratch_dir();
    let (s, _) = Spool::open(b.path(), GENERATION, VOLUME_TAG, FILE_BYTES).expect("open");
    s.restart_at(12);
    append(&s, 12, 2);
    drop(s);
    let file_a = std::fs::read(a.path().join(file_name(1))).expect("read");
    let file_b = std::fs::read(b.path().join(file_name(12))).expect("read");
    vec![
        (
            "one-file".into(),
            Writer::new()
                .u8(0)
                .u64(3)
                .u64(4)
                .u64(1)
                .section(&file_a)
                .finish(),
        ),
        (
            "two-files".into(),
            Writer::new()
                .u8(1)
                .u64(0)
                .u64(6)
                .u64(1)
                .section(&file_a)
                .u64(12)
                .section(&file_b)
                .finish(),
        ),
        (
            "one-file-checksummed".into(),
            Writer::new()
                .u8(8)
                .u64(3)
                .u64(4)
                .u64(1)
                .section(&file_a)
                .finish(),
        ),
        (
            "two-files-checksummed".into(),
            Writer::new()
                .u8(8 | 4)
                .u64(0)
                .u64(12)
                .u64(1)
                .section(&file_a)
                .u64(12)
                .section(&file_b)
                .finish(),
        ),
        (
            "torn-tail".into(),
            Writer::new()
                .u8(0)
                .u64(0)
                .u64(0)
                .u64(1)
                .section(&file_a[..file_a.len() - 100])
                .finish(),
        ),
    ]
}

fn records(first: u64, n: u32) -> Vec<u8> {
    let mut p = Vec::new();
    for i in 0..u64::from(n) {
        let seq = first + i;
        if i % 2 == 0 {
            frame::encode_record_parts(
                &mut p,
                seq,
                ring_op::WRITE,
                0,
                0,
                seq * 8,
                512,
                seq * 1000,
                0,
                &[seq as u8; 512],
            );
        } else {
            frame::encode_record_parts(&mut p, seq, ring_op::FLUSH, 0, 0, 0, 0, seq * 1000, 0, &[]);
        }
    }
    p
}

fn append(s: &Spool, first: u64, n: u32) {
    let plain = records(first, n);
    let last = first + u64::from(n) - 1;
    s.append(first, n, first * 1000, last * 1000, &plain, false)
        .expect("append");
}
