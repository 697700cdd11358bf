//! Reading the spool back in order, from any sequence on.

use std::fs::File;
use std::os::unix::fs::FileExt;

use replica_proto::frame::{self};

use super::format::*;
use super::*;

/// Reads chunks in order from a sequence on.
pub struct SpoolReader<'a> {
    pub(super) spool: &'a Spool,
    /// Next sequence wanted.
    pub(super) seq: u64,
    /// File key and offset of the next chunk to read, once located.
    pub(super) pos: Option<(u64, u64)>,
    pub(super) file: Option<(u64, File)>,
    pub(super) drops: u64,
}

impl SpoolReader<'_> {
    /// Next sequence this reader returns.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// The spool's drop count this reader started with.
    pub fn drops(&self) -> u64 {
        self.drops
    }

    /// The next chunk (records from [`Self::seq`] on), or `None` if the
    /// spool holds nothing more yet.
    pub fn next_chunk(&mut self) -> Result<Option<Chunk>, SpoolError> {
        loop {
            let (key, off, fi) = {
                let g = self.spool.lock();
                if g.drops != self.drops {
                    return Err(SpoolError::Dropped);
                }
                if (g.next_seq.wrapping_sub(self.seq) as i64) <= 0 {
                    return Ok(None);
                }
                let (key, off) = match self.pos {
                    Some(p) => p,
                    None => {
                        let Some((&k, _)) = g
                            .files
                            .iter()
                            .find(|(_, f)| (f.next_seq.wrapping_sub(self.seq) as i64) > 0)
                        else {
                            return Err(SpoolError::Corrupt {
                                path: self.spool.dir.clone(),
                                message: format!("record {} is no longer in the spool", self.seq),
                            });
                        };
                        (k, FILE_HEADER_LEN)
                    }
                };
                let Some(fi) = g.files.get(&key) else {
                    if self.pos.is_some() {
                        // The file was acknowledged whole and deleted (the
                        // target has everything in it): find the next one.
                        self.pos = None;
                        continue;
                    }
                    return Err(SpoolError::Corrupt {
                        path: self.spool.dir.clone(),
                        message: format!("record {} is no longer in the spool", self.seq),
                    });
                };
                if off >= fi.len {
                    // End of this file: on to the next one.
                    if let Some((&next_key, _)) = g.files.range(key.wrapping_add(1)..).next() {
                        self.pos = Some((next_key, FILE_HEADER_LEN));
                        continue;
                    }
                    return Ok(None);
                }
                (key, off, fi.clone())
            };
            if self.file.as_ref().is_none_or(|(k, _)| *k != key) {
                let f = File::open(&fi.path).map_err(|e| SpoolError::io("open", &fi.path, e))?;
                self.file = Some((key, f));
            }
            let Some((_, f)) = &self.file else {
                return Ok(None);
            };
            let (h, raw) = read_chunk_header(f, &fi.path, off)?;
            let next_off = off + h.stored_len();
            self.pos = Some((key, next_off));
            if (h.last_seq.wrapping_sub(self.seq) as i64) < 0 {
                // Entirely before what we want (locating from the file start).
                continue;
            }
            let mut plain = vec![0u8; h.plain_len as usize];
            f.read_exact_at(&mut plain, off + CHUNK_HEADER_LEN)
                .map_err(|e| SpoolError::io("read", &fi.path, e))?;
            let crc = u32::from_le_bytes([raw[60], raw[61], raw[62], raw[63]]);
            if !h.crc_ok(&raw, crc, &plain) {
                return Err(SpoolError::Corrupt {
                    path: fi.path.clone(),
                    message: format!("chunk at byte {off} fails its checksum"),
                });
            }
            let mut chunk = Chunk {
                first_seq: h.first_seq,
                last_seq: h.last_seq,
                count: h.count,
                last_ns: h.last_ns,
                gap_from: h.gap_from,
                plain,
            };
            if (self.seq.wrapping_sub(h.first_seq) as i64) > 0 {
                chunk = skip_to(chunk, self.seq).map_err(|m| SpoolError::Corrupt {
                    path: fi.path.clone(),
                    message: m,
                })?;
            }
            self.seq = h.last_seq.wrapping_add(1);
            return Ok(Some(chunk));
        }
    }
}

/// Drops the records of `c` before `seq`.
pub(super) fn skip_to(c: Chunk, seq: u64) -> Result<Chunk, String> {
    let recs = frame::decode_record_run(c.first_seq, c.count, &c.plain)
        .map_err(|e| format!("chunk at {}: {e}", c.first_seq))?;
    let mut plain = Vec::with_capacity(c.plain.len());
    let mut count = 0u32;
    for r in recs
        .iter()
        .filter(|r| (r.seq.wrapping_sub(seq) as i64) >= 0)
    {
        frame::encode_record(&mut plain, r);
        count += 1;
    }
    if count == 0 {
        return Err(format!("chunk at {} does not hold {seq}", c.first_seq));
    }
    Ok(Chunk {
        first_seq: seq,
        last_seq: c.last_seq,
        count,
        last_ns: c.last_ns,
        gap_from: None,
        plain,
    })
}
