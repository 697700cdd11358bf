//! Reading and hashing a volume's chunks (both roles: the source hashes
//! its volume at a hash marker, the target its replica at the hash record).

use std::fs::File;
use std::os::unix::fs::FileExt;

use replica_proto::chunk::{ChunkKey, ChunkSpan, HASH_LEN};

/// Threads [`hash_chunks`] uses by default: one per core, at most four.
pub fn default_workers() -> usize {
    std::thread::available_parallelism()
        .map_or(1, |p| p.get())
        .clamp(1, 4)
}

/// Reads and hashes the chunks of `span` from `file`, in parallel
/// ([`default_workers`] threads). The reads go into 4 KiB-aligned buffers
/// of whole sectors, so `file` may be open with `O_DIRECT`.
pub fn hash_chunks(
    file: &File,
    key: &ChunkKey,
    span: &ChunkSpan,
    volume_size: u64,
) -> std::io::Result<Vec<[u8; HASH_LEN]>> {
    hash_chunks_with(file, key, span, volume_size, default_workers())
}

/// [`hash_chunks`] with `workers` threads.
pub fn hash_chunks_with(
    file: &File,
    key: &ChunkKey,
    span: &ChunkSpan,
    volume_size: u64,
    workers: usize,
) -> std::io::Result<Vec<[u8; HASH_LEN]>> {
    let n = span.count as usize;
    let workers = workers.max(1).min(n.max(1));
    let mut out = vec![[0u8; HASH_LEN]; n];
    let per = n.div_ceil(workers);
    std::thread::scope(|s| -> std::io::Result<()> {
        let mut handles = Vec::new();
        for (w, slot) in out.chunks_mut(per).enumerate() {
            handles.push(s.spawn(move || -> std::io::Result<()> {
                let mut buf = AlignedBuf::new(span.chunk_bytes as usize);
                for (j, h) in slot.iter_mut().enumerate() {
                    let i = (w * per + j) as u32;
                    let (off, len) = span.chunk(i, volume_size);
                    let len = len as usize;
                    // O_DIRECT reads whole sectors; the volume is a
                    // multiple of 512 bytes.
                    let dst = &mut buf.bytes_mut()[..len];
                    file.read_exact_at(dst, off)?;
                    *h = key.hash(off, dst);
                }
                Ok(())
            }));
        }
        for h in handles {
            h.join()
                .map_err(|_| std::io::Error::other("chunk hashing thread panicked"))??;
        }
        Ok(())
    })?;
    Ok(out)
}

/// A heap buffer aligned to 4 KiB (`O_DIRECT`).
pub struct AlignedBuf {
    raw: Vec<u8>,
    at: usize,
    len: usize,
}

impl AlignedBuf {
    /// `len` bytes, zeroed.
    pub fn new(len: usize) -> Self {
        let raw = vec![0u8; len + 4096];
        let at = raw.as_ptr().align_offset(4096);
        Self { raw, at, len }
    }

    /// The aligned bytes.
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.raw[self.at..self.at + self.len]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parallel_hashes_equal_one_by_one_and_the_last_chunk_is_clipped() {
        let ring = replica_proto::keys::KeyRing::generate().expect("keys");
        let key = ChunkKey::derive(&ring, ring.active(), "v").expect("key");
        let dir = tempfile::tempdir().expect("tmp");
        let p = dir.path().join("img");
        let size = 5 * 65536 + 4096;
        let data: Vec<u8> = (0..size).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(&p, &data).expect("write");
        let f = File::open(&p).expect("open");
        let span = ChunkSpan {
            start: 65536,
            chunk_bytes: 65536,
            count: 5,
        };
        let got = hash_chunks(&f, &key, &span, size as u64).expect("hash");
        for (i, h) in got.iter().enumerate() {
            let (off, len) = span.chunk(i as u32, size as u64);
            assert_eq!(*h, key.hash(off, &data[off as usize..(off + len) as usize]));
        }
        assert_eq!(span.chunk(4, size as u64).1, 4096);
        assert_ne!(got[0], got[1]);
    }
}
