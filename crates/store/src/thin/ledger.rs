//! The ledger of a thin pool: which thin device ids replicad uses in it, and
//! what for.
//!
//! One file per pool, `<dir>/<pool>.ledger`, shared by every volume whose
//! replica lives in that pool. Each change is one read-modify-write under an
//! exclusive `flock` of `<dir>/<pool>.lock` (so volumes applied by different
//! threads, or `replctl`, never allocate the same id), written atomically
//! (temporary file, fsync, rename, fsync of the directory).
//!
//! An id is entered **before** the device is created (`create_thin`,
//! `create_snap`) and removed only **after** it is deleted from the pool,
//! so an entry is an intent: after a crash, the device may or may not
//! exist, but it is never a device nobody knows about. Ids are reused once
//! free (the pool's id space is 24 bits; a volume with a recovery point per
//! second would exhaust a counter in months).
//!
//! The file is `Contents` in JSON through serde, laid out with one device
//! per line so shell tools can read it: `{"pool":"pool0","version":1,
//! "devices":[` / `{"id":1,"volume":"db1","kind":"replica"},` / ... /
//! `]}`. Any JSON layout of the same contents reads back.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::StoreError;

/// Largest thin device id (dm-thin ids are 24 bits).
pub const MAX_DEVICE_ID: u32 = (1 << 24) - 1;

const LEDGER_VERSION: u32 = 1;

/// What a device id is used for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// A volume's replica.
    Replica,
    /// A recovery point (thin snapshot of the replica).
    Point,
    /// A writable copy of a recovery point (test failover).
    Clone,
    /// An id found taken in the pool by something else: never allocated,
    /// never deleted.
    Foreign,
}

/// One thin device id in use.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    /// Thin device id in the pool.
    pub id: u32,
    /// Volume it belongs to ("" for foreign ids).
    pub volume: String,
    /// What it is.
    pub kind: Kind,
    /// Recovery point id (points and clones).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub point: Option<u64>,
    /// Deletion was attempted but the device was busy (opened by someone):
    /// retried later.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub doomed: bool,
    /// The device is known to exist in the pool (set once it was created
    /// or adopted; a replica marked so that is missing was deleted behind
    /// replicad's back, and is not silently created anew).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub created: bool,
}

impl Entry {
    /// A new entry, not yet created in the pool.
    fn new(id: u32, volume: &str, kind: Kind, point: Option<u64>) -> Self {
        Self {
            id,
            volume: volume.to_owned(),
            kind,
            point,
            doomed: false,
            created: false,
        }
    }
}

/// The ledger file. The fields are in the order earlier versions wrote
/// them, so an unchanged ledger is rewritten byte for byte.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Contents {
    /// The pool it is for.
    pool: String,
    /// [`LEDGER_VERSION`].
    version: u32,
    /// One entry per id in use, by id.
    devices: Vec<Entry>,
}

/// A pool's ledger (the path; every operation locks, reads and writes it).
#[derive(Debug, Clone)]
pub struct Ledger {
    pool: String,
    path: PathBuf,
    lock: PathBuf,
    ops_lock: PathBuf,
}

/// A lock, held while it lives.
pub struct Locked(File);

impl Drop for Locked {
    fn drop(&mut self) {
        // SAFETY: plain syscall on an fd we own; closing would release the
        // lock as well.
        unsafe { libc::flock(self.0.as_raw_fd(), libc::LOCK_UN) };
    }
}

impl Ledger {
    /// The ledger of `pool` in `dir` (created if missing).
    pub fn new(dir: &Path, pool: &str) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| StoreError::io("create ledger directory", dir, e))?;
        Ok(Self {
            pool: pool.to_owned(),
            path: dir.join(format!("{pool}.ledger")),
            lock: dir.join(format!("{pool}.lock")),
            ops_lock: dir.join(format!("{pool}.ops.lock")),
        })
    }

    /// Serialises device operations that must not interleave between
    /// processes (a snapshot's suspend..resume, and the resume of a replica
    /// a crash left suspended). Separate from the ledger's own lock, which
    /// is taken inside.
    pub fn hold_device_ops(&self) -> Result<Locked, StoreError> {
        flock(&self.ops_lock)
    }

    /// The ledger file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn lock(&self) -> Result<Locked, StoreError> {
        flock(&self.lock)
    }

    fn read(&self) -> Result<Contents, StoreError> {
        match std::fs::read(&self.path) {
            Ok(b) => {
                let c: Contents = serde_json::from_slice(&b).map_err(|e| StoreError::Corrupt {
                    path: self.path.clone(),
                    offset: 0,
                    why: e.to_string(),
                })?;
                if c.version != LEDGER_VERSION || c.pool != self.pool {
                    return Err(StoreError::Invalid(format!(
                        "{}: ledger version {} of pool {:?}, expected version {LEDGER_VERSION} of pool {:?}",
                        self.path.display(),
                        c.version,
                        c.pool,
                        self.pool
                    )));
                }
                Ok(c)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Contents {
                version: LEDGER_VERSION,
                pool: self.pool.clone(),
                devices: Vec::new(),
            }),
            Err(e) => Err(StoreError::io("read ledger", &self.path, e)),
        }
    }

    fn write(&self, c: &Contents) -> Result<(), StoreError> {
        Ok(replica_fs::write_atomic(&self.path, &to_text(c)?)?)
    }

    /// Runs `f` on the contents under the lock and writes them back if `f`
    /// changed them.
    fn update<T>(
        &self,
        f: impl FnOnce(&mut Vec<Entry>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let _l = self.lock()?;
        let mut c = self.read()?;
        let before = c.devices.clone();
        let r = f(&mut c.devices)?;
        if c.devices != before {
            c.devices.sort_by_key(|d| d.id);
            self.write(&c)?;
        }
        Ok(r)
    }

    /// Every entry, by id.
    pub fn entries(&self) -> Result<Vec<Entry>, StoreError> {
        let _l = self.lock()?;
        Ok(self.read()?.devices)
    }

    /// The entries of `volume`.
    pub fn volume_entries(&self, volume: &str) -> Result<Vec<Entry>, StoreError> {
        Ok(self
            .entries()?
            .into_iter()
            .filter(|e| e.volume == volume && e.kind != Kind::Foreign)
            .collect())
    }

    /// Enters the lowest free id for `volume`'s `kind` (durably) and
    /// returns it.
    pub fn allocate(
        &self,
        volume: &str,
        kind: Kind,
        point: Option<u64>,
    ) -> Result<u32, StoreError> {
        self.update(|devs| {
            let mut ids: Vec<u32> = devs.iter().map(|d| d.id).collect();
            ids.sort_unstable();
            let mut id = 1u32;
            for used in ids {
                if used == id {
                    id += 1;
                } else if used > id {
                    break;
                }
            }
            if id > MAX_DEVICE_ID {
                return Err(StoreError::Invalid(format!(
                    "thin pool {}: all {MAX_DEVICE_ID} device ids are in use",
                    self.pool
                )));
            }
            devs.push(Entry::new(id, volume, kind, point));
            Ok(id)
        })
    }

    /// Enters `id` for `volume`'s `kind`. Already entered for the same use
    /// is fine; entered for anything else is an error.
    pub fn claim(
        &self,
        id: u32,
        volume: &str,
        kind: Kind,
        point: Option<u64>,
    ) -> Result<(), StoreError> {
        if id > MAX_DEVICE_ID {
            return Err(StoreError::Invalid(format!(
                "thin device id {id} is above the largest, {MAX_DEVICE_ID}"
            )));
        }
        self.update(|devs| {
            match devs.iter().find(|d| d.id == id) {
                Some(d) if d.volume == volume && d.kind == kind && d.point == point => {}
                Some(d) => {
                    return Err(StoreError::Invalid(format!(
                        "thin device id {id} in pool {} is already used by {:?} {:?}",
                        self.pool, d.volume, d.kind
                    )))
                }
                None => devs.push(Entry::new(id, volume, kind, point)),
            }
            Ok(())
        })
    }

    /// Changes the entry of `id` (missing is fine).
    pub fn modify(&self, id: u32, f: impl FnOnce(&mut Entry)) -> Result<(), StoreError> {
        self.update(|devs| {
            if let Some(d) = devs.iter_mut().find(|d| d.id == id) {
                f(d);
            }
            Ok(())
        })
    }

    /// Failover to a point: thin device `new` (a copy of the point) becomes
    /// `volume`'s replica and the old replica `old` is doomed, in one
    /// durable step.
    pub fn swap_replica(&self, volume: &str, old: u32, new: u32) -> Result<(), StoreError> {
        self.update(|devs| {
            for d in devs.iter_mut() {
                if d.id == new {
                    d.volume = volume.to_owned();
                    d.kind = Kind::Replica;
                    d.point = None;
                    d.created = true;
                    d.doomed = false;
                } else if d.id == old {
                    d.kind = Kind::Clone;
                    d.point = None;
                    d.doomed = true;
                }
            }
            Ok(())
        })
    }

    /// Removes `id` (missing is fine): its device no longer exists.
    pub fn release(&self, id: u32) -> Result<(), StoreError> {
        self.update(|devs| {
            devs.retain(|d| d.id != id);
            Ok(())
        })
    }
}

/// `c` as the ledger file holds it.
fn to_text(c: &Contents) -> Result<Vec<u8>, StoreError> {
    let mut text = Vec::new();
    let mut ser = serde_json::Serializer::with_formatter(&mut text, OnePerLine::default());
    c.serialize(&mut ser)
        .map_err(|e| StoreError::Invalid(e.to_string()))?;
    text.push(b'\n');
    Ok(text)
}

/// Compact JSON with a line break before each element of an array in the
/// top-level object (and before its closing bracket): one device per line.
#[derive(Default)]
struct OnePerLine {
    depth: usize,
}

impl serde_json::ser::Formatter for OnePerLine {
    fn begin_object<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.depth += 1;
        w.write_all(b"{")
    }

    fn end_object<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.depth -= 1;
        w.write_all(b"}")
    }

    fn begin_array<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.depth += 1;
        w.write_all(b"[")
    }

    fn end_array<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.depth -= 1;
        w.write_all(if self.depth == 1 { b"\n]" } else { b"]" })
    }

    fn begin_array_value<W: ?Sized + io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> io::Result<()> {
        match (self.depth == 2, first) {
            (true, true) => w.write_all(b"\n"),
            (true, false) => w.write_all(b",\n"),
            (false, true) => Ok(()),
            (false, false) => w.write_all(b","),
        }
    }
}

/// Takes an exclusive `flock` of `path` (created if missing).
fn flock(path: &Path) -> Result<Locked, StoreError> {
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(|e| StoreError::io("open lock", path, e))?;
    loop {
        // SAFETY: plain syscall on an fd we own.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } == 0 {
            return Ok(Locked(f));
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(StoreError::io("lock", path, e));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocates_lowest_free_id_durably_and_reuses_released_ones() {
        let d = tempfile::tempdir().expect("tmp");
        let l = Ledger::new(d.path(), "pool0").expect("ledger");
        assert_eq!(l.allocate("a", Kind::Replica, None).expect("a"), 1);
        assert_eq!(l.allocate("a", Kind::Point, Some(10)).expect("p"), 2);
        assert_eq!(l.allocate("b", Kind::Point, Some(5)).expect("p"), 3);
        l.release(2).expect("release");
        // A fresh handle (another process, a restart) sees the same state.
        let l2 = Ledger::new(d.path(), "pool0").expect("ledger");
        assert_eq!(l2.allocate("b", Kind::Clone, Some(5)).expect("c"), 2);
        assert_eq!(l2.allocate("a", Kind::Point, Some(11)).expect("p"), 4);
        let a = l2.volume_entries("a").expect("entries");
        assert_eq!(
            a.iter()
                .map(|e| (e.id, e.kind, e.point))
                .collect::<Vec<_>>(),
            vec![(1, Kind::Replica, None), (4, Kind::Point, Some(11))]
        );
        // One device per line, parseable by shell tools.
        let text = std::fs::read_to_string(l.path()).expect("read");
        assert!(
            text.lines().any(|x| x.starts_with("{\"id\":4,")
                && x.contains("\"kind\":\"point\"")
                && x.contains("\"point\":11")),
            "{text}"
        );
        serde_json::from_str::<serde_json::Value>(&text).expect("valid JSON");
    }

    #[test]
    fn claimed_and_foreign_ids_are_never_allocated() {
        let d = tempfile::tempdir().expect("tmp");
        let l = Ledger::new(d.path(), "p").expect("ledger");
        l.claim(1, "a", Kind::Replica, None).expect("claim");
        l.claim(1, "a", Kind::Replica, None)
            .expect("same claim again");
        assert!(l.claim(1, "b", Kind::Replica, None).is_err(), "taken by a");
        assert!(l
            .claim(MAX_DEVICE_ID + 1, "b", Kind::Replica, None)
            .is_err());
        let id = l.allocate("a", Kind::Point, Some(1)).expect("alloc");
        assert_eq!(id, 2);
        l.modify(id, |e| {
            e.kind = Kind::Foreign;
            e.volume.clear();
        })
        .expect("foreign");
        assert_eq!(l.allocate("a", Kind::Point, Some(1)).expect("alloc"), 3);
        assert!(
            l.volume_entries("").expect("entries").is_empty(),
            "foreign ids belong to nobody"
        );
    }

    #[test]
    fn concurrent_allocations_get_distinct_ids() {
        let d = tempfile::tempdir().expect("tmp");
        let dir = d.path().to_owned();
        let hs: Vec<_> = (0..4)
            .map(|t| {
                let dir = dir.clone();
                std::thread::spawn(move || {
                    let l = Ledger::new(&dir, "p").expect("ledger");
                    (0..25)
                        .map(|i| {
                            l.allocate(&format!("v{t}"), Kind::Point, Some(i))
                                .expect("alloc")
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let mut all: Vec<u32> = hs
            .into_iter()
            .flat_map(|h| h.join().expect("join"))
            .collect();
        all.sort_unstable();
        assert_eq!(all, (1..=100).collect::<Vec<_>>());
    }

    /// A ledger as the hand-formatted writer of earlier versions left it.
    const EARLIER: &str = "{\"pool\":\"pool0\",\"version\":1,\"devices\":[\n\
        {\"id\":1,\"volume\":\"db1\",\"kind\":\"replica\",\"created\":true},\n\
        {\"id\":2,\"volume\":\"db1\",\"kind\":\"point\",\"point\":10},\n\
        {\"id\":3,\"volume\":\"\",\"kind\":\"foreign\"},\n\
        {\"id\":4,\"volume\":\"db1\",\"kind\":\"clone\",\"point\":10,\"doomed\":true}\n\
        ]}\n";

    #[test]
    fn an_earlier_ledger_reads_and_is_written_back_byte_for_byte() {
        let d = tempfile::tempdir().expect("tmp");
        let l = Ledger::new(d.path(), "pool0").expect("ledger");
        std::fs::write(l.path(), EARLIER).expect("write");
        let e = l.entries().expect("read");
        assert_eq!(
            e.iter()
                .map(|x| (x.id, x.kind, x.point, x.doomed, x.created))
                .collect::<Vec<_>>(),
            vec![
                (1, Kind::Replica, None, false, true),
                (2, Kind::Point, Some(10), false, false),
                (3, Kind::Foreign, None, false, false),
                (4, Kind::Clone, Some(10), true, false),
            ]
        );
        // A change and its undo: the file is rewritten, the same bytes.
        l.modify(2, |x| x.doomed = true).expect("doom");
        l.modify(2, |x| x.doomed = false).expect("undoom");
        assert_eq!(std::fs::read_to_string(l.path()).expect("read"), EARLIER);
        // No devices: the brackets on their own lines.
        for id in 1..=4 {
            l.release(id).expect("release");
        }
        assert_eq!(
            std::fs::read_to_string(l.path()).expect("read"),
            "{\"pool\":\"pool0\",\"version\":1,\"devices\":[\n]}\n"
        );
        // Another layout of the same JSON reads too.
        std::fs::write(
            l.path(),
            serde_json::to_vec_pretty(
                &serde_json::from_str::<serde_json::Value>(EARLIER).expect("json"),
            )
            .expect("pretty"),
        )
        .expect("write");
        assert_eq!(l.entries().expect("pretty reads").len(), 4);
    }

    #[test]
    fn a_damaged_or_unknown_ledger_is_a_clear_error() {
        let d = tempfile::tempdir().expect("tmp");
        let l = Ledger::new(d.path(), "pool0").expect("ledger");
        std::fs::write(l.path(), &EARLIER[..EARLIER.len() / 2]).expect("write");
        assert!(matches!(l.entries(), Err(StoreError::Corrupt { .. })));
        std::fs::write(l.path(), EARLIER.replace("\"version\":1", "\"version\":2")).expect("w");
        let e = l.entries().expect_err("newer version").to_string();
        assert!(e.contains("ledger version 2"), "{e}");
        std::fs::write(
            l.path(),
            EARLIER.replace("\"point\":10}", "\"point\":10,\"x\":1}"),
        )
        .expect("w");
        assert!(
            matches!(l.entries(), Err(StoreError::Corrupt { .. })),
            "unknown fields are refused, not dropped on the next write"
        );
    }

    #[test]
    fn ledger_of_another_pool_is_refused() {
        let d = tempfile::tempdir().expect("tmp");
        let l = Ledger::new(d.path(), "p").expect("ledger");
        l.allocate("a", Kind::Replica, None).expect("alloc");
        std::fs::rename(l.path(), d.path().join("q.ledger")).expect("rename");
        let q = Ledger::new(d.path(), "q").expect("ledger");
        assert!(q.entries().is_err());
    }
}
