//! Chunk hashes of a checksum resync and an online verify.
//!
//! A resync compares the volume with the replica in fixed-size chunks
//! instead of resending every dirty region: at one ring position the source
//! hashes its chunks and puts a [`OP_CHUNK_HASHES`](crate::frame::OP_CHUNK_HASHES)
//! record in the stream; the target hashes the same chunks of the replica
//! when its apply order reaches that record and answers which differ
//! ([`crate::msg::Compared`]); only those are read and sent, at a later
//! position.
//!
//! The hash is BLAKE3 keyed with a key derived from the master key, so
//! whoever writes to the volume (a guest) cannot craft two chunks with one
//! hash and leave the replica silently different:
//!
//! ```text
//! K = HKDF-SHA256(salt = none, ikm = master[key_id],
//!                 info = LABEL | len(volume) | volume | key_id)
//! H = BLAKE3-keyed(K, offset | len | data)
//! ```
//!
//! The chunk's offset is hashed too: equal data at another offset is not
//! the same chunk.

use ring::hkdf;
use zeroize::Zeroizing;

use crate::keys::{KeyError, KeyRing};

/// Bytes of one chunk hash.
pub const HASH_LEN: usize = 32;
/// Smallest chunk a configuration may ask for.
pub const MIN_CHUNK_BYTES: u32 = 64 * 1024;
/// Largest chunk a configuration may ask for.
pub const MAX_CHUNK_BYTES: u32 = 1024 * 1024;
/// Chunks named by one hash record (and one answer), at most.
pub const MAX_CHUNKS_PER_RECORD: u32 = 1024;
/// Smallest chunk the wire format accepts (tests use small volumes).
pub const WIRE_MIN_CHUNK_BYTES: u32 = 4096;

const KDF_LABEL: &[u8] = b"dm-replica chunk hash v1";

struct Len32;

impl hkdf::KeyType for Len32 {
    fn len(&self) -> usize {
        32
    }
}

/// Derives a 32-byte key for `label` from master key `key_id`, bound to
/// `volume` (the resync cursor's authentication key uses it too).
pub fn derive_key(
    ring: &KeyRing,
    key_id: u32,
    label: &[u8],
    volume: &str,
) -> Result<Zeroizing<[u8; 32]>, KeyError> {
    let master = ring.master(key_id)?;
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, &[]).extract(master);
    let vol_len = (volume.len() as u32).to_le_bytes();
    let kid = key_id.to_le_bytes();
    let info: [&[u8]; 4] = [label, &vol_len, volume.as_bytes(), &kid];
    let mut out = Zeroizing::new([0u8; 32]);
    prk.expand(&info, Len32)
        .and_then(|okm| okm.fill(&mut out[..]))
        .map_err(|_| KeyError::UnknownKey(key_id))?;
    Ok(out)
}

/// The chunk-hash key of one volume under one master key.
#[derive(Clone)]
pub struct ChunkKey {
    key: Zeroizing<[u8; 32]>,
    key_id: u32,
}

impl std::fmt::Debug for ChunkKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChunkKey")
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

impl ChunkKey {
    /// The key of `volume` under master key `key_id`.
    pub fn derive(ring: &KeyRing, key_id: u32, volume: &str) -> Result<Self, KeyError> {
        Ok(Self {
            key: derive_key(ring, key_id, KDF_LABEL, volume)?,
            key_id,
        })
    }

    /// The master key id it was derived from.
    pub fn key_id(&self) -> u32 {
        self.key_id
    }

    /// The hash of the chunk at byte `offset` holding `data`.
    pub fn hash(&self, offset: u64, data: &[u8]) -> [u8; HASH_LEN] {
        let mut h = blake3::Hasher::new_keyed(&self.key);
        h.update(&offset.to_le_bytes());
        h.update(&(data.len() as u64).to_le_bytes());
        h.update(data);
        *h.finalize().as_bytes()
    }
}

/// Where the chunks of a hash record lie: `count` chunks of `chunk_bytes`
/// from byte `start`, the last one clipped to the volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkSpan {
    /// First byte of the first chunk.
    pub start: u64,
    /// Bytes of a chunk.
    pub chunk_bytes: u64,
    /// Chunks.
    pub count: u32,
}

impl ChunkSpan {
    /// Byte range `[offset, offset + len)` of chunk `i`, clipped to a
    /// volume of `volume_size` bytes (empty past its end).
    pub fn chunk(&self, i: u32, volume_size: u64) -> (u64, u64) {
        let off = self
            .start
            .saturating_add(u64::from(i).saturating_mul(self.chunk_bytes));
        let end = off.saturating_add(self.chunk_bytes).min(volume_size);
        (off, end.saturating_sub(off))
    }

    /// First byte after the last chunk (clipped to the volume).
    pub fn end(&self, volume_size: u64) -> u64 {
        self.start
            .saturating_add(u64::from(self.count).saturating_mul(self.chunk_bytes))
            .min(volume_size)
    }
}

/// The `aux` of a hash record: the master key id the hashes were made
/// with and the chunk size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HashAux {
    /// Master key id of the [`ChunkKey`].
    pub key_id: u32,
    /// Bytes of a chunk (a power of two, 4 KiB ..= 16 MiB).
    pub chunk_bytes: u32,
}

impl HashAux {
    /// Encodes it.
    pub fn aux(self) -> u64 {
        (u64::from(self.key_id) << 32) | u64::from(self.chunk_bytes)
    }

    /// Decodes an `aux`; `None` if the chunk size is not one.
    pub fn from_aux(aux: u64) -> Option<Self> {
        let chunk_bytes = aux as u32;
        (chunk_bytes.is_power_of_two()
            && (WIRE_MIN_CHUNK_BYTES..=16 * MAX_CHUNK_BYTES).contains(&chunk_bytes))
        .then_some(Self {
            key_id: (aux >> 32) as u32,
            chunk_bytes,
        })
    }
}

/// The hashes of a hash record's payload, one per chunk; `None` if the
/// payload is not a whole number of hashes or names too many chunks.
pub fn hashes(payload: &[u8]) -> Option<impl Iterator<Item = &[u8; HASH_LEN]>> {
    (payload.len().is_multiple_of(HASH_LEN)
        && !payload.is_empty()
        && payload.len() / HASH_LEN <= MAX_CHUNKS_PER_RECORD as usize)
        .then(|| {
            payload
                .chunks_exact(HASH_LEN)
                .filter_map(|c| <&[u8; HASH_LEN]>::try_from(c).ok())
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring() -> KeyRing {
        KeyRing::parse(
            "active = 1\n[[key]]\nid = 1\nsecret = \"0101010101010101010101010101010101010101010101010101010101010101\"\n[[key]]\nid = 2\nsecret = \"0202020202020202020202020202020202020202020202020202020202020202\"\n",
        )
        .expect("ring")
    }

    #[test]
    fn the_hash_depends_on_key_volume_offset_and_every_byte() {
        let r = ring();
        let k = ChunkKey::derive(&r, 1, "v").expect("key");
        let data = vec![7u8; 65536];
        let h = k.hash(0, &data);
        assert_eq!(h, ChunkKey::derive(&r, 1, "v").expect("key").hash(0, &data));
        assert_ne!(h, ChunkKey::derive(&r, 2, "v").expect("key").hash(0, &data));
        assert_ne!(h, ChunkKey::derive(&r, 1, "w").expect("key").hash(0, &data));
        assert_ne!(h, k.hash(65536, &data));
        assert_ne!(h, k.hash(0, &data[..65535]));
        assert_ne!(
            h,
            *blake3::hash(&data).as_bytes(),
            "keyed, not plain BLAKE3"
        );
        for i in [0, 1, 4095, 65535] {
            let mut d = data.clone();
            d[i] ^= 0x80;
            assert_ne!(h, k.hash(0, &d), "byte {i}");
        }
        assert!(matches!(
            ChunkKey::derive(&r, 9, "v"),
            Err(KeyError::UnknownKey(9))
        ));
    }

    #[test]
    fn aux_and_spans() {
        let a = HashAux {
            key_id: 7,
            chunk_bytes: 256 * 1024,
        };
        assert_eq!(HashAux::from_aux(a.aux()), Some(a));
        for bad in [0u64, 3 << 20 | 1, 1024, (1 << 32) | 3000, 64 << 20] {
            assert_eq!(HashAux::from_aux(bad), None, "{bad:#x}");
        }
        let s = ChunkSpan {
            start: 1 << 20,
            chunk_bytes: 1 << 16,
            count: 3,
        };
        let size = (1 << 20) + 2 * 65536 + 100;
        assert_eq!(s.chunk(0, size), (1 << 20, 65536));
        assert_eq!(s.chunk(2, size), ((1 << 20) + 131072, 100));
        assert_eq!(s.chunk(3, size).1, 0);
        assert_eq!(s.end(size), size);
        assert!(hashes(&[0u8; 64]).is_some_and(|h| h.count() == 2));
        assert!(hashes(&[0u8; 63]).is_none());
        assert!(hashes(&[]).is_none());
        assert!(hashes(&vec![0u8; 32 * 1025]).is_none());
    }
}
