//! Delta segments: a batch of consecutive ring records, zstd-compressed and
//! sealed with AES-256-GCM under a stream key.
//!
//! A segment is a fixed 136-byte header followed by the ciphertext (with its
//! 16-byte tag). The AEAD's associated data is the header's first 128 bytes
//! exactly as sent and received (every field, the version and the reserved
//! bytes included; only the two checksums, computed after sealing, are left
//! out), so no header byte can change without failing authentication. The
//! header also carries two CRC32C checksums (header, then ciphertext) so that
//! torn or corrupted frames are told apart from authentication failures
//! without a key (the journal uses this to find its torn tail after a
//! crash).
//!
//! ```text
//!   0 magic "DMRS"          4 version u16         6 header_len u16
//!   8 features u32         12 key_id u32
//!  16 stream_id [16]       32 generation [16]     48 volume_tag [16]
//!  64 epoch u64            72 counter u64 (nonce, +1 per segment of a stream)
//!  80 first_seq u64        88 last_seq u64
//!  96 record_count u32    100 plain_len u32      104 cipher_len u32
//! 108 zstd_level i8      109 reserved [3]       112 source_time_ns u64
//! 120 reserved [8]        128 payload_crc u32    132 header_crc u32
//! ```
//!
//! All integers little endian. `header_crc` covers bytes 0..132,
//! `payload_crc` covers the ciphertext, the AEAD authenticates bytes 0..128
//! ([`AAD_LEN`]). Reserved bytes are zero; a header with any of them set is
//! [`FrameError::Unsupported`] until a feature bit gives them a meaning.
//! Sequences start at 1 (0 means "none"), a segment holds
//! `last_seq - first_seq + 1 == record_count` records, and `last_seq` is
//! below `u64::MAX` so that every segment has a successor.
//!
//! Versions: 1 built the associated data from the parsed fields, so the
//! reserved bytes were not authenticated; 2 authenticates the header bytes
//! as received. A version 1 frame is [`FrameError::Unsupported`].
//!
//! The plaintext (before compression) is the records back to back, each a
//! 40-byte record header (seq, sector, submit_ns, aux as u64; len u32;
//! volume u16; op u8; flags u8) and its payload.

use crate::keys::StreamKey;

/// Segment magic.
pub const SEGMENT_MAGIC: [u8; 4] = *b"DMRS";
/// Segment format version.
pub const SEGMENT_VERSION: u16 = 2;
/// Header size.
pub const HEADER_LEN: usize = 136;
/// The header bytes the AEAD authenticates, as sent: all of them but the
/// two checksums (computed after sealing).
pub const AAD_LEN: usize = 128;
/// Where the payload checksum is in the header.
const PAYLOAD_CRC_AT: usize = 128;
/// Where the header checksum is (it covers every byte before it).
const HEADER_CRC_AT: usize = 132;
/// The reserved (zero) header bytes.
const RESERVED: [std::ops::Range<usize>; 2] = [109..112, 120..128];
/// Feature bit: payload compressed with zstd (without it, the payload is
/// the plaintext as is: a segment that does not compress).
pub const FEATURE_ZSTD: u32 = 1;
/// Feature bit: the segment starts a resync. Records between the target's
/// last one and this segment's first were not shipped (the source tracked
/// their regions instead); the first record must be a resync BEGIN marker,
/// and the regions follow as resync writes.
pub const FEATURE_RESYNC_GAP: u32 = 2;
/// Features this build understands.
pub const FEATURES_KNOWN: u32 = FEATURE_ZSTD | FEATURE_RESYNC_GAP;
/// Record header size inside the plaintext.
pub const RECORD_HEADER_LEN: usize = 40;
/// Largest segment plaintext accepted (bounds memory on both sides).
pub const MAX_PLAIN_LEN: u32 = 64 << 20;
/// AEAD tag length.
pub const TAG_LEN: usize = 16;
/// Largest ciphertext accepted (tag included): the largest plaintext, its
/// zstd framing overhead when it does not compress, and the tag.
pub const MAX_CIPHER_LEN: u32 = MAX_PLAIN_LEN + 4096 + TAG_LEN as u32;

/// Record op used in segments for a record that failed on the source: it
/// keeps the sequence dense but carries nothing to apply.
pub const OP_SKIPPED: u8 = 0x80;

/// Record op of a resync's or verify's chunk hashes: the source's hashes
/// ([`crate::chunk`]) of `len / 32` chunks from byte `sector * 512`, taken
/// at this point of the stream; `aux` is a [`crate::chunk::HashAux`]. The
/// target compares the replica's chunks when its apply order reaches it
/// and changes nothing.
pub const OP_CHUNK_HASHES: u8 = 0x81;

/// Record flag (the ring's `FLAG_RESYNC`): a resync marker, or a write that
/// carries a region's content read at this point of the stream.
pub const RECORD_FLAG_RESYNC: u8 = 4;

/// The `aux` of resync markers: what happens at this point of the stream.
///
/// A resync of a volume is BEGIN, then DATA markers (each replaced, on the
/// source, by a write of the current content of the regions it names), then
/// END. The replica is inconsistent from BEGIN to END (no recovery points);
/// END is a recovery point.
pub mod resync {
    const KIND_SHIFT: u32 = 56;
    const COUNT_SHIFT: u32 = 40;
    const REGION_MASK: u64 = (1 << COUNT_SHIFT) - 1;

    /// What a resync marker says.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Marker {
        /// A resync starts: the replica is inconsistent until END. `full`:
        /// it resends every region of the volume (an initial copy), so a
        /// target that holds no consistent copy is consistent at its END.
        Begin {
            /// Every region of the volume is resent.
            full: bool,
        },
        /// Send `count` regions from `region` (in the volume's region size).
        Data {
            /// First region.
            region: u64,
            /// Regions (1..=65535).
            count: u32,
        },
        /// Every region was sent: the replica is consistent again.
        End,
        /// Compare `count` chunks from `region` (in the resync's or
        /// verify's chunk size): replaced, on the source, by a record of
        /// their hashes (`OP_CHUNK_HASHES`) at this position.
        Hash {
            /// First chunk.
            region: u64,
            /// Chunks (1..=65535).
            count: u32,
        },
    }

    impl Marker {
        /// The marker's `aux`.
        pub fn aux(self) -> u64 {
            match self {
                Marker::Begin { full } => (1 << KIND_SHIFT) | u64::from(full),
                Marker::Data { region, count } => {
                    (2 << KIND_SHIFT)
                        | (u64::from(count & 0xffff) << COUNT_SHIFT)
                        | (region & REGION_MASK)
                }
                Marker::End => 3 << KIND_SHIFT,
                Marker::Hash { region, count } => {
                    (4 << KIND_SHIFT)
                        | (u64::from(count & 0xffff) << COUNT_SHIFT)
                        | (region & REGION_MASK)
                }
            }
        }

        /// Parses an `aux`.
        pub fn from_aux(aux: u64) -> Option<Self> {
            match aux >> KIND_SHIFT {
                1 if aux & ((1 << KIND_SHIFT) - 2) == 0 => {
                    Some(Marker::Begin { full: aux & 1 != 0 })
                }
                2 => {
                    let count = ((aux >> COUNT_SHIFT) & 0xffff) as u32;
                    (count > 0).then_some(Marker::Data {
                        region: aux & REGION_MASK,
                        count,
                    })
                }
                3 if aux & ((1 << KIND_SHIFT) - 1) == 0 => Some(Marker::End),
                4 => {
                    let count = ((aux >> COUNT_SHIFT) & 0xffff) as u32;
                    (count > 0).then_some(Marker::Hash {
                        region: aux & REGION_MASK,
                        count,
                    })
                }
                _ => None,
            }
        }
    }
}

/// Frame errors.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    /// Not a segment, or damaged in transit or on disk.
    #[error("corrupt segment: {0}")]
    Corrupt(&'static str),
    /// A format version or feature this build does not speak.
    #[error("unsupported segment: {0}")]
    Unsupported(&'static str),
    /// The ciphertext did not authenticate under the stream key: wrong key,
    /// or forged or replayed from another stream.
    #[error("segment failed authentication (wrong key, or a segment of another stream or volume)")]
    Authentication,
    /// Decompression failed after authentication (should be impossible).
    #[error("segment payload does not decompress: {0}")]
    Decompress(String),
    /// The records inside do not match the header.
    #[error("segment records malformed: {0}")]
    Records(&'static str),
    /// The header passed its checksum but its fields contradict each other
    /// (a sequence range that does not match the record count, or that
    /// wraps): the sender built it wrong, it was not damaged on the way.
    #[error("segment header malformed: {0}")]
    Malformed(&'static str),
}

/// The parsed header of a segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentHeader {
    /// Feature bits.
    pub features: u32,
    /// Master key id.
    pub key_id: u32,
    /// Stream id.
    pub stream_id: [u8; 16],
    /// Ring generation.
    pub generation: [u8; 16],
    /// Volume tag.
    pub volume_tag: [u8; 16],
    /// Epoch.
    pub epoch: u64,
    /// Nonce counter.
    pub counter: u64,
    /// First record sequence.
    pub first_seq: u64,
    /// Last record sequence (inclusive).
    pub last_seq: u64,
    /// Records inside.
    pub record_count: u32,
    /// Plaintext length.
    pub plain_len: u32,
    /// Ciphertext length including the tag.
    pub cipher_len: u32,
    /// zstd level used (informational).
    pub zstd_level: i8,
    /// Submission time of the last record, ns since the epoch.
    pub source_time_ns: u64,
}

impl SegmentHeader {
    /// The header bytes with both checksums (and the reserved bytes) zero.
    fn encode_fields(&self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[0..4].copy_from_slice(&SEGMENT_MAGIC);
        h[4..6].copy_from_slice(&SEGMENT_VERSION.to_le_bytes());
        h[6..8].copy_from_slice(&(HEADER_LEN as u16).to_le_bytes());
        h[8..12].copy_from_slice(&self.features.to_le_bytes());
        h[12..16].copy_from_slice(&self.key_id.to_le_bytes());
        h[16..32].copy_from_slice(&self.stream_id);
        h[32..48].copy_from_slice(&self.generation);
        h[48..64].copy_from_slice(&self.volume_tag);
        h[64..72].copy_from_slice(&self.epoch.to_le_bytes());
        h[72..80].copy_from_slice(&self.counter.to_le_bytes());
        h[80..88].copy_from_slice(&self.first_seq.to_le_bytes());
        h[88..96].copy_from_slice(&self.last_seq.to_le_bytes());
        h[96..100].copy_from_slice(&self.record_count.to_le_bytes());
        h[100..104].copy_from_slice(&self.plain_len.to_le_bytes());
        h[104..108].copy_from_slice(&self.cipher_len.to_le_bytes());
        h[108] = self.zstd_level as u8;
        h[112..120].copy_from_slice(&self.source_time_ns.to_le_bytes());
        h
    }

    /// Parses and checks a header (magic, checksum, version, length,
    /// reserved bytes, features, length bounds, sequence range). Returns it
    /// with the payload checksum.
    pub fn decode(b: &[u8]) -> Result<(Self, u32), FrameError> {
        if b.len() < HEADER_LEN {
            return Err(FrameError::Corrupt("short header"));
        }
        let b = &b[..HEADER_LEN];
        if b[0..4] != SEGMENT_MAGIC {
            return Err(FrameError::Corrupt("bad magic"));
        }
        let u16_at = |o: usize| crate::le::u16_at(b, o);
        let u32_at = |o: usize| crate::le::u32_at(b, o);
        let u64_at = |o: usize| crate::le::u64_at(b, o);
        let arr16 = |o: usize| {
            let mut a = [0u8; 16];
            a.copy_from_slice(&b[o..o + 16]);
            a
        };
        if crc32c::crc32c(&b[..HEADER_CRC_AT]) != u32_at(HEADER_CRC_AT) {
            return Err(FrameError::Corrupt("header checksum mismatch"));
        }
        if u16_at(4) != SEGMENT_VERSION {
            return Err(FrameError::Unsupported("segment version"));
        }
        if u16_at(6) as usize != HEADER_LEN {
            return Err(FrameError::Corrupt("header length"));
        }
        // No feature bit defines them yet: a sender that sets them speaks
        // something this build does not.
        if RESERVED
            .iter()
            .any(|r| b[r.clone()].iter().any(|&x| x != 0))
        {
            return Err(FrameError::Unsupported("reserved header bytes set"));
        }
        let h = Self {
            features: u32_at(8),
            key_id: u32_at(12),
            stream_id: arr16(16),
            generation: arr16(32),
            volume_tag: arr16(48),
            epoch: u64_at(64),
            counter: u64_at(72),
            first_seq: u64_at(80),
            last_seq: u64_at(88),
            record_count: u32_at(96),
            plain_len: u32_at(100),
            cipher_len: u32_at(104),
            zstd_level: b[108] as i8,
            source_time_ns: u64_at(112),
        };
        if h.features & !FEATURES_KNOWN != 0 {
            return Err(FrameError::Unsupported("unknown feature bits"));
        }
        if h.plain_len > MAX_PLAIN_LEN || h.cipher_len > MAX_CIPHER_LEN {
            return Err(FrameError::Corrupt("length out of bounds"));
        }
        if (h.cipher_len as usize) < TAG_LEN {
            return Err(FrameError::Corrupt("ciphertext shorter than its tag"));
        }
        h.check_range()?;
        Ok((h, u32_at(PAYLOAD_CRC_AT)))
    }

    /// The sequence range against the record count, without wrapping: a
    /// range that wrapped could claim every sequence there is and make the
    /// target take every later segment for a duplicate.
    fn check_range(&self) -> Result<(), FrameError> {
        if self.first_seq == 0 {
            return Err(FrameError::Malformed("sequence 0 is not a record's"));
        }
        if self.last_seq == u64::MAX {
            return Err(FrameError::Malformed(
                "last sequence leaves no room for the next segment",
            ));
        }
        let span = self
            .last_seq
            .checked_sub(self.first_seq)
            .and_then(|d| d.checked_add(1))
            .ok_or(FrameError::Malformed("sequence range runs backwards"))?;
        if span != u64::from(self.record_count) {
            return Err(FrameError::Malformed(
                "sequence range does not match the record count",
            ));
        }
        Ok(())
    }

    /// Total frame length (header + ciphertext).
    pub fn frame_len(&self) -> usize {
        // Saturating: a header built by hand with an absurd length names a
        // length no frame has, instead of wrapping to one some frame has.
        HEADER_LEN.saturating_add(self.cipher_len as usize)
    }
}

/// Appends a record to a plaintext buffer.
pub fn encode_record(out: &mut Vec<u8>, r: &RecordView<'_>) {
    encode_record_parts(
        out,
        r.seq,
        r.op,
        r.flags,
        r.volume,
        r.sector,
        r.len,
        r.submit_ns,
        r.aux,
        r.data,
    );
}

/// Appends a record to a plaintext buffer from its parts (no payload copy
/// beyond the one into `out`).
#[allow(clippy::too_many_arguments)]
pub fn encode_record_parts(
    out: &mut Vec<u8>,
    seq: u64,
    op: u8,
    flags: u8,
    volume: u32,
    sector: u64,
    len: u32,
    submit_ns: u64,
    aux: u64,
    data: &[u8],
) {
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(&sector.to_le_bytes());
    out.extend_from_slice(&submit_ns.to_le_bytes());
    out.extend_from_slice(&aux.to_le_bytes());
    out.extend_from_slice(&len.to_le_bytes());
    // Volume indices within a group fit 16 bits (the source refuses more).
    out.extend_from_slice(&(volume as u16).to_le_bytes());
    out.push(op);
    out.push(flags);
    out.extend_from_slice(data);
}

/// A record inside a decoded plaintext (borrowing its payload).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordView<'a> {
    /// Sequence.
    pub seq: u64,
    /// Operation (`ring_op::*` or [`OP_SKIPPED`]).
    pub op: u8,
    /// Flags.
    pub flags: u8,
    /// Volume index within the group.
    pub volume: u32,
    /// First sector.
    pub sector: u64,
    /// Bytes affected.
    pub len: u32,
    /// Submission time.
    pub submit_ns: u64,
    /// Marker id etc.
    pub aux: u64,
    /// Payload (writes only).
    pub data: &'a [u8],
}

/// Parsed records of a plaintext, checked against the header: consecutive
/// sequences from `first_seq`, the right count, payloads exactly the length
/// of writes. Payloads are borrowed, not copied.
pub fn decode_records<'a>(
    h: &SegmentHeader,
    plain: &'a [u8],
) -> Result<Vec<RecordView<'a>>, FrameError> {
    decode_record_run(h.first_seq, h.record_count, plain)
}

/// Parsed records of a plaintext that must hold exactly `count` records
/// with consecutive sequences from `first_seq` (a segment's, or a spool
/// chunk's). Payloads are borrowed, not copied.
pub fn decode_record_run(
    first_seq: u64,
    count: u32,
    plain: &[u8],
) -> Result<Vec<RecordView<'_>>, FrameError> {
    // Sized by what the plaintext can hold, not by the count it claims:
    // every record takes at least its header.
    let fits = plain.len() / RECORD_HEADER_LEN;
    let mut out = Vec::with_capacity((count as usize).min(fits));
    let mut p = 0usize;
    // `None` once the sequence after the last record would not fit.
    let mut expect = Some(first_seq);
    while p < plain.len() {
        if out.len() >= count as usize {
            return Err(FrameError::Records("more records than the header counts"));
        }
        let rh = p
            .checked_add(RECORD_HEADER_LEN)
            .and_then(|end| plain.get(p..end))
            .ok_or(FrameError::Records("truncated record header"))?;
        let u64_at = |o: usize| crate::le::u64_at(rh, o);
        let seq = u64_at(0);
        let sector = u64_at(8);
        let submit_ns = u64_at(16);
        let aux = u64_at(24);
        let len = u32::from_le_bytes([rh[32], rh[33], rh[34], rh[35]]);
        let volume = u32::from(u16::from_le_bytes([rh[36], rh[37]]));
        let op = rh[38];
        let flags = rh[39];
        match expect {
            Some(e) if e == seq => {}
            Some(_) => return Err(FrameError::Records("records not consecutive")),
            None => return Err(FrameError::Records("record sequences wrap")),
        }
        // Every record's byte range (`sector * 512 + len`) is addressable,
        // so that appliers can compute it without overflowing.
        if sector
            .checked_mul(512)
            .and_then(|b| b.checked_add(u64::from(len)))
            .is_none()
        {
            return Err(FrameError::Records("record byte range overflows 64 bits"));
        }
        p += RECORD_HEADER_LEN;
        let dlen = match op {
            ring_op::WRITE => {
                usize::try_from(len).map_err(|_| FrameError::Records("truncated payload"))?
            }
            OP_CHUNK_HASHES => {
                usize::try_from(len).map_err(|_| FrameError::Records("truncated payload"))?
            }
            ring_op::FLUSH | ring_op::MARKER | OP_SKIPPED => 0,
            ring_op::DISCARD | ring_op::WRITE_ZEROES => 0,
            _ => return Err(FrameError::Records("unknown record op")),
        };
        let data = p
            .checked_add(dlen)
            .and_then(|end| plain.get(p..end))
            .ok_or(FrameError::Records("truncated payload"))?;
        p += dlen;
        out.push(RecordView {
            seq,
            op,
            flags,
            volume,
            sector,
            len,
            submit_ns,
            aux,
            data,
        });
        expect = seq.checked_add(1);
    }
    if out.len() != count as usize {
        return Err(FrameError::Records(
            "record count does not match the header",
        ));
    }
    Ok(out)
}

/// Record operation codes (the ring ABI's, repeated here so this crate
/// does not depend on the ring).
pub mod ring_op {
    /// Write with payload.
    pub const WRITE: u8 = 1;
    /// Flush.
    pub const FLUSH: u8 = 2;
    /// Discard.
    pub const DISCARD: u8 = 3;
    /// Write zeroes.
    pub const WRITE_ZEROES: u8 = 4;
    /// Marker.
    pub const MARKER: u8 = 5;
}

/// Compresses and seals a plaintext into a frame. `h.plain_len`,
/// `cipher_len` and `features` are filled in here.
#[cfg(feature = "codec")]
pub fn seal(
    h: SegmentHeader,
    plain: &[u8],
    zstd_level: i32,
    key: &StreamKey,
) -> Result<Vec<u8>, FrameError> {
    let mut c = zstd::bulk::Compressor::new(zstd_level)
        .map_err(|e| FrameError::Decompress(e.to_string()))?;
    seal_with(&mut c, h, plain, zstd_level, key)
}

/// Bytes of each sample [`worth_compressing`] tries.
#[cfg(feature = "codec")]
const SAMPLE: usize = 4096;

/// Whether a payload is worth compressing: a small one always; a larger
/// one unless eight samples of it, spread evenly from start to end, do not
/// shrink at all together (random or already compressed data: zstd would
/// cost CPU for nothing, and the segment goes without [`FEATURE_ZSTD`]).
#[cfg(feature = "codec")]
fn worth_compressing(
    compressor: &mut zstd::bulk::Compressor<'_>,
    plain: &[u8],
) -> Result<bool, FrameError> {
    if plain.len() < 16 * SAMPLE {
        return Ok(true);
    }
    const SAMPLES: usize = 8;
    let step = (plain.len() - SAMPLE) / (SAMPLES - 1);
    let mut sample = Vec::with_capacity(SAMPLES * SAMPLE);
    for i in 0..SAMPLES {
        let at = i * step;
        sample.extend_from_slice(&plain[at..at + SAMPLE]);
    }
    let out = compressor
        .compress(&sample)
        .map_err(|e| FrameError::Decompress(e.to_string()))?;
    Ok(out.len() < sample.len())
}

/// [`seal`] with a reusable compression context (one per worker thread).
#[cfg(feature = "codec")]
pub fn seal_with(
    compressor: &mut zstd::bulk::Compressor<'_>,
    mut h: SegmentHeader,
    plain: &[u8],
    zstd_level: i32,
    key: &StreamKey,
) -> Result<Vec<u8>, FrameError> {
    if plain.len() > MAX_PLAIN_LEN as usize {
        return Err(FrameError::Records("segment too large"));
    }
    let zstd = worth_compressing(compressor, plain)?;
    let mut body = if zstd {
        compressor
            .compress(plain)
            .map_err(|e| FrameError::Decompress(e.to_string()))?
    } else {
        let mut b = Vec::with_capacity(plain.len() + TAG_LEN);
        b.extend_from_slice(plain);
        b
    };
    body.reserve(TAG_LEN);
    h.features = if zstd { FEATURE_ZSTD } else { 0 } | (h.features & FEATURE_RESYNC_GAP);
    h.key_id = key.key_id();
    h.plain_len =
        u32::try_from(plain.len()).map_err(|_| FrameError::Records("segment too large"))?;
    h.cipher_len = body
        .len()
        .checked_add(TAG_LEN)
        .and_then(|n| u32::try_from(n).ok())
        .filter(|&n| n <= MAX_CIPHER_LEN)
        .ok_or(FrameError::Records("segment too large"))?;
    h.zstd_level = zstd_level.clamp(i8::MIN as i32, i8::MAX as i32) as i8;
    // The receiver refuses what this build would not accept.
    h.check_range()?;
    // The header bytes are built first and are the associated data, so the
    // receiver authenticates exactly the bytes it receives.
    let mut hdr = h.encode_fields();
    key.seal(h.counter, &hdr[..AAD_LEN], &mut body)
        .map_err(|_| FrameError::Authentication)?;
    hdr[PAYLOAD_CRC_AT..HEADER_CRC_AT].copy_from_slice(&crc32c::crc32c(&body).to_le_bytes());
    let hcrc = crc32c::crc32c(&hdr[..HEADER_CRC_AT]);
    hdr[HEADER_CRC_AT..HEADER_LEN].copy_from_slice(&hcrc.to_le_bytes());
    let mut frame = Vec::with_capacity(HEADER_LEN + body.len());
    frame.extend_from_slice(&hdr);
    frame.extend_from_slice(&body);
    Ok(frame)
}

/// Checks a whole frame's structure and checksums without a key.
pub fn check(frame: &[u8]) -> Result<SegmentHeader, FrameError> {
    let (h, pcrc) = SegmentHeader::decode(frame)?;
    if frame.len() != h.frame_len() {
        return Err(FrameError::Corrupt(
            "frame length does not match the header",
        ));
    }
    if crc32c::crc32c(&frame[HEADER_LEN..]) != pcrc {
        return Err(FrameError::Corrupt("payload checksum mismatch"));
    }
    Ok(h)
}

/// Authenticates, decrypts and decompresses a frame checked by [`check`].
#[cfg(feature = "codec")]
pub fn open(h: &SegmentHeader, frame: &[u8], key: &StreamKey) -> Result<Vec<u8>, FrameError> {
    decompress(h, &authenticate(h, frame, key)?)
}

/// Authenticates and decrypts a frame checked by [`check`], returning the
/// compressed payload (the receiver verifies with this; the applier
/// decompresses later). The associated data is the frame's header bytes as
/// received, and `h` must be what they say (else
/// [`FrameError::Authentication`]: `h` is not the header authenticated).
pub fn authenticate(
    h: &SegmentHeader,
    frame: &[u8],
    key: &StreamKey,
) -> Result<Vec<u8>, FrameError> {
    let (hdr, body) = frame
        .split_at_checked(HEADER_LEN)
        .ok_or(FrameError::Corrupt("short header"))?;
    if body.len() < TAG_LEN {
        return Err(FrameError::Corrupt("ciphertext shorter than its tag"));
    }
    let aad = &hdr[..AAD_LEN];
    let mut body = body.to_vec();
    let n = key
        .open(h.counter, aad, &mut body)
        .map_err(|_| FrameError::Authentication)?;
    if h.encode_fields()[..AAD_LEN] != *aad {
        return Err(FrameError::Authentication);
    }
    body.truncate(n);
    Ok(body)
}

/// Decompresses an authenticated payload and checks its length.
#[cfg(feature = "codec")]
pub fn decompress(h: &SegmentHeader, body: &[u8]) -> Result<Vec<u8>, FrameError> {
    let mut d =
        zstd::bulk::Decompressor::new().map_err(|e| FrameError::Decompress(e.to_string()))?;
    decompress_with(&mut d, h, body)
}

/// [`decompress_with`] for a payload the caller owns: one stored as is is
/// returned without a copy.
#[cfg(feature = "codec")]
pub fn decompress_owned(
    d: &mut zstd::bulk::Decompressor<'_>,
    h: &SegmentHeader,
    body: Vec<u8>,
) -> Result<Vec<u8>, FrameError> {
    if h.features & FEATURE_ZSTD == 0 {
        check_plain_len(h, body.len())?;
        return Ok(body);
    }
    decompress_with(d, h, &body)
}

/// [`decompress`] with a reusable decompression context.
#[cfg(feature = "codec")]
pub fn decompress_with(
    d: &mut zstd::bulk::Decompressor<'_>,
    h: &SegmentHeader,
    body: &[u8],
) -> Result<Vec<u8>, FrameError> {
    if h.features & FEATURE_ZSTD == 0 {
        // Stored as is (it did not compress).
        check_plain_len(h, body.len())?;
        return Ok(body.to_vec());
    }
    let plain = d
        .decompress(body, h.plain_len as usize)
        .map_err(|e| FrameError::Decompress(e.to_string()))?;
    check_plain_len(h, plain.len())?;
    Ok(plain)
}

/// A payload's plaintext is as long as its header says.
#[cfg(feature = "codec")]
fn check_plain_len(h: &SegmentHeader, len: usize) -> Result<(), FrameError> {
    if len != h.plain_len as usize {
        return Err(FrameError::Records(
            "plaintext length does not match the header",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resync_markers_round_trip_and_junk_is_refused() {
        use resync::Marker;
        for m in [
            Marker::Begin { full: false },
            Marker::Begin { full: true },
            Marker::End,
            Marker::Data {
                region: 0,
                count: 1,
            },
            Marker::Data {
                region: (1 << 40) - 1,
                count: 65535,
            },
            Marker::Hash {
                region: 77,
                count: 1024,
            },
        ] {
            assert_eq!(Marker::from_aux(m.aux()), Some(m));
        }
        for junk in [
            0u64,
            42,
            (1 << 56) | 2,
            (1 << 56) | 3,
            2 << 56,
            4 << 56,
            5 << 56,
            (3 << 56) | 7,
        ] {
            assert_eq!(Marker::from_aux(junk), None, "{junk:#x}");
        }
    }
    use crate::keys::{Direction, KeyRing, StreamContext};

    fn key(kr: &KeyRing, stream: u8, vol: &str) -> StreamKey {
        let ctx = StreamContext {
            stream_id: [stream; 16],
            volume: vol,
            direction: Direction::Forward,
            epoch: 1,
        };
        StreamKey::derive(kr, kr.active(), &ctx).expect("derive")
    }

    fn sample() -> (SegmentHeader, Vec<u8>) {
        let recs = [
            RecordView {
                seq: 10,
                op: ring_op::WRITE,
                flags: 0,
                volume: 0,
                sector: 8,
                len: 4096,
                submit_ns: 1,
                aux: 0,
                data: &[7; 4096],
            },
            RecordView {
                seq: 11,
                op: ring_op::FLUSH,
                flags: 0,
                volume: 0,
                sector: 0,
                len: 0,
                submit_ns: 2,
                aux: 0,
                data: &[],
            },
            RecordView {
                seq: 12,
                op: OP_SKIPPED,
                flags: 0,
                volume: 1,
                sector: 16,
                len: 512,
                submit_ns: 3,
                aux: 0,
                data: &[],
            },
        ];
        let mut plain = Vec::new();
        for r in &recs {
            encode_record(&mut plain, r);
        }
        let h = SegmentHeader {
            features: 0,
            key_id: 0,
            stream_id: [1; 16],
            generation: [9; 16],
            volume_tag: crate::keys::volume_tag("vol"),
            epoch: 1,
            counter: 5,
            first_seq: 10,
            last_seq: 12,
            record_count: 3,
            plain_len: 0,
            cipher_len: 0,
            zstd_level: 0,
            source_time_ns: 3,
        };
        (h, plain)
    }

    #[test]
    fn round_trip() {
        let kr = KeyRing::generate().expect("kr");
        let k = key(&kr, 1, "vol");
        let (h, plain) = sample();
        let frame = seal(h, &plain, 1, &k).expect("seal");
        let hh = check(&frame).expect("check");
        let back = open(&hh, &frame, &k).expect("open");
        assert_eq!(back, plain);
        let recs = decode_records(&hh, &back).expect("records");
        assert_eq!(recs.len(), 3);
        assert_eq!(recs[0].data, &[7u8; 4096][..]);
        assert_eq!(recs[2].op, OP_SKIPPED);
    }

    #[test]
    fn random_data_is_stored_as_is_and_compressible_data_compressed() {
        let kr = KeyRing::generate().expect("kr");
        let k = key(&kr, 1, "vol");
        let (h, _) = sample();
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let random: Vec<u8> = (0..256 * 1024)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let mut text = random.clone();
        text[..200 * 1024].fill(0x61);
        for (what, data, zstd) in [("random", &random, false), ("mostly text", &text, true)] {
            let rec = RecordView {
                seq: 10,
                op: ring_op::WRITE,
                flags: 0,
                volume: 0,
                sector: 0,
                len: data.len() as u32,
                submit_ns: 1,
                aux: 0,
                data,
            };
            let mut plain = Vec::new();
            encode_record(&mut plain, &rec);
            let hh = SegmentHeader {
                first_seq: 10,
                last_seq: 10,
                record_count: 1,
                ..h.clone()
            };
            let frame = seal(hh, &plain, 1, &k).expect("seal");
            let got = check(&frame).expect("check");
            assert_eq!(got.features & FEATURE_ZSTD != 0, zstd, "{what}");
            if zstd {
                assert!((got.cipher_len as usize) < plain.len() / 2, "{what}");
            } else {
                assert_eq!(got.cipher_len as usize, plain.len() + TAG_LEN, "{what}");
            }
            assert_eq!(open(&got, &frame, &k).expect("open"), plain, "{what}");
            // Every flipped byte of a stored segment is caught too.
            for i in (0..frame.len()).step_by(997) {
                let mut f = frame.clone();
                f[i] ^= 0x40;
                assert!(
                    check(&f).and_then(|h| open(&h, &f, &k)).is_err(),
                    "{what}: {i}"
                );
            }
        }
    }

    #[test]
    fn every_flipped_byte_is_caught() {
        let kr = KeyRing::generate().expect("kr");
        let k = key(&kr, 1, "vol");
        let (h, plain) = sample();
        let frame = seal(h, &plain, 1, &k).expect("seal");
        for i in 0..frame.len() {
            let mut f = frame.clone();
            f[i] ^= 0x40;
            let r = check(&f).and_then(|h| open(&h, &f, &k));
            assert!(r.is_err(), "flip at {i} went unnoticed");
        }
    }

    #[test]
    fn wrong_key_or_stream_fails_authentication_not_checksum() {
        let kr = KeyRing::generate().expect("kr");
        let (h, plain) = sample();
        let frame = seal(h, &plain, 1, &key(&kr, 1, "vol")).expect("seal");
        let hh = check(&frame).expect("checksums are fine");
        assert_eq!(
            open(&hh, &frame, &key(&kr, 2, "vol")),
            Err(FrameError::Authentication)
        );
        assert_eq!(
            open(&hh, &frame, &key(&kr, 1, "other")),
            Err(FrameError::Authentication)
        );
        let other = KeyRing::generate().expect("kr2");
        assert_eq!(
            open(&hh, &frame, &key(&other, 1, "vol")),
            Err(FrameError::Authentication)
        );
    }

    /// Recomputes both checksums after a deliberate change, as a forger
    /// (who has no key) could: only the AEAD stands in the way.
    fn fix_crcs(f: &mut [u8]) {
        let pcrc = crc32c::crc32c(&f[HEADER_LEN..]);
        f[128..132].copy_from_slice(&pcrc.to_le_bytes());
        let hcrc = crc32c::crc32c(&f[..132]);
        f[132..136].copy_from_slice(&hcrc.to_le_bytes());
    }

    /// The reserved header bytes: the pad after `zstd_level` and the u64
    /// at 120.
    fn reserved() -> impl Iterator<Item = usize> {
        (109..112).chain(120..128)
    }

    fn sealed() -> (StreamKey, Vec<u8>) {
        let kr = KeyRing::generate().expect("kr");
        let k = key(&kr, 1, "vol");
        let (h, plain) = sample();
        let frame = seal(h, &plain, 1, &k).expect("seal");
        (k, frame)
    }

    #[test]
    fn reserved_header_bytes_are_zero_and_authenticated() {
        let (k, frame) = sealed();
        let hh = check(&frame).expect("check");
        assert!(reserved().all(|i| frame[i] == 0), "seal leaves them zero");
        for i in reserved() {
            for v in [1u8, 0x5a, 0xff] {
                let mut f = frame.clone();
                f[i] = v;
                fix_crcs(&mut f);
                let r = check(&f);
                assert!(
                    matches!(r, Err(FrameError::Unsupported(_))),
                    "reserved byte {i} = {v:#x}: check gave {r:?}"
                );
                assert!(SegmentHeader::decode(&f).is_err(), "decode, byte {i}");
                // A reader that skipped `check` and holds the genuine
                // header still cannot be fooled: the bytes as received are
                // the associated data.
                assert_eq!(
                    authenticate(&hh, &f, &k),
                    Err(FrameError::Authentication),
                    "reserved byte {i} = {v:#x}"
                );
            }
        }
    }

    #[test]
    fn associated_data_is_the_header_as_sent() {
        let (k, frame) = sealed();
        let hh = check(&frame).expect("check");
        // Everything before the two checksums (computed after sealing),
        // byte for byte as on the wire.
        let mut body = frame[HEADER_LEN..].to_vec();
        let n = k
            .open(hh.counter, &frame[..128], &mut body)
            .expect("the header bytes as sent are the AAD");
        assert_eq!(
            &body[..n],
            &authenticate(&hh, &frame, &k).expect("auth")[..]
        );
        for i in 0..128 {
            let mut aad = frame[..128].to_vec();
            aad[i] ^= 1;
            let mut body = frame[HEADER_LEN..].to_vec();
            assert!(k.open(hh.counter, &aad, &mut body).is_err(), "AAD byte {i}");
        }
    }

    #[test]
    fn other_segment_versions_are_unsupported() {
        assert_eq!(SEGMENT_VERSION, 2);
        let (_, frame) = sealed();
        assert_eq!(u16::from_le_bytes([frame[4], frame[5]]), SEGMENT_VERSION);
        for v in [0u16, 1, 3, u16::MAX] {
            let mut f = frame.clone();
            f[4..6].copy_from_slice(&v.to_le_bytes());
            fix_crcs(&mut f);
            assert_eq!(
                check(&f),
                Err(FrameError::Unsupported("segment version")),
                "version {v}"
            );
        }
    }

    /// `frame` with its sequence range and record count replaced (and the
    /// checksums made to match).
    fn with_range(frame: &[u8], first: u64, last: u64, count: u32) -> Vec<u8> {
        let mut f = frame.to_vec();
        f[80..88].copy_from_slice(&first.to_le_bytes());
        f[88..96].copy_from_slice(&last.to_le_bytes());
        f[96..100].copy_from_slice(&count.to_le_bytes());
        fix_crcs(&mut f);
        f
    }

    #[test]
    fn sequence_ranges_are_checked_without_wrapping() {
        let (_, frame) = sealed();
        const M: u64 = u64::MAX;
        let bad: &[(u64, u64, u32)] = &[
            // last - first + 1 wraps to 0 (and panics in a debug build).
            (0, M, 0),
            (0, M, u32::MAX),
            // Sequence 0 means "none": no record has it.
            (0, 0, 1),
            (0, 2, 3),
            // Backwards.
            (5, 4, 0),
            (5, 4, u32::MAX),
            (M, 0, 0),
            (M, 1, 0),
            // A last sequence with no successor would make every later
            // segment look like a duplicate.
            (M, M, 1),
            (M - 2, M, 3),
            (1, M, u32::MAX),
            // The span truncated to 32 bits would match.
            (1, 1 << 32, 0),
            (2, (1 << 32) + 2, 1),
            (1, 1, 0),
            (1, 3, 2),
            (1, 3, 4),
        ];
        for &(first, last, count) in bad {
            let f = with_range(&frame, first, last, count);
            let r = check(&f);
            assert!(
                matches!(r, Err(FrameError::Malformed(_))),
                "{first}..={last} with {count} records: {r:?}"
            );
            assert!(SegmentHeader::decode(&f).is_err());
        }
        let good: &[(u64, u64, u32)] = &[
            (1, 1, 1),
            (1, u64::from(u32::MAX), u32::MAX),
            (M - 1, M - 1, 1),
            (M - u64::from(u32::MAX), M - 1, u32::MAX),
        ];
        for &(first, last, count) in good {
            let h = check(&with_range(&frame, first, last, count))
                .unwrap_or_else(|e| panic!("{first}..={last} with {count}: {e}"));
            assert_eq!(
                (h.first_seq, h.last_seq, h.record_count),
                (first, last, count)
            );
        }
    }

    fn edge_u64() -> impl proptest::strategy::Strategy<Value = u64> {
        use proptest::prelude::*;
        prop_oneof![
            Just(0u64),
            Just(1),
            Just(u64::MAX),
            Just(u64::MAX - 1),
            Just(1 << 32),
            0u64..8,
            u64::MAX - 8..=u64::MAX,
            any::<u64>(),
        ]
    }

    proptest::proptest! {
        #[test]
        fn sequence_range_check_is_exactly_the_rule(
            first in edge_u64(),
            last in edge_u64(),
            count in proptest::prelude::any::<u32>(),
            matching in proptest::prelude::any::<bool>(),
        ) {
            let (_, frame) = sealed();
            // Half the cases take the count a wrapping computation
            // would expect.
            let count = if matching {
                last.wrapping_sub(first).wrapping_add(1) as u32
            } else {
                count
            };
            let want = first >= 1
                && last >= first
                && last < u64::MAX
                && u128::from(last) - u128::from(first) + 1 == u128::from(count);
            let r = check(&with_range(&frame, first, last, count));
            proptest::prop_assert_eq!(r.is_ok(), want, "{}..={} / {}: {:?}", first, last, count, r);
            if !want {
                proptest::prop_assert!(matches!(r, Err(FrameError::Malformed(_))));
            }
        }

        #[test]
        fn any_single_byte_change_is_caught(
            at in proptest::prelude::any::<proptest::sample::Index>(),
            x in 1u8..=255,
            recompute in proptest::prelude::any::<bool>(),
        ) {
            let (k, frame) = sealed();
            let i = at.index(frame.len());
            let mut f = frame.clone();
            f[i] ^= x;
            // Recomputing the checksums would undo a change to them.
            if recompute && !(128..136).contains(&i) {
                fix_crcs(&mut f);
            }
            let r = check(&f).and_then(|h| authenticate(&h, &f, &k));
            proptest::prop_assert!(r.is_err(), "byte {} ^ {:#x} went unnoticed", i, x);
        }
    }

    #[test]
    fn every_byte_change_is_caught_even_with_checksums_recomputed() {
        let (k, frame) = sealed();
        for i in 0..frame.len() {
            for x in 1..=255u8 {
                let mut f = frame.clone();
                f[i] ^= x;
                let r = check(&f).and_then(|h| authenticate(&h, &f, &k));
                assert!(r.is_err(), "byte {i} ^ {x:#x} went unnoticed");
                if (128..136).contains(&i) {
                    continue;
                }
                fix_crcs(&mut f);
                let r = check(&f).and_then(|h| authenticate(&h, &f, &k));
                assert!(
                    r.is_err(),
                    "byte {i} ^ {x:#x}, checksums recomputed, went unnoticed"
                );
            }
        }
    }

    #[test]
    fn authenticate_refuses_short_or_mismatched_frames_without_panicking() {
        let (k, frame) = sealed();
        let hh = check(&frame).expect("check");
        for len in [0, 1, HEADER_LEN - 1, HEADER_LEN, HEADER_LEN + TAG_LEN - 1] {
            assert!(authenticate(&hh, &frame[..len], &k).is_err(), "{len} bytes");
        }
        // A genuine frame with the header of another one.
        let (h, plain) = sample();
        let other = seal(
            SegmentHeader {
                first_seq: 20,
                last_seq: 22,
                ..h
            },
            &plain,
            1,
            &k,
        )
        .expect("seal");
        assert_eq!(
            authenticate(&hh, &other, &k),
            Err(FrameError::Authentication)
        );
    }

    fn one_record(seq: u64, op: u8, sector: u64, len: u32, data: &[u8]) -> Vec<u8> {
        let mut p = Vec::new();
        encode_record_parts(&mut p, seq, op, 0, 0, sector, len, 0, 0, data);
        p
    }

    #[test]
    fn record_sequences_do_not_wrap() {
        let mut plain = one_record(u64::MAX, ring_op::FLUSH, 0, 0, &[]);
        assert_eq!(
            decode_record_run(u64::MAX, 1, &plain)
                .expect("the last sequence")
                .len(),
            1
        );
        plain.extend(one_record(0, ring_op::FLUSH, 0, 0, &[]));
        assert!(matches!(
            decode_record_run(u64::MAX, 2, &plain),
            Err(FrameError::Records(_))
        ));
    }

    #[test]
    fn record_byte_ranges_must_fit() {
        const S: u64 = u64::MAX / 512;
        for (op, sector, len) in [
            (ring_op::DISCARD, S + 1, 0),
            (ring_op::FLUSH, u64::MAX, 0),
            (ring_op::WRITE_ZEROES, S, 512),
            (ring_op::DISCARD, S, u32::MAX),
        ] {
            let p = one_record(1, op, sector, len, &[]);
            let r = decode_record_run(1, 1, &p);
            assert!(
                matches!(r, Err(FrameError::Records(_))),
                "op {op} at sector {sector} + {len}: {r:?}"
            );
        }
        // The last byte of the address space is addressable.
        let p = one_record(1, ring_op::DISCARD, S, 511, &[]);
        assert_eq!(decode_record_run(1, 1, &p).expect("fits")[0].sector, S);
        // A write longer than what follows it.
        let p = one_record(1, ring_op::WRITE, 0, u32::MAX, &[1; 8]);
        assert_eq!(
            decode_record_run(1, 1, &p),
            Err(FrameError::Records("truncated payload"))
        );
    }

    /// Records the largest allocation made by each thread, so that a test
    /// can tell what a decoder sized its buffers by.
    mod peak {
        use std::alloc::{GlobalAlloc, Layout, System};
        use std::cell::Cell;

        thread_local! {
            static PEAK: Cell<usize> = const { Cell::new(0) };
        }

        pub(super) struct Peak;

        fn note(size: usize) {
            let _ = PEAK.try_with(|p| p.set(p.get().max(size)));
        }

        /// Forgets the allocations made so far on this thread.
        pub(super) fn reset() {
            PEAK.with(|p| p.set(0));
        }

        /// The largest allocation made on this thread since [`reset`].
        pub(super) fn get() -> usize {
            PEAK.with(|p| p.get())
        }

        // SAFETY: forwards every call to `System` unchanged; `note` does not
        // allocate (a const-initialised thread local of a `Cell<usize>`).
        unsafe impl GlobalAlloc for Peak {
            unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
                note(layout.size());
                // SAFETY: the caller's contract, passed on.
                unsafe { System.alloc(layout) }
            }

            unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
                note(layout.size());
                // SAFETY: the caller's contract, passed on.
                unsafe { System.alloc_zeroed(layout) }
            }

            unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
                // SAFETY: `ptr` came from `System` through this wrapper.
                unsafe { System.dealloc(ptr, layout) }
            }

            unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
                note(new_size);
                // SAFETY: the caller's contract, passed on.
                unsafe { System.realloc(ptr, layout, new_size) }
            }
        }
    }

    #[global_allocator]
    static PEAK: peak::Peak = peak::Peak;

    /// Found by fuzzing (tests/fuzz, target `frame`): the records' vector
    /// was sized by the count the header (or a spool chunk) claims, up to
    /// 65536 records (4 MiB) for a plaintext of one record.
    #[test]
    fn decoding_sizes_its_buffer_by_the_plaintext_not_the_claimed_count() {
        let plain = one_record(1, ring_op::FLUSH, 0, 0, &[]);
        for count in [2, 1 << 16, u32::MAX] {
            peak::reset();
            assert!(decode_record_run(1, count, &plain).is_err());
            let most = peak::get();
            assert!(
                most <= 4096,
                "{most} bytes allocated for a claimed {count} records"
            );
        }
        peak::reset();
        assert!(decode_record_run(1, u32::MAX, &[]).is_err());
        assert_eq!(peak::get(), 0);
    }

    #[test]
    fn more_records_than_the_count_are_refused() {
        let mut p = Vec::new();
        for s in 1..=3 {
            p.extend(one_record(s, ring_op::FLUSH, 0, 0, &[]));
        }
        assert_eq!(decode_record_run(1, 3, &p).expect("three").len(), 3);
        for count in [0, 1, 2, 4, u32::MAX] {
            assert!(
                matches!(decode_record_run(1, count, &p), Err(FrameError::Records(_))),
                "{count}"
            );
        }
    }
}
