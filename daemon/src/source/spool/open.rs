//! Opening a spool at start-up: indexing its files, cutting a torn or
//! damaged tail at the last whole chunk, removing files of another ring.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex};

use replica_proto::frame::{self};

use super::format::*;
use super::*;

impl Spool {
    /// Opens (creating) the spool in `dir` for a ring of `generation`:
    /// indexes every file, cuts a torn or damaged tail at the last whole
    /// chunk, removes files of another generation or volume (reported) and
    /// files after a gap.
    pub fn open(
        dir: &Path,
        generation: [u8; 16],
        volume_tag: [u8; 16],
        file_bytes: u64,
    ) -> Result<(Self, Recovery), SpoolError> {
        std::fs::create_dir_all(dir).map_err(|e| SpoolError::io("create", dir, e))?;
        let mut names: Vec<(u64, PathBuf)> = Vec::new();
        for ent in std::fs::read_dir(dir).map_err(|e| SpoolError::io("list", dir, e))? {
            let ent = ent.map_err(|e| SpoolError::io("list", dir, e))?;
            let name = ent.file_name();
            let Some(name) = name.to_str() else { continue };
            if let Some(seq) = parse_file_name(name) {
                names.push((seq, ent.path()));
            } else if name.ends_with(".spool.tmp") {
                let _ = std::fs::remove_file(ent.path());
            }
        }
        names.sort();
        let mut rec = Recovery::default();
        let mut files = BTreeMap::new();
        let mut next: Option<u64> = None;
        let mut logical = 0u64;
        let mut cut = false;
        for (name_seq, path) in names {
            if cut {
                rec.damage
                    .push(format!("{}: removed (after damage)", path.display()));
                remove(&path)?;
                continue;
            }
            let expect = next.unwrap_or(name_seq);
            match scan_file(&path, generation, volume_tag, name_seq, expect)? {
                Scanned::Foreign(why) => {
                    rec.other_generation |= why.contains("generation");
                    rec.damage
                        .push(format!("{}: {why}; removed", path.display()));
                    remove(&path)?;
                    // A foreign file says nothing about sequences of this ring.
                }
                Scanned::Bad(why) => {
                    rec.damage
                        .push(format!("{}: {why}; removed", path.display()));
                    remove(&path)?;
                    next = Some(expect);
                    cut = true;
                }
                Scanned::Ok {
                    len,
                    file_len,
                    next_seq,
                    chunks,
                    damage,
                } => {
                    rec.chunks += chunks;
                    if len < file_len {
                        let f = OpenOptions::new()
                            .write(true)
                            .open(&path)
                            .map_err(|e| SpoolError::io("open", &path, e))?;
                        f.set_len(len)
                            .map_err(|e| SpoolError::io("truncate", &path, e))?;
                        rec.truncated_bytes += file_len - len;
                    }
                    if let Some(d) = damage {
                        rec.damage.push(format!(
                            "{}: {d} at byte {len}; cut there ({} bytes)",
                            path.display(),
                            file_len - len
                        ));
                        cut = true;
                    }
                    if chunks == 0 {
                        // Only a header: nothing in it.
                        remove(&path)?;
                        next = Some(next_seq);
                        continue;
                    }
                    files.insert(
                        name_seq,
                        FileInfo {
                            path,
                            len,
                            next_seq,
                            base: logical,
                        },
                    );
                    logical += len;
                    next = Some(next_seq);
                }
            }
        }
        rec.next_seq = next;
        let first = files
            .iter()
            .next()
            .map(|(s, f)| (*s, f.base))
            .unwrap_or((next.unwrap_or(0), logical));
        let next_seq = next.unwrap_or(0);
        // Placed properly just below, once the spool can be read.
        let acked = AckCursor::at_end(first.0, first.1);
        let spool = Self {
            dir: dir.to_owned(),
            generation,
            volume_tag,
            file_bytes: file_bytes.max(1 << 20),
            inner: Mutex::new(Inner {
                files,
                writer: None,
                next_seq,
                logical_end: logical,
                acked,
                drops: 0,
            }),
            cond: Condvar::new(),
        };
        {
            let mut g = spool.lock();
            if !g.files.is_empty() {
                spool.set_acked(&mut g, first.0)?;
            } else {
                g.acked = AckCursor::at_end(next_seq, g.logical_end);
            }
        }
        Ok((spool, rec))
    }
}

pub(super) fn read_chunk_header(
    f: &File,
    path: &Path,
    off: u64,
) -> Result<(ChunkHeader, [u8; CHUNK_HEADER_LEN as usize]), SpoolError> {
    let mut raw = [0u8; CHUNK_HEADER_LEN as usize];
    f.read_exact_at(&mut raw, off)
        .map_err(|e| SpoolError::io("read", path, e))?;
    let (h, _) = ChunkHeader::decode(&raw).ok_or_else(|| SpoolError::Corrupt {
        path: path.to_owned(),
        message: format!("bad chunk header at byte {off}"),
    })?;
    Ok((h, raw))
}

pub(super) enum Scanned {
    /// Another generation or volume: says nothing about this ring.
    Foreign(String),
    /// Unreadable header: nothing in this file can be trusted.
    Bad(String),
    Ok {
        /// Bytes of whole, valid chunks (plus the header).
        len: u64,
        file_len: u64,
        next_seq: u64,
        chunks: u64,
        /// Why the scan stopped before the end of the file.
        damage: Option<String>,
    },
}

/// Scans the file named for record `name_seq`, whose first chunk must
/// start at `expect_first` (or start a resync gap there).
pub(super) fn scan_file(
    path: &Path,
    generation: [u8; 16],
    volume_tag: [u8; 16],
    name_seq: u64,
    expect_first: u64,
) -> Result<Scanned, SpoolError> {
    let mut f = File::open(path).map_err(|e| SpoolError::io("open", path, e))?;
    let file_len = f
        .metadata()
        .map_err(|e| SpoolError::io("stat", path, e))?
        .len();
    let mut hb = [0u8; FILE_HEADER_LEN as usize];
    if f.read_exact(&mut hb).is_err() {
        return Ok(Scanned::Bad("file shorter than its header".into()));
    }
    let fh = match FileHeader::decode(&hb) {
        Ok(h) => h,
        Err(why) => return Ok(Scanned::Bad(why.into())),
    };
    if fh.generation != generation {
        return Ok(Scanned::Foreign(format!(
            "written for ring generation {}",
            hex::encode(fh.generation)
        )));
    }
    if fh.volume_tag != volume_tag {
        return Ok(Scanned::Foreign("written for another volume".into()));
    }
    // Files are read in the order of their names: one whose name is not
    // its first record would be read out of place on a later open (after
    // a new file is started between the two), and the records after it
    // cut as damage.
    if fh.first_seq != name_seq {
        return Ok(Scanned::Bad(format!(
            "its header starts at record {}, its name at {name_seq}",
            fh.first_seq
        )));
    }
    let mut off = FILE_HEADER_LEN;
    let mut next = expect_first;
    let mut chunks = 0u64;
    let mut plain = Vec::new();
    let damage = loop {
        if off == file_len {
            break None;
        }
        if file_len - off < CHUNK_HEADER_LEN {
            break Some("torn chunk header".to_owned());
        }
        let mut raw = [0u8; CHUNK_HEADER_LEN as usize];
        f.read_exact_at(&mut raw, off)
            .map_err(|e| SpoolError::io("read", path, e))?;
        let Some((h, crc)) = ChunkHeader::decode(&raw) else {
            break Some("bad chunk header".to_owned());
        };
        if !h.follows(next) || (chunks == 0 && h.first_seq != fh.first_seq) {
            break Some(format!(
                "chunk starts at record {} where {next} was expected",
                h.first_seq
            ));
        }
        if file_len - off < h.stored_len() {
            break Some("torn chunk".to_owned());
        }
        plain.resize(h.plain_len as usize, 0);
        f.read_exact_at(&mut plain, off + CHUNK_HEADER_LEN)
            .map_err(|e| SpoolError::io("read", path, e))?;
        if !h.crc_ok(&raw, crc, &plain) {
            break Some("chunk checksum mismatch".to_owned());
        }
        if frame::decode_record_run(h.first_seq, h.count, &plain).is_err() {
            break Some("chunk records do not parse".to_owned());
        }
        off += h.stored_len();
        next = h.last_seq.wrapping_add(1);
        chunks += 1;
    };
    Ok(Scanned::Ok {
        len: off,
        file_len,
        next_seq: next,
        chunks,
        damage,
    })
}
