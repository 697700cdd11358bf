//! `frame`: segment headers and frames as a target receives them
//! (`replica_proto::frame`).
//!
//! The first byte picks who made the bytes:
//!
//! * 0, anybody: the rest is a received frame (with its checksums made to
//!   match if the first byte's top bit is set). Header decoding and the
//!   keyless check must agree, a frame that passes the check has a
//!   consistent header, no proper prefix of it passes, and opening it
//!   with the fixed key (authenticate, decompress, decode the records)
//!   returns a value or an error.
//! * 1, a sender holding the key: sequence fields from the input, the rest
//!   a plaintext that is sealed as a source would. Sealing refuses what
//!   the receiver would refuse; what it seals passes the check with the
//!   header it was given, opens to the same plaintext, and its records,
//!   when they decode, encode back to exactly that plaintext.
//! * 2, a sender holding the key who builds the payload by hand: the rest
//!   is decompressed (or, with the next byte's low bit set, taken as a
//!   payload stored without zstd) as an authenticated body of the declared
//!   length, and its records decoded.

use replica_proto::frame::{
    self, FrameError, RecordView, SegmentHeader, FEATURE_RESYNC_GAP, FEATURE_ZSTD, HEADER_LEN,
    MAX_CIPHER_LEN, MAX_PLAIN_LEN, TAG_LEN,
};

use crate::input::{Reader, Writer};
use crate::keys::{stream_key, STREAM_ID};

/// Largest allocation the target may make, but for decompression, which
/// sizes its buffer from the authenticated header's plaintext length (at
/// most [`MAX_PLAIN_LEN`]) and is allowed that much more.
pub const ALLOC_LIMIT: usize = 1 << 20;

/// The ring generation of the fuzzed streams.
pub const GENERATION: [u8; 16] = [0x11; 16];

/// Runs one input.
pub fn run(data: &[u8]) {
    let mut r = Reader::new(data);
    let sel = r.u8();
    match sel & 3 {
        0 => {
            let mut f = r.rest().to_vec();
            if sel & 0x80 != 0 {
                fix_checksums(&mut f);
            }
            received(&f)
        }
        1 => sealed(&mut r),
        _ => decompressed(&mut r),
    }
}

/// Makes both checksums match, as a forger without the key can: the
/// header checks behind them, and the AEAD, then see the content.
fn fix_checksums(f: &mut [u8]) {
    if f.len() >= HEADER_LEN {
        let pcrc = crc32c::crc32c(&f[HEADER_LEN..]);
        f[128..132].copy_from_slice(&pcrc.to_le_bytes());
        let hcrc = crc32c::crc32c(&f[..132]);
        f[132..136].copy_from_slice(&hcrc.to_le_bytes());
    }
}

fn received(f: &[u8]) {
    let decoded = SegmentHeader::decode(f);
    let Ok(h) = frame::check(f) else {
        return;
    };
    assert_eq!(
        decoded.as_ref().map(|(d, _)| d),
        Ok(&h),
        "check accepted what decode refused"
    );
    assert_eq!(h.frame_len(), f.len());
    assert!(h.first_seq >= 1 && h.last_seq < u64::MAX && h.last_seq >= h.first_seq);
    assert_eq!(h.last_seq - h.first_seq + 1, u64::from(h.record_count));
    assert!(h.plain_len <= MAX_PLAIN_LEN && h.cipher_len <= MAX_CIPHER_LEN);
    assert!(h.cipher_len as usize >= TAG_LEN);
    assert!(frame::check(&f[..f.len() - 1]).is_err(), "a prefix passed");
    open_and_decode(&h, f);
}

/// The receive path after the keyless check.
fn open_and_decode(h: &SegmentHeader, f: &[u8]) -> Option<Vec<u8>> {
    let body = frame::authenticate(h, f, stream_key()).ok()?;
    let plain = decompress(h, &body).ok()?;
    assert_eq!(plain.len(), h.plain_len as usize);
    check_records(h.first_seq, h.record_count, &plain);
    Some(plain)
}

/// Decompression may allocate what the (checked) header says the
/// plaintext holds, and no more.
fn decompress(h: &SegmentHeader, body: &[u8]) -> Result<Vec<u8>, FrameError> {
    crate::alloc::allowing(h.plain_len as usize, || frame::decompress(h, body))
}

/// Decodes records; what decodes is consistent and encodes back to the
/// same bytes.
fn check_records(first_seq: u64, count: u32, plain: &[u8]) {
    let Ok(recs) = frame::decode_record_run(first_seq, count, plain) else {
        return;
    };
    assert_eq!(recs.len(), count as usize);
    let mut again = Vec::with_capacity(plain.len());
    for (i, r) in recs.iter().enumerate() {
        assert_eq!(Some(r.seq), first_seq.checked_add(i as u64));
        assert!(r
            .sector
            .checked_mul(512)
            .and_then(|b| b.checked_add(u64::from(r.len)))
            .is_some());
        // Writes and chunk hashes carry `len` bytes; nothing else carries any.
        if r.op == frame::ring_op::WRITE || r.op == frame::OP_CHUNK_HASHES {
            assert_eq!(r.data.len(), r.len as usize);
        } else {
            assert!(r.data.is_empty());
        }
        frame::encode_record(&mut again, r);
    }
    assert_eq!(again, plain, "decoded records do not encode back");
}

fn header(first_seq: u64, last_seq: u64, count: u32, counter: u64, features: u32) -> SegmentHeader {
    SegmentHeader {
        features,
        key_id: 1,
        stream_id: STREAM_ID,
        generation: GENERATION,
        volume_tag: replica_proto::keys::volume_tag(crate::keys::VOLUME),
        epoch: 1,
        counter,
        first_seq,
        last_seq,
        record_count: count,
        plain_len: 0,
        cipher_len: 0,
        zstd_level: 1,
        source_time_ns: 0,
    }
}

fn sealed(r: &mut Reader<'_>) {
    let first = r.u64();
    let count = r.u32();
    let counter = r.u64();
    let flags = r.u8();
    let flip = r.u32();
    let plain = r.rest();
    let last = first.wrapping_add(u64::from(count)).wrapping_sub(1);
    let features = if flags & 1 != 0 {
        FEATURE_RESYNC_GAP
    } else {
        0
    };
    let level = i32::from(flags >> 6) + 1;
    let h = header(first, last, count, counter, features);
    let f = match frame::seal(h.clone(), plain, level, stream_key()) {
        Ok(f) => f,
        Err(e) => {
            // Only what the receiver would refuse anyway.
            assert!(
                matches!(e, FrameError::Malformed(_) | FrameError::Records(_)),
                "seal failed: {e}"
            );
            return;
        }
    };
    let got = frame::check(&f).expect("a sealed frame passes the check");
    assert_eq!(
        (got.first_seq, got.last_seq, got.record_count, got.counter),
        (h.first_seq, h.last_seq, h.record_count, h.counter)
    );
    // Payloads under 64 KiB are always compressed; larger ones only when
    // samples of them shrink.
    if plain.len() < 64 * 1024 {
        assert_eq!(got.features, FEATURE_ZSTD | features);
    } else {
        assert_eq!(got.features & !FEATURE_ZSTD, features);
    }
    assert_eq!(got.plain_len as usize, plain.len());
    let opened = open_and_decode(&got, &f).expect("a sealed frame opens");
    assert_eq!(opened, plain);
    // Any single changed byte is caught, by the check or the AEAD.
    let mut bad = f.clone();
    let at = flip as usize % bad.len();
    bad[at] ^= 0x80 | (flip >> 24) as u8;
    let r = frame::check(&bad).and_then(|h| frame::authenticate(&h, &bad, stream_key()));
    assert!(r.is_err(), "byte {at} changed and the frame still opened");
}

fn decompressed(r: &mut Reader<'_>) {
    // A zstd payload, or (low bit set) one stored as is.
    let features = if r.u8() & 1 == 0 { FEATURE_ZSTD } else { 0 };
    let first = r.u64();
    let count = r.u32();
    let plain_len = r.u32() % (MAX_PLAIN_LEN + 1);
    let body = r.rest();
    let mut h = header(
        first,
        first.wrapping_add(u64::from(count)).wrapping_sub(1),
        count,
        0,
        features,
    );
    h.plain_len = plain_len;
    if let Ok(plain) = decompress(&h, body) {
        assert_eq!(plain.len(), plain_len as usize);
        check_records(first, count, &plain);
    }
}

/// Seed inputs: real frames (as received, and as the sealing and
/// decompressing modes read them).
pub fn seeds() -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut plain = Vec::new();
    let recs: [RecordView<'_>; 5] = [
        rec(10, frame::ring_op::WRITE, 8, 4096, &[0xa5; 4096]),
        rec(11, frame::ring_op::FLUSH, 0, 0, &[]),
        rec(12, frame::ring_op::DISCARD, 64, 8192, &[]),
        rec(13, frame::OP_SKIPPED, 16, 512, &[]),
        RecordView {
            aux: frame::resync::Marker::Begin { full: true }.aux(),
            flags: frame::RECORD_FLAG_RESYNC,
            ..rec(14, frame::ring_op::MARKER, 0, 0, &[])
        },
    ];
    for r in &recs {
        frame::encode_record(&mut plain, r);
    }
    let small = {
        let mut p = Vec::new();
        frame::encode_record(&mut p, &rec(1, frame::ring_op::WRITE, 0, 512, &[7; 512]));
        p
    };
    for (name, first, count, p, features) in [
        ("five-records", 10u64, 5u32, &plain[..], 0),
        ("one-write", 1, 1, &small[..], 0),
        ("resync-gap", 10, 5, &plain[..], FEATURE_RESYNC_GAP),
    ] {
        let h = header(first, first + u64::from(count) - 1, count, 3, features);
        let f = frame::seal(h, p, 1, stream_key()).expect("seal a seed");
        assert!(f.len() > HEADER_LEN);
        out.push((
            format!("received-{name}"),
            Writer::new().u8(0).bytes(&f).finish(),
        ));
        out.push((
            format!("forged-{name}"),
            Writer::new().u8(0x80).bytes(&f).finish(),
        ));
        out.push((
            format!("sealed-{name}"),
            Writer::new()
                .u8(1)
                .u64(first)
                .u32(count)
                .u64(3)
                .u8(if features != 0 { 1 } else { 0 })
                .u32(0x0100_0000)
                .bytes(p)
                .finish(),
        ));
        let body = zstd_compress(p);
        out.push((
            format!("decompressed-{name}"),
            Writer::new()
                .u8(2)
                .u8(0)
                .u64(first)
                .u32(count)
                .u32(p.len() as u32)
                .bytes(&body)
                .finish(),
        ));
        out.push((
            format!("stored-{name}"),
            Writer::new()
                .u8(2)
                .u8(1)
                .u64(first)
                .u32(count)
                .u32(p.len() as u32)
                .bytes(p)
                .finish(),
        ));
    }
    out
}

fn rec(seq: u64, op: u8, sector: u64, len: u32, data: &[u8]) -> RecordView<'_> {
    RecordView {
        seq,
        op,
        flags: 0,
        volume: 0,
        sector,
        len,
        submit_ns: seq * 1000,
        aux: 0,
        data,
    }
}

/// The payload as a source compresses it before sealing.
fn zstd_compress(p: &[u8]) -> Vec<u8> {
    zstd::bulk::compress(p, 1).expect("compress a seed")
}
