//! Helpers shared by the journal's tests.

use std::path::{Path, PathBuf};

use replica_proto::frame::{seal, SegmentHeader};
use replica_proto::keys::{Direction, KeyRing, StreamContext, StreamKey};

use super::{FramePos, Journal, WATERMARK_FILE};

pub(super) fn frame(first: u64, n: u32, counter: u64) -> (Vec<u8>, SegmentHeader) {
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

/// Appends and syncs `n` one-record frames starting at record `first`;
/// returns their positions.
pub(super) fn append_synced(j: &mut Journal, first: u64, n: u64) -> Vec<FramePos> {
    let v = append_only(j, first, n);
    assert_eq!(j.sync().expect("sync"), first + n - 1);
    v
}

/// Appends `n` one-record frames (not synced).
pub(super) fn append_only(j: &mut Journal, first: u64, n: u64) -> Vec<FramePos> {
    (first..first + n)
        .map(|s| {
            let (f, h) = frame(s, 1, s);
            j.append(&f, &h).expect("append")
        })
        .collect()
}

pub(super) fn flip(path: &Path, at: u64) {
    let mut b = std::fs::read(path).expect("read");
    b[at as usize] ^= 0x40;
    std::fs::write(path, b).expect("write");
}

pub(super) fn wm_path(d: &Path) -> PathBuf {
    d.join(WATERMARK_FILE)
}

pub(super) fn end(p: &FramePos) -> u64 {
    p.offset + p.header.frame_len() as u64
}
