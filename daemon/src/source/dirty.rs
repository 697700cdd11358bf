//! Dirty-region maps and the source's persistent "needs resync" state.
//!
//! When the stream of records cannot carry every write any more (the spool
//! reached its limit or its disk is full, the kernel ring overflowed, the
//! spool lost records), the source records *which regions* changed instead
//! of *what* changed. The map is saved before the ring records it covers are
//! released, so a killed daemon never forgets a write; a resync later sends
//! the current content of every dirty region.

use std::path::Path;

use replica_fs::write_atomic;

const MAGIC: [u8; 8] = *b"DMRDIRT2";
const VERSION: u32 = 2;
const HEADER_LEN: usize = 8 + 4 + 4 + 16 + 8 + 8 + 8 + 8 + 4;
/// Bytes of the trailer: the key id and the MAC.
const TRAILER_LEN: usize = 4 + 32;
/// The label of the cursor's authentication key (see [`CursorKeys`]).
const CURSOR_LABEL: &[u8] = b"dm-replica resync cursor v1";

/// A bitmap of fixed-size regions of a volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtyMap {
    volume_size: u64,
    region_bytes: u64,
    words: Vec<u64>,
    set: u64,
}

impl DirtyMap {
    /// An empty map of `volume_size` bytes in regions of `region_bytes` (a
    /// power of two, at least 4 KiB).
    pub fn new(volume_size: u64, region_bytes: u64) -> Self {
        let region_bytes = region_bytes.max(4096).next_power_of_two();
        let regions = volume_size.div_ceil(region_bytes);
        Self {
            volume_size,
            region_bytes,
            words: vec![0; regions.div_ceil(64) as usize],
            set: 0,
        }
    }

    /// Region size in bytes.
    pub fn region_bytes(&self) -> u64 {
        self.region_bytes
    }

    /// Number of regions.
    pub fn regions(&self) -> u64 {
        self.volume_size.div_ceil(self.region_bytes)
    }

    /// Volume size in bytes.
    pub fn volume_size(&self) -> u64 {
        self.volume_size
    }

    /// Regions set.
    pub fn count(&self) -> u64 {
        self.set
    }

    /// Sets region `r`.
    pub fn set_region(&mut self, r: u64) {
        if r >= self.regions() {
            return;
        }
        if let Some(w) = self.words.get_mut((r / 64) as usize) {
            let bit = 1u64 << (r % 64);
            if *w & bit == 0 {
                *w |= bit;
                self.set += 1;
            }
        }
    }

    /// Whether region `r` is set.
    pub fn is_set(&self, r: u64) -> bool {
        self.words
            .get((r / 64) as usize)
            .is_some_and(|w| w & (1 << (r % 64)) != 0)
    }

    /// Marks every region touched by `len` bytes at byte `offset` (clipped
    /// to the volume).
    pub fn mark(&mut self, offset: u64, len: u64) {
        if len == 0 || offset >= self.volume_size {
            return;
        }
        let end = offset.saturating_add(len).min(self.volume_size);
        let first = offset / self.region_bytes;
        let last = (end - 1) / self.region_bytes;
        for r in first..=last {
            self.set_region(r);
        }
    }

    /// Clears `count` regions from `first` (sent by a resync).
    pub fn clear(&mut self, first: u64, count: u64) {
        for r in first..first.saturating_add(count).min(self.regions()) {
            if let Some(w) = self.words.get_mut((r / 64) as usize) {
                let bit = 1u64 << (r % 64);
                if *w & bit != 0 {
                    *w &= !bit;
                    self.set -= 1;
                }
            }
        }
    }

    /// The first run of set regions at or after `from`, at most `max` long:
    /// `(first, count)`.
    pub fn next_run(&self, from: u64, max: u64) -> Option<(u64, u64)> {
        let n = self.regions();
        let mut r = from;
        while r < n {
            let w = self.words.get((r / 64) as usize).copied().unwrap_or(0) >> (r % 64);
            if w == 0 {
                r = (r / 64 + 1) * 64;
                continue;
            }
            r += u64::from(w.trailing_zeros());
            break;
        }
        if r >= n {
            return None;
        }
        let mut end = r + 1;
        while end < n && end - r < max.max(1) && self.is_set(end) {
            end += 1;
        }
        Some((r, end - r))
    }

    /// The first region in `from..to` set here, in every map of `and` and
    /// in none of `not` (maps of this one's geometry), found a 64-region
    /// word at a time.
    pub fn first_masked(
        &self,
        and: &[&DirtyMap],
        not: &[&DirtyMap],
        from: u64,
        to: u64,
    ) -> Option<u64> {
        let to = to.min(self.regions());
        let word = |m: &DirtyMap, i: usize| m.words.get(i).copied().unwrap_or(0);
        let mut r = from;
        while r < to {
            let i = (r / 64) as usize;
            let mut w = word(self, i);
            for m in and {
                w &= word(m, i);
            }
            for m in not {
                w &= !word(m, i);
            }
            w >>= r % 64;
            if w != 0 {
                let found = r + u64::from(w.trailing_zeros());
                return (found < to).then_some(found);
            }
            r = (r / 64 + 1) * 64;
        }
        None
    }

    /// Marks the whole volume.
    pub fn mark_all(&mut self) {
        for r in 0..self.regions() {
            self.set_region(r);
        }
    }

    /// Adds the regions of another map (any region size) of the same volume.
    pub fn merge_regions(&mut self, region_bytes: u64, regions: impl Iterator<Item = u64>) {
        for r in regions {
            self.mark(r.saturating_mul(region_bytes), region_bytes);
        }
    }

    /// The set regions, in order.
    pub fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        (0..self.regions()).filter(|&r| self.is_set(r))
    }

    /// Bytes covered by set regions (the last region clipped to the volume).
    pub fn dirty_bytes(&self) -> u64 {
        self.iter()
            .map(|r| {
                let start = r * self.region_bytes;
                (start + self.region_bytes).min(self.volume_size) - start
            })
            .sum()
    }
}

/// The source's record of a volume that needs a resync.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResyncState {
    /// Ring generation the map belongs to.
    pub generation: [u8; 16],
    /// First record the target will not receive through the stream: the
    /// replica can be made consistent up to `since_seq - 1` from the spool,
    /// and needs the map's regions beyond that.
    pub since_seq: u64,
    /// Why.
    pub reason: String,
    /// Regions changed since `since_seq` (at least) and not yet resent.
    pub map: DirtyMap,
    /// The resync that sends them started at this record (its BEGIN
    /// marker), if it has.
    pub begin_seq: Option<u64>,
    /// Regions of `map` a comparison found different on the target: sent
    /// without comparing again (same region size as `map`).
    pub differ: DirtyMap,
    /// The resync's BEGIN said it covers every chunk (a target that needs
    /// a full copy counts on it).
    pub full: bool,
}

/// Errors reading the resync state.
#[derive(Debug, thiserror::Error)]
pub enum ResyncStateError {
    /// Cannot read or write it.
    #[error("resync state {path}: {source}")]
    Io {
        /// File.
        path: String,
        /// Error.
        #[source]
        source: std::io::Error,
    },
    /// Damaged, of another version, or not this volume's.
    #[error("resync state {path}: {message}")]
    Damaged {
        /// File.
        path: String,
        /// What is wrong.
        message: &'static str,
    },
    /// Cannot be saved.
    #[error(transparent)]
    Save(#[from] replica_fs::IoError),
}

/// The keys that authenticate the resync cursor: derived from the master
/// keys with the volume's name, so a cursor edited by hand, damaged, or
/// copied from another volume is refused (and the resync starts over).
pub struct CursorKeys<'a> {
    /// The key ring.
    pub ring: &'a replica_proto::keys::KeyRing,
    /// The volume.
    pub volume: &'a str,
}

impl CursorKeys<'_> {
    /// `body` with the trailer that authenticates it: the ring's active key
    /// id and the MAC of everything before it.
    pub fn seal(&self, mut body: Vec<u8>) -> Vec<u8> {
        let key_id = self.ring.active();
        body.extend_from_slice(&key_id.to_le_bytes());
        let mac = self.mac(key_id, &body).map_or([0; 32], |h| *h.as_bytes());
        body.extend_from_slice(&mac);
        body
    }

    /// The MAC of `body` under key `key_id` (its comparison with bytes is
    /// constant-time).
    fn mac(&self, key_id: u32, body: &[u8]) -> Option<blake3::Hash> {
        let key =
            replica_proto::chunk::derive_key(self.ring, key_id, CURSOR_LABEL, self.volume).ok()?;
        Some(blake3::keyed_hash(&key, body))
    }
}

impl ResyncState {
    /// A state that needs `map`'s regions since `since_seq`.
    pub fn new(generation: [u8; 16], since_seq: u64, reason: String, map: DirtyMap) -> Self {
        let differ = DirtyMap::new(map.volume_size(), map.region_bytes());
        Self {
            generation,
            since_seq,
            reason,
            map,
            begin_seq: None,
            differ,
            full: false,
        }
    }

    /// Encodes it, authenticated with the ring's active key.
    pub fn encode(&self, keys: &CursorKeys<'_>) -> Vec<u8> {
        let reason = self.reason.as_bytes();
        let mut b =
            Vec::with_capacity(HEADER_LEN + reason.len() + self.map.words.len() * 16 + TRAILER_LEN);
        b.extend_from_slice(&MAGIC);
        b.extend_from_slice(&VERSION.to_le_bytes());
        b.extend_from_slice(&u32::from(self.full).to_le_bytes());
        b.extend_from_slice(&self.generation);
        b.extend_from_slice(&self.map.volume_size.to_le_bytes());
        b.extend_from_slice(&self.map.region_bytes.to_le_bytes());
        b.extend_from_slice(&self.since_seq.to_le_bytes());
        b.extend_from_slice(
            &self
                .begin_seq
                .map_or(0, |s| s.wrapping_add(1))
                .to_le_bytes(),
        );
        b.extend_from_slice(&(reason.len() as u32).to_le_bytes());
        b.extend_from_slice(reason);
        for w in self.map.words.iter().chain(&self.differ.words) {
            b.extend_from_slice(&w.to_le_bytes());
        }
        keys.seal(b)
    }

    /// Decodes what [`Self::encode`] wrote for the same volume with a key
    /// still in the ring.
    pub fn decode(b: &[u8], keys: &CursorKeys<'_>) -> Result<Self, &'static str> {
        if b.len() < HEADER_LEN + TRAILER_LEN || b[0..8] != MAGIC {
            return Err(if b.starts_with(b"DMRDIRT") {
                "a resync state of another version"
            } else {
                "not a resync state file"
            });
        }
        let (body, mac) = b.split_at(b.len() - 32);
        let key_id = replica_proto::le::u32_at(body, body.len() - 4);
        let want = keys
            .mac(key_id, body)
            .ok_or("authenticated with a key no longer in the key ring")?;
        // Constant time (blake3's comparison): a secret-keyed check.
        if want != *mac {
            return Err("authentication failed (damaged, edited, or another volume's)");
        }
        let body = &body[..body.len() - 4];
        let u32_at = |o: usize| replica_proto::le::u32_at(b, o);
        let u64_at = |o: usize| replica_proto::le::u64_at(b, o);
        if u32_at(8) != VERSION {
            return Err("unsupported version");
        }
        let flags = u32_at(12);
        if flags & !1 != 0 {
            return Err("unknown flags");
        }
        let mut generation = [0u8; 16];
        generation.copy_from_slice(&b[16..32]);
        let volume_size = u64_at(32);
        let region_bytes = u64_at(40);
        let since_seq = u64_at(48);
        let begin = u64_at(56);
        let rlen = u32_at(64) as usize;
        if !region_bytes.is_power_of_two() || region_bytes < 4096 {
            return Err("bad region size");
        }
        let reason = body
            .get(HEADER_LEN..HEADER_LEN + rlen)
            .and_then(|r| std::str::from_utf8(r).ok())
            .ok_or("bad reason")?
            .to_owned();
        // The bitmaps' length is checked before anything is sized by the
        // volume size it names.
        let words = &body[HEADER_LEN + rlen..];
        let regions = volume_size.div_ceil(region_bytes);
        if regions.div_ceil(64).checked_mul(16) != Some(words.len() as u64) {
            return Err("bitmap length does not match the volume");
        }
        let mut map = DirtyMap::new(volume_size, region_bytes);
        let mut differ = DirtyMap::new(volume_size, region_bytes);
        let n = map.words.len();
        for (i, w) in map
            .words
            .iter_mut()
            .chain(differ.words.iter_mut())
            .enumerate()
        {
            *w = replica_proto::le::u64_at(words, i * 8);
        }
        // No bit past the last region (it could never be cleared: a resync
        // would never end).
        if regions % 64 != 0 {
            let pad = !0u64 << (regions % 64);
            if map.words[n - 1] & pad != 0 || differ.words[n - 1] & pad != 0 {
                return Err("regions set past the end of the volume");
            }
        }
        map.set = map.words.iter().map(|w| u64::from(w.count_ones())).sum();
        differ.set = differ.words.iter().map(|w| u64::from(w.count_ones())).sum();
        Ok(Self {
            generation,
            since_seq,
            reason,
            map,
            begin_seq: begin.checked_sub(1),
            differ,
            full: flags & 1 != 0,
        })
    }

    /// Saves it atomically and durably.
    pub fn save(&self, path: &Path, keys: &CursorKeys<'_>) -> Result<(), ResyncStateError> {
        Ok(write_atomic(path, &self.encode(keys))?)
    }

    /// Loads it; `None` if there is none.
    pub fn load(path: &Path, keys: &CursorKeys<'_>) -> Result<Option<Self>, ResyncStateError> {
        let b = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(ResyncStateError::Io {
                    path: path.display().to_string(),
                    source,
                })
            }
        };
        Self::decode(&b, keys)
            .map(Some)
            .map_err(|message| ResyncStateError::Damaged {
                path: path.display().to_string(),
                message,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_exactly_the_regions_touched() {
        let mut m = DirtyMap::new(1 << 20, 65536);
        assert_eq!(m.regions(), 16);
        m.mark(65535, 2);
        m.mark(5 * 65536, 65536);
        m.mark(0, 0);
        m.mark(15 * 65536 + 10, 1 << 30); // clipped at the end
        assert_eq!(m.iter().collect::<Vec<_>>(), vec![0, 1, 5, 15]);
        assert_eq!(m.count(), 4);
        m.mark(65536, 1);
        assert_eq!(m.count(), 4);
        m.merge_regions(4096, [32u64, 33, 200].into_iter());
        // 4 KiB regions 32 and 33 lie in 64 KiB region 2, 200 in region 12.
        assert_eq!(m.iter().collect::<Vec<_>>(), vec![0, 1, 2, 5, 12, 15]);
    }

    #[test]
    fn volume_not_a_multiple_of_the_region_size() {
        let mut m = DirtyMap::new(65536 * 3 + 512, 65536);
        assert_eq!(m.regions(), 4);
        m.mark_all();
        assert_eq!(m.count(), 4);
        assert_eq!(m.dirty_bytes(), 65536 * 3 + 512);
    }

    /// `b` with bytes `at..` replaced by `with`, sealed again with the
    /// ring's active key (what a holder of the key could write).
    fn resealed(b: &[u8], at: usize, with: &[u8], keys: &CursorKeys<'_>) -> Vec<u8> {
        let mut body = b[..b.len() - TRAILER_LEN].to_vec();
        body[at..at + with.len()].copy_from_slice(with);
        keys.seal(body)
    }

    #[test]
    fn an_authentic_cursor_with_impossible_geometry_is_refused_before_any_allocation() {
        // 100 regions: two words per bitmap, 28 padding bits in the last.
        let mut map = DirtyMap::new(100 * 65536, 65536);
        map.mark_all();
        let s = ResyncState::new([3; 16], 1, "r".into(), map);
        let ring = replica_proto::keys::KeyRing::generate().expect("keys");
        let keys = CursorKeys {
            ring: &ring,
            volume: "v",
        };
        let b = s.encode(&keys);
        assert_eq!(
            resealed(&b, 0, &b[..8], &keys),
            b,
            "resealing itself is exact"
        );
        // A volume of 16 EiB: refused on the bitmap length, nothing sized
        // by it (a test that allocated it would abort).
        let huge = resealed(&b, 32, &u64::MAX.to_le_bytes(), &keys);
        assert_eq!(
            ResyncState::decode(&huge, &keys),
            Err("bitmap length does not match the volume")
        );
        // A region past the end set (it could never be resent).
        let words_at = HEADER_LEN + 1;
        let mut last = u64::MAX.to_le_bytes();
        last[7] = 0xff;
        let padded = resealed(&b, words_at + 8, &last, &keys);
        assert_eq!(
            ResyncState::decode(&padded, &keys),
            Err("regions set past the end of the volume")
        );
        let in_differ = resealed(&b, words_at + 24, &(1u64 << 40).to_le_bytes(), &keys);
        assert_eq!(
            ResyncState::decode(&in_differ, &keys),
            Err("regions set past the end of the volume")
        );
        // The last real region (99: bit 35 of the second word) is fine.
        let ok = resealed(&b, words_at + 24, &(1u64 << 35).to_le_bytes(), &keys);
        let got = ResyncState::decode(&ok, &keys).expect("decodes");
        assert!(got.differ.is_set(99) && got.differ.count() == 1);
    }

    #[test]
    fn state_round_trips_and_damage_is_detected() {
        let mut map = DirtyMap::new(10 << 20, 65536);
        map.mark(123 * 4096, 100_000);
        map.mark(9 << 20, 1);
        let mut s = ResyncState::new([3; 16], 4242, "spool limit reached".into(), map);
        s.begin_seq = Some(5000);
        s.differ.set_region(40);
        s.full = true;
        let ring = replica_proto::keys::KeyRing::generate().expect("keys");
        let keys = CursorKeys {
            ring: &ring,
            volume: "v",
        };
        let b = s.encode(&keys);
        assert_eq!(ResyncState::decode(&b, &keys), Ok(s.clone()));
        // Every byte is covered: a flipped one anywhere is refused.
        for i in 0..b.len() {
            let mut d = b.clone();
            d[i] ^= 1;
            assert!(ResyncState::decode(&d, &keys).is_err(), "byte {i}");
        }
        assert!(ResyncState::decode(&b[..b.len() - 9], &keys).is_err());
        // Another volume's cursor, or one made under another key ring.
        let other = CursorKeys {
            ring: &ring,
            volume: "w",
        };
        assert!(ResyncState::decode(&b, &other).is_err());
        let ring2 = replica_proto::keys::KeyRing::generate().expect("keys");
        let foreign = CursorKeys {
            ring: &ring2,
            volume: "v",
        };
        assert!(ResyncState::decode(&b, &foreign).is_err());
        // A version 1 file (CRC only) is not taken.
        let mut v1 = b"DMRDIRT1".to_vec();
        v1.resize(200, 0);
        assert_eq!(
            ResyncState::decode(&v1, &keys),
            Err("a resync state of another version")
        );
        let dir = tempfile::tempdir().expect("tmp");
        let p = dir.path().join("resync.state");
        assert_eq!(ResyncState::load(&p, &keys).expect("load"), None);
        s.save(&p, &keys).expect("save");
        assert_eq!(ResyncState::load(&p, &keys).expect("load"), Some(s.clone()));
        let none = ResyncState {
            begin_seq: None,
            ..s
        };
        assert_eq!(ResyncState::decode(&none.encode(&keys), &keys), Ok(none));
    }

    #[test]
    fn runs_and_clearing() {
        let mut m = DirtyMap::new(200 * 65536, 65536);
        m.mark(3 * 65536, 4 * 65536); // 3..=6
        m.mark(64 * 65536, 1); // 64
        m.mark(130 * 65536, 3 * 65536); // 130..=132
        assert_eq!(m.next_run(0, 16), Some((3, 4)));
        assert_eq!(m.next_run(0, 2), Some((3, 2)));
        assert_eq!(m.next_run(5, 16), Some((5, 2)));
        assert_eq!(m.next_run(7, 16), Some((64, 1)));
        assert_eq!(m.next_run(65, 16), Some((130, 3)));
        assert_eq!(m.next_run(133, 16), None);
        m.clear(3, 4);
        m.clear(131, 1);
        assert_eq!(m.count(), 3);
        assert_eq!(m.iter().collect::<Vec<_>>(), vec![64, 130, 132]);
    }
}
