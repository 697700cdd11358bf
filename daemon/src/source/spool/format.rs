//! The spool's on-disk format: file and chunk headers, file names.

use std::path::PathBuf;

pub(super) const FILE_MAGIC: [u8; 8] = *b"DMRSPOL1";
pub(super) const FILE_VERSION: u32 = 1;
/// Bytes of a spool file's header.
pub const FILE_HEADER_LEN: u64 = 64;
pub(super) const CHUNK_MAGIC: [u8; 4] = *b"SPCK";
/// Bytes of a chunk header.
pub const CHUNK_HEADER_LEN: u64 = 64;
/// Chunk flag: the records before this chunk, from `gap_from`, are not in
/// the spool (they were tracked as dirty regions; a resync starts here).
pub(super) const CHUNK_FLAG_GAP: u32 = 1;
/// Largest chunk plaintext accepted when reading (a bound for damaged
/// lengths; writers stay far below it).
pub(super) const MAX_CHUNK_PLAIN: u32 = 64 << 20;

/// A chunk's header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkHeader {
    /// Records in the chunk.
    pub count: u32,
    /// First record's sequence.
    pub first_seq: u64,
    /// Last record's sequence.
    pub last_seq: u64,
    /// First record's submission time (ns since the epoch).
    pub first_ns: u64,
    /// Last record's submission time.
    pub last_ns: u64,
    /// Plaintext bytes that follow.
    pub plain_len: u32,
    /// Records from here up to `first_seq` are not in the spool: a resync
    /// starts with this chunk.
    pub gap_from: Option<u64>,
}

impl ChunkHeader {
    pub(super) fn encode(&self, plain: &[u8]) -> [u8; CHUNK_HEADER_LEN as usize] {
        let mut b = [0u8; CHUNK_HEADER_LEN as usize];
        b[0..4].copy_from_slice(&CHUNK_MAGIC);
        b[4..8].copy_from_slice(&self.count.to_le_bytes());
        b[8..16].copy_from_slice(&self.first_seq.to_le_bytes());
        b[16..24].copy_from_slice(&self.last_seq.to_le_bytes());
        b[24..32].copy_from_slice(&self.first_ns.to_le_bytes());
        b[32..40].copy_from_slice(&self.last_ns.to_le_bytes());
        b[40..44].copy_from_slice(&self.plain_len.to_le_bytes());
        let flags = if self.gap_from.is_some() {
            CHUNK_FLAG_GAP
        } else {
            0
        };
        b[44..48].copy_from_slice(&flags.to_le_bytes());
        b[48..56].copy_from_slice(&self.gap_from.unwrap_or(0).to_le_bytes());
        let crc = crc32c::crc32c_append(crc32c::crc32c(&b[..60]), plain);
        b[60..64].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Parses a header; the CRC is checked with the plaintext later.
    pub(super) fn decode(b: &[u8; CHUNK_HEADER_LEN as usize]) -> Option<(Self, u32)> {
        if b[0..4] != CHUNK_MAGIC {
            return None;
        }
        let u32_at = |o: usize| replica_proto::le::u32_at(b, o);
        let u64_at = |o: usize| replica_proto::le::u64_at(b, o);
        let flags = u32_at(44);
        let gap = u64_at(48);
        let h = Self {
            count: u32_at(4),
            first_seq: u64_at(8),
            last_seq: u64_at(16),
            first_ns: u64_at(24),
            last_ns: u64_at(32),
            plain_len: u32_at(40),
            gap_from: (flags & CHUNK_FLAG_GAP != 0).then_some(gap),
        };
        let sane = h.count > 0
            && flags & !CHUNK_FLAG_GAP == 0
            && h.plain_len <= MAX_CHUNK_PLAIN
            && h.last_seq.wrapping_sub(h.first_seq) == u64::from(h.count - 1)
            && h.gap_from
                .is_none_or(|g| (h.first_seq.wrapping_sub(g) as i64) >= 0);
        sane.then_some((h, u32_at(60)))
    }

    pub(super) fn crc_ok(
        &self,
        raw: &[u8; CHUNK_HEADER_LEN as usize],
        crc: u32,
        plain: &[u8],
    ) -> bool {
        plain.len() == self.plain_len as usize
            && crc32c::crc32c_append(crc32c::crc32c(&raw[..60]), plain) == crc
    }

    /// Whether it may follow a chunk (or file) ending before `next`.
    pub(super) fn follows(&self, next: u64) -> bool {
        self.first_seq == next || self.gap_from == Some(next)
    }

    /// Bytes the chunk takes in its file.
    pub fn stored_len(&self) -> u64 {
        CHUNK_HEADER_LEN + u64::from(self.plain_len)
    }
}

/// What a spool file's header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct FileHeader {
    pub(super) generation: [u8; 16],
    pub(super) volume_tag: [u8; 16],
    pub(super) first_seq: u64,
}

impl FileHeader {
    pub(super) fn encode(&self) -> [u8; FILE_HEADER_LEN as usize] {
        let mut b = [0u8; FILE_HEADER_LEN as usize];
        b[0..8].copy_from_slice(&FILE_MAGIC);
        b[8..12].copy_from_slice(&FILE_VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&(FILE_HEADER_LEN as u32).to_le_bytes());
        b[16..32].copy_from_slice(&self.generation);
        b[32..48].copy_from_slice(&self.volume_tag);
        b[48..56].copy_from_slice(&self.first_seq.to_le_bytes());
        let crc = crc32c::crc32c(&b[..60]);
        b[60..64].copy_from_slice(&crc.to_le_bytes());
        b
    }

    pub(super) fn decode(b: &[u8; FILE_HEADER_LEN as usize]) -> Result<Self, &'static str> {
        if b[0..8] != FILE_MAGIC {
            return Err("not a spool file (bad magic)");
        }
        let crc = u32::from_le_bytes([b[60], b[61], b[62], b[63]]);
        if crc32c::crc32c(&b[..60]) != crc {
            return Err("file header checksum mismatch");
        }
        if u32::from_le_bytes([b[8], b[9], b[10], b[11]]) != FILE_VERSION {
            return Err("unsupported spool file version");
        }
        let mut generation = [0u8; 16];
        generation.copy_from_slice(&b[16..32]);
        let mut volume_tag = [0u8; 16];
        volume_tag.copy_from_slice(&b[32..48]);
        let mut s = [0u8; 8];
        s.copy_from_slice(&b[48..56]);
        Ok(Self {
            generation,
            volume_tag,
            first_seq: u64::from_le_bytes(s),
        })
    }
}

pub(super) fn file_name(first_seq: u64) -> String {
    format!("{first_seq:020}.spool")
}

pub(super) fn parse_file_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(".spool")?;
    (digits.len() == 20 && digits.bytes().all(|b| b.is_ascii_digit()))
        .then(|| digits.parse().ok())
        .flatten()
}

/// One spool file as indexed in memory.
#[derive(Debug, Clone)]
pub(super) struct FileInfo {
    pub(super) path: PathBuf,
    /// Bytes of whole chunks (plus the header).
    pub(super) len: u64,
    /// Sequence after its last chunk.
    pub(super) next_seq: u64,
    /// Logical spool offset of the file's byte 0.
    pub(super) base: u64,
}
