//! The dm-thin replica backend: the replica is a thin device in a thin pool
//! the administrator created (with `error_if_no_space`), recovery points are
//! thin snapshots of it.
//!
//! * The replica is created (`create_thin`) on first use and activated
//!   under a stable name, `<name>` (`/dev/mapper/<name>`); writes go through
//!   the io_uring applier with `O_DIRECT`, so a full pool's `ENOSPC` comes
//!   back from the write that hit it (see [`crate::uring::Target::Thin`]).
//!   Flush is an fsync of the device, which commits the pool's metadata.
//! * A recovery point is a thin snapshot: suspend the replica, `create_snap`,
//!   resume (always, also after an error). Its device id is entered in the
//!   pool's [`ledger`] before `create_snap`, so a crash at any moment leaves
//!   either no snapshot or one that `list_points` reports — and the caller
//!   deletes, at start-up, every listed point it has no record of.
//! * Device ids are allocated from the ledger, shared by every volume in
//!   the pool, so they never collide; an id the pool says is taken by
//!   something else is marked foreign and skipped.
//! * Points are readable as `/dev/mapper/<name>-point-<id>` (read-only) and
//!   as writable copies `/dev/mapper/<name>-test-<id>` (thin snapshots of the
//!   point: test failover) through `open_point`.
//! * `warnings` reports the pool above its low-water mark or out of space.
//!
//! Device-mapper is reached through [`replica_dm::DeviceMapper`] (the
//! kernel's ioctls in a running system, an in-memory pool in the tests).
//!
//! Test hook, only in a build with the `test-hooks` feature: with
//! `REPLICAD_TEST_CRASH=after-create-snap` in the environment the process
//! aborts right after a recovery point's `create_snap`, before the replica
//! is resumed and before the point is recorded — the crash the start-up
//! cleanup exists for (VM test `tests/vm/thin.sh`). Without the feature the
//! variable is never read.

#[cfg(test)]
mod fake;
pub mod ledger;
pub mod tables;

use std::fs::OpenOptions;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use replica_dm::{Control, DeviceMapper, DmError, Errno};

use self::ledger::{Entry, Kind, Ledger};
use self::tables::{PoolMode, PoolStatus};
use crate::replica::{ApplyOp, PointAccess, ReplicaStore};
use crate::uring::{Target, UringFile};
use crate::StoreError;

/// Environment variable of the crash test hook (feature `test-hooks`).
#[cfg(feature = "test-hooks")]
pub const TEST_CRASH_ENV: &str = "REPLICAD_TEST_CRASH";

/// The crash test hook: aborts when `TEST_CRASH_ENV` names `at`.
#[cfg(feature = "test-hooks")]
fn crash_point(at: &str, what: std::fmt::Arguments<'_>) {
    if std::env::var(TEST_CRASH_ENV).as_deref() == Ok(at) {
        eprintln!("{TEST_CRASH_ENV}: aborting {what}");
        std::process::abort();
    }
}

/// Without the `test-hooks` feature there is no hook.
#[cfg(not(feature = "test-hooks"))]
fn crash_point(_at: &str, _what: std::fmt::Arguments<'_>) {}

/// `_IO(0x12, 97)`: drop a block device's buffer cache.
const BLKFLSBUF: libc::c_ulong = 0x1261;

/// Attempts at a fresh id when the pool reports ids taken by others.
const ID_ATTEMPTS: usize = 16;

/// Settings of a thin replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThinOptions {
    /// The pool's device-mapper name.
    pub pool: String,
    /// Thin device id of the replica; `None` allocates one.
    pub device_id: Option<u32>,
    /// Device-mapper name of the replica (points and copies are named
    /// after it).
    pub name: String,
    /// Pool usage (data or metadata, percent) from which `warnings`
    /// reports it.
    pub low_water_percent: u8,
}

/// A replica in a dm-thin pool.
pub struct ThinReplica {
    dm: Box<dyn DeviceMapper>,
    opts: ThinOptions,
    volume: String,
    size: u64,
    replica_id: u32,
    ledger: Ledger,
    io: UringFile,
}

fn mapper_path(name: &str) -> PathBuf {
    Path::new("/dev/mapper").join(name)
}

impl ThinReplica {
    /// Checks the pool, creates and activates the replica if needed, and
    /// opens it. `ledger_dir` holds the pools' ledgers (the daemon's state
    /// directory, never on a protected volume).
    pub fn open(
        opts: &ThinOptions,
        volume: &str,
        size: u64,
        ledger_dir: &Path,
    ) -> Result<Self, StoreError> {
        Self::open_with(Box::new(Control::default()), opts, volume, size, ledger_dir)
    }

    fn open_with(
        dm: Box<dyn DeviceMapper>,
        opts: &ThinOptions,
        volume: &str,
        size: u64,
        ledger_dir: &Path,
    ) -> Result<Self, StoreError> {
        if size == 0 || !size.is_multiple_of(512) {
            return Err(StoreError::Invalid(format!(
                "volume size {size} is not a non-zero multiple of 512"
            )));
        }
        let pool = &opts.pool;
        let Some(pool_info) = dm.info(pool)? else {
            return Err(StoreError::Invalid(format!(
                "thin pool {pool} does not exist: create it first (docs/configuration.md)"
            )));
        };
        let table = tables::parse_pool_table(&dm.table(pool)?)
            .map_err(|e| StoreError::Invalid(format!("device {pool} is not a thin pool: {e}")))?;
        if !table.features.iter().any(|f| f == "error_if_no_space") {
            return Err(StoreError::Invalid(format!(
                "thin pool {pool} queues I/O when it is full (its table has no error_if_no_space), \
                 which would hang the applier: reload the pool with the error_if_no_space feature \
                 (docs/configuration.md)"
            )));
        }
        if table.features.iter().any(|f| f == "skip_block_zeroing") {
            return Err(StoreError::Invalid(format!(
                "thin pool {pool} does not zero new blocks (its table has skip_block_zeroing): \
                 a write smaller than a pool block would leave the rest of that block on the \
                 replica holding old data of the pool where the volume reads zeros; reload the \
                 pool without skip_block_zeroing (LVM: lvchange --zero y) (docs/configuration.md)"
            )));
        }
        let status = Self::pool_status(dm.as_ref(), pool)?;
        match status.mode {
            PoolMode::Fail | PoolMode::ReadOnly => {
                return Err(StoreError::Invalid(format!(
                    "thin pool {pool} is {}: it needs repair (thin_check/thin_repair) before use",
                    if status.mode == PoolMode::Fail {
                        "failed"
                    } else {
                        "read-only"
                    }
                )))
            }
            PoolMode::ReadWrite | PoolMode::OutOfDataSpace => {}
        }
        if status.needs_check {
            return Err(StoreError::Invalid(format!(
                "thin pool {pool} is flagged needs_check: run thin_check before use"
            )));
        }
        let ledger = Ledger::new(ledger_dir, pool)?;
        let mine: Vec<Entry> = ledger
            .volume_entries(volume)?
            .into_iter()
            .filter(|e| e.kind == Kind::Replica)
            .collect();
        let (mut replica_id, mut fresh, created) = match (mine.as_slice(), opts.device_id) {
            ([], Some(id)) => {
                ledger.claim(id, volume, Kind::Replica, None)?;
                (id, false, false)
            }
            ([], None) => (ledger.allocate(volume, Kind::Replica, None)?, true, false),
            ([e], Some(id)) if e.id != id => {
                return Err(StoreError::Invalid(format!(
                    "volume {volume}: its replica is thin device {} in pool {pool} (ledger {}), \
                     but the configuration says device_id = {id}",
                    e.id,
                    ledger.path().display()
                )))
            }
            ([e], _) => (e.id, false, e.created),
            _ => {
                return Err(StoreError::Invalid(format!(
                    "{}: volume {volume} has several replica devices",
                    ledger.path().display()
                )))
            }
        };
        let sectors = size / 512;
        let name = &opts.name;
        match dm.info(name)? {
            Some(info) => {
                let t = tables::parse_thin_table(&dm.table(name)?).map_err(|e| {
                    StoreError::Invalid(format!("device {name} exists but is not the replica: {e}"))
                })?;
                let pool_dev = format!("{}:{}", pool_info.major, pool_info.minor);
                let replaced = ledger
                    .volume_entries(volume)?
                    .iter()
                    .any(|e| e.id == t.device_id && e.doomed && e.kind == Kind::Clone);
                if t.pool == pool_dev
                    && t.sectors == sectors
                    && t.device_id != replica_id
                    && replaced
                {
                    // A crash during a failover to a point, after the
                    // ledger named the point's copy the replica: finish it.
                    tracing::warn!(device = %name, id = replica_id, "finishing an interrupted switch to another thin device");
                    let _ops = ledger.hold_device_ops()?;
                    dm.reload(name, &Self::thin_table(pool, sectors, replica_id))?;
                    dm.suspend(name)?;
                    dm.resume(name)?;
                } else if t.pool != pool_dev || t.device_id != replica_id || t.sectors != sectors {
                    return Err(StoreError::Invalid(format!(
                        "device {name} is thin device {} of {} with {} sectors, but the replica \
                         is thin device {replica_id} of pool {pool} ({pool_dev}) with {sectors}",
                        t.device_id, t.pool, t.sectors
                    )));
                }
                if info.read_only {
                    return Err(StoreError::Invalid(format!(
                        "device {name} is active read-only"
                    )));
                }
                if info.suspended {
                    // Suspended by a snapshot in progress (another process),
                    // or left so by a crash while taking one.
                    let _ops = ledger.hold_device_ops()?;
                    if dm.info(name)?.is_some_and(|i| i.suspended) {
                        tracing::warn!(device = %name, "replica was left suspended; resuming it");
                        dm.resume(name)?;
                    }
                }
            }
            None => {
                let mut attempts = 0;
                // A replica known to exist is never created anew: if it is
                // gone, activating it fails below instead of replacing the
                // replica with an empty device.
                if !created {
                    loop {
                        match dm.message(pool, &format!("create_thin {replica_id}")) {
                            Ok(_) => break,
                            // Created before a crash, or an existing device the
                            // configuration names: use it.
                            Err(e) if e.errno() == Some(Errno::EEXIST) && !fresh => break,
                            Err(e)
                                if e.errno() == Some(Errno::EEXIST) && attempts < ID_ATTEMPTS =>
                            {
                                Self::mark_foreign(&ledger, pool, replica_id)?;
                                replica_id = ledger.allocate(volume, Kind::Replica, None)?;
                                fresh = true;
                                attempts += 1;
                            }
                            Err(e) => return Err(e.into()),
                        }
                    }
                }
                match dm.create(name, &Self::thin_table(pool, sectors, replica_id), false) {
                    Ok(()) => {}
                    Err(e) if e.errno() == Some(Errno::ENODATA) => {
                        return Err(StoreError::Invalid(format!(
                            "the replica of volume {volume}, thin device {replica_id} of pool \
                             {pool}, is missing from the pool (deleted outside replicad?): {e}"
                        )))
                    }
                    Err(e) => return Err(e.into()),
                }
                tracing::info!(device = %name, pool = %pool, id = replica_id, "replica activated");
            }
        }
        if !created {
            ledger.modify(replica_id, |e| e.created = true)?;
        }
        let path = mapper_path(name);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(&path)
            .map_err(|e| StoreError::io("open replica", &path, e))?;
        let io = UringFile::new(
            file,
            &path,
            size,
            Target::Thin {
                block_bytes: table.block_sectors * 512,
            },
        )?;
        let r = Self {
            dm,
            opts: opts.clone(),
            volume: volume.to_owned(),
            size,
            replica_id,
            ledger,
            io,
        };
        if let Err(e) = r.sweep() {
            tracing::warn!(volume = %volume, error = %e, "deleting leftover thin devices failed");
        }
        Ok(r)
    }

    fn pool_status(dm: &dyn DeviceMapper, pool: &str) -> Result<PoolStatus, StoreError> {
        tables::parse_pool_status(&dm.status(pool)?)
            .map_err(|e| StoreError::Invalid(format!("thin pool {pool}: {e}")))
    }

    fn thin_table(pool: &str, sectors: u64, id: u32) -> replica_dm::Table {
        tables::thin_table(&mapper_path(pool).display().to_string(), sectors, id)
    }

    fn mark_foreign(ledger: &Ledger, pool: &str, id: u32) -> Result<(), StoreError> {
        tracing::warn!(pool = %pool, id, "thin device id is taken by a device replicad did not create; skipping it");
        ledger.modify(id, |e| {
            e.kind = Kind::Foreign;
            e.volume.clear();
            e.point = None;
        })
    }

    /// The replica's thin device id.
    pub fn device_id(&self) -> u32 {
        self.replica_id
    }

    /// The replica's block device.
    pub fn path(&self) -> PathBuf {
        mapper_path(&self.opts.name)
    }

    /// The pool's current status.
    pub fn pool(&self) -> Result<PoolStatus, StoreError> {
        Self::pool_status(self.dm.as_ref(), &self.opts.pool)
    }

    fn point_name(&self, point: u64) -> String {
        format!("{}-point-{point}", self.opts.name)
    }

    fn copy_name(&self, point: u64) -> String {
        format!("{}-test-{point}", self.opts.name)
    }

    fn entries(&self, kind: Kind, point: u64) -> Result<Vec<Entry>, StoreError> {
        Ok(self
            .ledger
            .volume_entries(&self.volume)?
            .into_iter()
            .filter(|e| e.kind == kind && e.point == Some(point))
            .collect())
    }

    /// The ledger entry of recovery point `id` that is not being deleted.
    fn live_point(&self, id: u64) -> Result<Entry, StoreError> {
        self.entries(Kind::Point, id)?
            .into_iter()
            .find(|e| !e.doomed)
            .ok_or(StoreError::NoSuchPoint(id))
    }

    /// Takes a snapshot of `origin` (active as `active`, if it is) into a
    /// freshly allocated id, entered in the ledger first. Returns the id.
    fn snapshot(
        &self,
        origin: u32,
        active: Option<&str>,
        kind: Kind,
        point: u64,
    ) -> Result<u32, StoreError> {
        for _ in 0..ID_ATTEMPTS {
            // The intent: durable before the snapshot can exist.
            let id = self.ledger.allocate(&self.volume, kind, Some(point))?;
            let _ops = self.ledger.hold_device_ops()?;
            if let Some(name) = active {
                if let Err(e) = self.dm.suspend(name) {
                    self.ledger.release(id)?;
                    return Err(e.into());
                }
            }
            let snap = self
                .dm
                .message(&self.opts.pool, &format!("create_snap {id} {origin}"))
                .map(drop);
            if snap.is_ok() && kind == Kind::Point {
                crash_point(
                    "after-create-snap",
                    format_args!("after create_snap of thin device {id} (point {point})"),
                );
            }
            // Resume whatever happened: a suspended replica holds every
            // later write.
            let resumed = active.map_or(Ok(()), |name| self.dm.resume(name));
            match snap {
                Ok(()) => {
                    resumed?;
                    return Ok(id);
                }
                Err(e) if e.errno() == Some(Errno::EEXIST) => {
                    Self::mark_foreign(&self.ledger, &self.opts.pool, id)?;
                    resumed?;
                }
                Err(e) => {
                    // Not created (dm-thin rolls a failed create back); if it
                    // was after all, the next start-up deletes it.
                    let _ = self.destroy(id, None);
                    resumed?;
                    return Err(e.into());
                }
            }
        }
        Err(StoreError::Invalid(format!(
            "thin pool {}: {ID_ATTEMPTS} device ids in a row are taken by devices replicad did not create",
            self.opts.pool
        )))
    }

    /// Deactivates `active` (if given and active) and deletes thin device
    /// `id` from the pool, then from the ledger. A device someone holds
    /// open is marked doomed and left for a later attempt (`Ok(false)`).
    fn destroy(&self, id: u32, active: Option<&str>) -> Result<bool, StoreError> {
        let busy = |e: &DmError| e.errno() == Some(Errno::EBUSY);
        if let Some(name) = active {
            if self.dm.info(name)?.is_some() {
                match self.dm.remove(name) {
                    Ok(()) => {}
                    Err(e) if busy(&e) => return self.doom(id, &e),
                    Err(e) => return Err(e.into()),
                }
            }
        }
        match self.dm.message(&self.opts.pool, &format!("delete {id}")) {
            // Never created (a crash between the intent and create_snap).
            Ok(_) => {}
            Err(e) if e.errno() == Some(Errno::ENODATA) => {}
            Err(e) if busy(&e) => return self.doom(id, &e),
            Err(e) => return Err(e.into()),
        }
        self.ledger.release(id)?;
        Ok(true)
    }

    fn doom(&self, id: u32, why: &DmError) -> Result<bool, StoreError> {
        tracing::warn!(volume = %self.volume, id, error = %why, "thin device is in use; deleting it later");
        self.ledger.modify(id, |e| e.doomed = true)?;
        Ok(false)
    }

    /// Retries the deletion of devices that were busy.
    fn sweep(&self) -> Result<(), StoreError> {
        for e in self.ledger.volume_entries(&self.volume)? {
            if e.doomed {
                let name = match (e.kind, e.point) {
                    (Kind::Point, Some(p)) => Some(self.point_name(p)),
                    (Kind::Clone, Some(p)) => Some(self.copy_name(p)),
                    _ => None,
                };
                self.destroy(e.id, name.as_deref())?;
            }
        }
        Ok(())
    }

    /// Activates thin device `id` as `name` unless it is active; returns
    /// whether the device exists in the pool.
    fn activate(&self, name: &str, id: u32, read_only: bool) -> Result<bool, StoreError> {
        if let Some(_info) = self.dm.info(name)? {
            let t = tables::parse_thin_table(&self.dm.table(name)?)
                .map_err(|e| StoreError::Invalid(format!("device {name}: {e}")))?;
            if t.device_id != id {
                return Err(StoreError::Invalid(format!(
                    "device {name} is thin device {}, expected {id}",
                    t.device_id
                )));
            }
            return Ok(true);
        }
        let table = Self::thin_table(&self.opts.pool, self.size / 512, id);
        match self.dm.create(name, &table, read_only) {
            Ok(()) => Ok(true),
            Err(e) if e.errno() == Some(Errno::ENODATA) => {
                // `create` removes the empty device when the table fails;
                // should that removal have failed too, it goes now.
                if self.dm.info(name)?.is_some() {
                    self.dm.remove(name)?;
                }
                Ok(false)
            }
            Err(e) => Err(e.into()),
        }
    }
}

impl ReplicaStore for ThinReplica {
    /// Everything after the highest provisioned block (the thin status
    /// says no more: holes below it are not listed).
    fn known_zero(&mut self) -> Result<Vec<(u64, u64)>, StoreError> {
        let status = self.dm.status(&self.opts.name)?;
        let end = tables::parse_thin_status(&status)
            .map_err(|e| StoreError::Invalid(format!("thin device {}: {e}", self.opts.name)))?;
        Ok(match end {
            Some(end) if end < self.size => vec![(end, self.size - end)],
            _ => Vec::new(),
        })
    }

    fn reader(&self) -> crate::replica::ReadAccess {
        crate::replica::ReadAccess {
            path: self.path(),
            direct: true,
        }
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn apply(&mut self, ops: &[ApplyOp<'_>]) -> Result<(), StoreError> {
        self.io.apply(ops)
    }

    fn flush(&mut self) -> Result<(), StoreError> {
        self.io.flush()
    }

    fn create_point(&mut self, id: u64) -> Result<(), StoreError> {
        if let Err(e) = self.sweep() {
            tracing::warn!(volume = %self.volume, error = %e, "deleting busy thin devices failed");
        }
        // A point of the same id is replaced.
        self.delete_point(id)?;
        let name = self.opts.name.clone();
        self.snapshot(self.replica_id, Some(&name), Kind::Point, id)
            .map(drop)
    }

    fn delete_point(&mut self, id: u64) -> Result<(), StoreError> {
        let name = self.point_name(id);
        for e in self.entries(Kind::Point, id)? {
            self.destroy(e.id, Some(&name))?;
        }
        Ok(())
    }

    fn list_points(&self) -> Result<Vec<u64>, StoreError> {
        let mut v: Vec<u64> = self
            .ledger
            .volume_entries(&self.volume)?
            .into_iter()
            .filter(|e| e.kind == Kind::Point)
            .filter_map(|e| e.point)
            .collect();
        v.sort_unstable();
        v.dedup();
        Ok(v)
    }

    fn open_point(&mut self, id: u64, access: PointAccess) -> Result<PathBuf, StoreError> {
        let point = self.live_point(id)?;
        match access {
            PointAccess::ReadOnly => {
                let name = self.point_name(id);
                if !self.activate(&name, point.id, true)? {
                    return Err(StoreError::Invalid(format!(
                        "recovery point {id} (thin device {}) is missing from pool {}",
                        point.id, self.opts.pool
                    )));
                }
                Ok(mapper_path(&name))
            }
            PointAccess::Writable => {
                let name = self.copy_name(id);
                if let Some(c) = self
                    .entries(Kind::Clone, id)?
                    .into_iter()
                    .find(|e| !e.doomed)
                {
                    if self.activate(&name, c.id, false)? {
                        return Ok(mapper_path(&name));
                    }
                    // Entered but never created (a crash): start again.
                    self.destroy(c.id, None)?;
                }
                let ro = self.point_name(id);
                let active = self.dm.info(&ro)?.is_some().then_some(ro.as_str());
                let copy = self.snapshot(point.id, active, Kind::Clone, id)?;
                self.activate(&name, copy, false)?;
                Ok(mapper_path(&name))
            }
        }
    }

    fn close_point(&mut self, id: u64, access: PointAccess) -> Result<(), StoreError> {
        match access {
            PointAccess::ReadOnly => {
                let name = self.point_name(id);
                if self.dm.info(&name)?.is_some() {
                    self.dm.remove(&name)?;
                }
                // A pruned point kept only because it was open goes now.
                for e in self.entries(Kind::Point, id)? {
                    if e.doomed {
                        self.destroy(e.id, None)?;
                    }
                }
                Ok(())
            }
            PointAccess::Writable => {
                let name = self.copy_name(id);
                for e in self.entries(Kind::Clone, id)? {
                    if !self.destroy(e.id, Some(&name))? {
                        return Err(StoreError::Invalid(format!(
                            "{name} is in use: close it first"
                        )));
                    }
                }
                if self.dm.info(&name)?.is_some() {
                    self.dm.remove(&name)?;
                }
                Ok(())
            }
        }
    }

    fn promote(&mut self, point: Option<u64>) -> Result<PathBuf, StoreError> {
        if let Some(id) = point {
            let p = self.live_point(id)?;
            // A writable snapshot of the point becomes the replica, under
            // the replica's name; the old replica is deleted after.
            let ro = self.point_name(id);
            let active = self.dm.info(&ro)?.is_some().then_some(ro.as_str());
            let new = self.snapshot(p.id, active, Kind::Clone, id)?;
            let old = self.replica_id;
            self.ledger.swap_replica(&self.volume, old, new)?;
            {
                let name = &self.opts.name;
                let _ops = self.ledger.hold_device_ops()?;
                self.dm.reload(
                    name,
                    &Self::thin_table(&self.opts.pool, self.size / 512, new),
                )?;
                self.dm.suspend(name)?;
                let resumed = self.dm.resume(name);
                resumed?;
            }
            self.replica_id = new;
            // Nothing cached from the old device may be read as the new one.
            // SAFETY: BLKFLSBUF takes no argument memory; the fd is open.
            if unsafe { libc::ioctl(self.io.file().as_raw_fd(), BLKFLSBUF as _, 0) } != 0 {
                tracing::warn!(volume = %self.volume, error = %std::io::Error::last_os_error(), "could not drop the replica's page cache");
            }
            if let Err(e) = self.destroy(old, None) {
                tracing::warn!(volume = %self.volume, id = old, error = %e, "the replaced replica is deleted later");
            }
        }
        self.flush()?;
        Ok(self.path())
    }

    fn warnings(&mut self) -> Result<Vec<String>, StoreError> {
        Ok(pool_warnings(
            &self.opts.pool,
            &self.pool()?,
            self.opts.low_water_percent,
        ))
    }
}

fn percent(used: u64, total: u64) -> u64 {
    used.saturating_mul(100).checked_div(total).unwrap_or(100)
}

/// What an operator should know about a pool in this state.
pub fn pool_warnings(pool: &str, s: &PoolStatus, low_water_percent: u8) -> Vec<String> {
    let mut w = Vec::new();
    let figures = format!(
        "data {}/{} blocks ({}%), metadata {}/{} blocks ({}%)",
        s.data_used,
        s.data_total,
        percent(s.data_used, s.data_total),
        s.meta_used,
        s.meta_total,
        percent(s.meta_used, s.meta_total)
    );
    match s.mode {
        PoolMode::OutOfDataSpace => w.push(format!(
            "thin pool {pool} is out of data space ({figures}): writes that need new blocks fail \
             until the pool grows"
        )),
        PoolMode::ReadOnly => w.push(format!("thin pool {pool} is read-only ({figures})")),
        PoolMode::Fail => w.push(format!("thin pool {pool} has failed")),
        PoolMode::ReadWrite => {}
    }
    if s.mode != PoolMode::Fail
        && (percent(s.data_used, s.data_total) >= u64::from(low_water_percent)
            || percent(s.meta_used, s.meta_total) >= u64::from(low_water_percent))
    {
        w.push(format!(
            "thin pool {pool} is above its low-water mark of {low_water_percent}%: {figures}"
        ));
    }
    if s.needs_check {
        w.push(format!("thin pool {pool} needs thin_check"));
    }
    w
}

#[cfg(test)]
mod tests {
    use super::fake::FakeDm;
    use super::*;

    fn status(data: (u64, u64), meta: (u64, u64), mode: PoolMode) -> PoolStatus {
        PoolStatus {
            meta_used: meta.0,
            meta_total: meta.1,
            data_used: data.0,
            data_total: data.1,
            mode,
            error_if_no_space: true,
            needs_check: false,
        }
    }

    #[test]
    fn low_water_mark_warns_with_figures() {
        assert!(
            pool_warnings("p", &status((79, 100), (10, 100), PoolMode::ReadWrite), 80).is_empty()
        );
        let w = pool_warnings("p", &status((80, 100), (10, 100), PoolMode::ReadWrite), 80);
        assert_eq!(
            w,
            vec![
                "thin pool p is above its low-water mark of 80%: data 80/100 blocks (80%), \
                  metadata 10/100 blocks (10%)"
                    .to_owned()
            ]
        );
        let w = pool_warnings("p", &status((1, 100), (95, 100), PoolMode::ReadWrite), 80);
        assert_eq!(w.len(), 1, "metadata counts too: {w:?}");
        let w = pool_warnings(
            "p",
            &status((100, 100), (10, 100), PoolMode::OutOfDataSpace),
            80,
        );
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(
            w[0].contains("out of data space") && w[0].contains("100/100"),
            "{w:?}"
        );
    }

    /// A device-mapper with only a pool, for what does not need a kernel:
    /// the pool checks at open.
    fn pool_only(pool_table: &str, pool_status: &str) -> Box<FakeDm> {
        Box::new(FakeDm::with_pool(pool_table, pool_status))
    }

    fn opts() -> ThinOptions {
        ThinOptions {
            pool: "pool".into(),
            device_id: None,
            name: "r".into(),
            low_water_percent: 80,
        }
    }

    const RW: &str =
        "0 8192 thin-pool 0 10/1024 0/64 - rw discard_passdown error_if_no_space - 768";

    #[test]
    fn a_pool_that_queues_when_full_is_refused() {
        let d = tempfile::tempdir().expect("tmp");
        let dm = pool_only("0 8192 thin-pool 254:2 254:3 128 0 0", RW);
        let e = ThinReplica::open_with(dm, &opts(), "v", 1 << 20, d.path())
            .err()
            .expect("must refuse")
            .to_string();
        assert!(e.contains("error_if_no_space") && e.contains("hang"), "{e}");
    }

    #[test]
    fn a_pool_that_does_not_zero_new_blocks_is_refused() {
        let d = tempfile::tempdir().expect("tmp");
        let dm = pool_only(
            "0 8192 thin-pool 254:2 254:3 128 0 2 error_if_no_space skip_block_zeroing",
            RW,
        );
        let e = ThinReplica::open_with(dm, &opts(), "v", 1 << 20, d.path())
            .err()
            .expect("must refuse")
            .to_string();
        assert!(
            e.contains("skip_block_zeroing") && e.contains("zeros"),
            "{e}"
        );
    }

    #[test]
    fn a_read_only_or_failed_pool_is_refused() {
        let d = tempfile::tempdir().expect("tmp");
        let table = "0 8192 thin-pool 254:2 254:3 128 0 1 error_if_no_space";
        for (st, want) in [
            ("0 8192 thin-pool 0 10/1024 0/64 - ro discard_passdown error_if_no_space - 768", "read-only"),
            ("0 8192 thin-pool Fail", "failed"),
            ("0 8192 thin-pool 0 10/1024 0/64 - rw discard_passdown error_if_no_space needs_check 768", "needs_check"),
        ] {
            let dm = pool_only(table, st);
            let e = ThinReplica::open_with(dm, &opts(), "v", 1 << 20, d.path())
                .err()
                .expect("must refuse")
                .to_string();
            assert!(e.contains(want), "{e}");
        }
    }

    #[test]
    fn a_missing_pool_is_refused_by_name() {
        let d = tempfile::tempdir().expect("tmp");
        let dm = pool_only("", RW);
        let mut o = opts();
        o.pool = "nopool".into();
        let e = ThinReplica::open_with(dm, &o, "v", 1 << 20, d.path())
            .err()
            .expect("must refuse")
            .to_string();
        assert!(e.contains("thin pool nopool does not exist"), "{e}");
    }
    /// A pool in memory, for the point logic (intents, foreign ids,
    /// deletion, crash leftovers): it records every call, and records a
    /// violation when a snapshot is created without its id in the ledger
    /// first.
    fn fake_pool(dir: &Path) -> FakeDm {
        let dm = FakeDm::new();
        dm.watch_ledger(Ledger::new(&dir.join("ledger"), "pool").expect("ledger"));
        dm
    }

    /// A replica over the fake pool (its data in a plain file), active as
    /// `rep`.
    fn fake_replica(dir: &Path) -> (ThinReplica, FakeDm) {
        let dm = fake_pool(dir);
        let ledger = Ledger::new(&dir.join("ledger"), "pool").expect("ledger");
        ledger.claim(1, "v", Kind::Replica, None).expect("claim");
        dm.add_id(1);
        dm.activate("rep", 1);
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(dir.join("data"))
            .expect("data");
        f.set_len(1 << 20).expect("size");
        let replica = ThinReplica {
            dm: Box::new(dm.clone()),
            opts: ThinOptions {
                pool: "pool".into(),
                device_id: None,
                name: "rep".into(),
                low_water_percent: 80,
            },
            volume: "v".into(),
            size: 1 << 20,
            replica_id: 1,
            io: UringFile::new(
                f,
                &dir.join("data"),
                1 << 20,
                Target::Thin { block_bytes: 65536 },
            )
            .expect("io"),
            ledger,
        };
        (replica, dm)
    }

    #[test]
    fn a_point_is_a_snapshot_entered_in_the_ledger_before_it_is_taken() {
        let d = tempfile::tempdir().expect("tmp");
        let dir = d.path();
        let (mut r, dm) = fake_replica(dir);
        r.create_point(10).expect("point");
        assert!(dm.violations().is_empty(), "snapshot before its intent");
        assert_eq!(r.list_points().expect("list"), vec![10]);
        let e = r.entries(Kind::Point, 10).expect("entries");
        assert_eq!(e.len(), 1);
        assert!(dm.has_id(e[0].id));
        let calls = dm.calls();
        let pos = |c: &str| calls.iter().position(|x| x == c).unwrap_or(usize::MAX);
        let snap = format!("message pool 0 create_snap {} 1", e[0].id);
        assert!(
            pos("suspend rep") < pos(&snap)
                && pos(&snap) < pos("resume rep")
                && pos("resume rep") != usize::MAX,
            "suspend, create_snap, resume: {calls:?}"
        );
        // Deleting removes the snapshot from the pool, then the entry.
        r.delete_point(10).expect("delete");
        assert!(!dm.has_id(e[0].id));
        assert!(r.list_points().expect("list").is_empty());
        r.delete_point(10)
            .expect("deleting a missing point is fine");
    }

    /// The child process of `the_crash_hook_is_only_in_a_test_build`.
    #[test]
    #[ignore = "helper process for the_crash_hook_is_only_in_a_test_build"]
    fn crash_hook_child() {
        let d = tempfile::tempdir().expect("tmp");
        let (mut r, _dm) = fake_replica(d.path());
        r.create_point(10).expect("point");
        println!("point taken");
    }

    #[test]
    fn the_crash_hook_is_only_in_a_test_build() {
        use std::os::unix::process::ExitStatusExt;
        let out = std::process::Command::new(std::env::current_exe().expect("test binary"))
            .args([
                "--exact",
                "thin::tests::crash_hook_child",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("REPLICAD_TEST_CRASH", "after-create-snap")
            .output()
            .expect("run the child");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        if cfg!(feature = "test-hooks") {
            assert_eq!(out.status.signal(), Some(libc::SIGABRT), "{stdout}{stderr}");
            assert!(
                stderr.contains("aborting after create_snap of thin device"),
                "{stderr}"
            );
            assert!(!stdout.contains("point taken"), "{stdout}");
        } else {
            assert!(out.status.success(), "{stdout}{stderr}");
            assert!(stdout.contains("point taken"), "{stdout}");
            assert!(!stderr.contains("REPLICAD_TEST_CRASH"), "{stderr}");
        }
    }

    #[test]
    fn a_failed_snapshot_resumes_the_replica_and_leaves_no_entry() {
        let d = tempfile::tempdir().expect("tmp");
        let dir = d.path();
        let (mut r, dm) = fake_replica(dir);
        dm.fail_snapshots();
        let e = r.create_point(10).expect_err("must fail").to_string();
        assert!(
            e.contains("create_snap") && e.contains("Invalid argument"),
            "{e}"
        );
        assert!(dm
            .calls()
            .last()
            .is_some_and(|l| l == "resume rep" || l.starts_with("message pool 0 delete")));
        assert!(
            dm.calls().iter().any(|l| l == "resume rep"),
            "resumed after the failure"
        );
        assert!(r.list_points().expect("list").is_empty());
    }

    #[test]
    fn ids_taken_by_others_are_marked_foreign_and_skipped() {
        let d = tempfile::tempdir().expect("tmp");
        let dir = d.path();
        let (mut r, dm) = fake_replica(dir);
        // Devices 2 and 3 exist in the pool, unknown to the ledger.
        dm.add_id(2);
        dm.add_id(3);
        r.create_point(10).expect("point");
        let e = r.entries(Kind::Point, 10).expect("entries");
        assert_eq!(e.iter().map(|x| x.id).collect::<Vec<_>>(), vec![4]);
        let all = r.ledger.entries().expect("entries");
        assert_eq!(
            all.iter()
                .filter(|x| x.kind == Kind::Foreign)
                .map(|x| x.id)
                .collect::<Vec<_>>(),
            vec![2, 3]
        );
        // Never deleted: they are not ours.
        r.delete_point(10).expect("delete");
        assert!(dm.has_id(2) && dm.has_id(3));
    }

    #[test]
    fn leftovers_of_a_crash_are_listed_and_deleted() {
        let d = tempfile::tempdir().expect("tmp");
        let dir = d.path();
        let (mut r, dm) = fake_replica(dir);
        // A crash after the intent, before create_snap: no device.
        let a = r
            .ledger
            .allocate("v", Kind::Point, Some(20))
            .expect("intent");
        // A crash after create_snap, before the caller's record.
        let b = r
            .ledger
            .allocate("v", Kind::Point, Some(21))
            .expect("intent");
        dm.add_id(b);
        assert_eq!(r.list_points().expect("list"), vec![20, 21]);
        r.delete_point(20).expect("never created: fine");
        r.delete_point(21).expect("delete");
        assert!(!dm.has_id(b));
        assert!(r.list_points().expect("list").is_empty());
        assert!(r
            .ledger
            .entries()
            .expect("entries")
            .iter()
            .all(|e| e.id != a && e.id != b));
    }

    #[test]
    fn a_replaced_point_does_not_leak_its_old_snapshot() {
        let d = tempfile::tempdir().expect("tmp");
        let dir = d.path();
        let (mut r, dm) = fake_replica(dir);
        r.create_point(10).expect("point");
        r.create_point(10).expect("again");
        assert_eq!(r.entries(Kind::Point, 10).expect("entries").len(), 1);
        let devs = dm.id_count();
        assert_eq!(devs, 2, "the replica and one snapshot");
    }

    #[test]
    fn points_open_read_only_or_as_writable_copies() {
        let d = tempfile::tempdir().expect("tmp");
        let dir = d.path();
        let (mut r, dm) = fake_replica(dir);
        r.create_point(10).expect("point");
        let point_dev = r.entries(Kind::Point, 10).expect("entries")[0].id;
        let p = r.open_point(10, PointAccess::ReadOnly).expect("open");
        assert_eq!(p, Path::new("/dev/mapper/rep-point-10"));
        assert!(dm
            .calls()
            .iter()
            .any(|l| l.starts_with("create rep-point-10 --readonly --table")));
        assert_eq!(r.open_point(10, PointAccess::ReadOnly).expect("again"), p);
        let c = r.open_point(10, PointAccess::Writable).expect("copy");
        assert_eq!(c, Path::new("/dev/mapper/rep-test-10"));
        let copy = r.entries(Kind::Clone, 10).expect("entries");
        assert_eq!(copy.len(), 1);
        assert!(dm.calls().contains(&format!(
            "message pool 0 create_snap {} {point_dev}",
            copy[0].id
        )));
        assert!(
            dm.calls().iter().any(|l| l == "suspend rep-point-10"),
            "the active point is suspended for its copy"
        );
        assert_eq!(
            r.list_points().expect("list"),
            vec![10],
            "copies are not points"
        );
        r.close_point(10, PointAccess::Writable)
            .expect("close copy");
        assert!(r.entries(Kind::Clone, 10).expect("entries").is_empty());
        assert!(!dm.has_id(copy[0].id));
        assert!(!dm.is_active("rep-test-10"));
        // Pruned while open (busy): kept, then deleted when closed.
        dm.set_open("rep-point-10", true);
        r.delete_point(10).expect("delete while open");
        assert!(dm.has_id(point_dev));
        assert!(r.entries(Kind::Point, 10).expect("entries")[0].doomed);
        dm.set_open("rep-point-10", false);
        r.close_point(10, PointAccess::ReadOnly).expect("close");
        assert!(!dm.has_id(point_dev));
        assert!(r.list_points().expect("list").is_empty());
        assert!(
            r.open_point(11, PointAccess::ReadOnly).is_err(),
            "no such point"
        );
    }

    #[test]
    fn a_replica_is_created_once_and_never_silently_recreated() {
        let d = tempfile::tempdir().expect("tmp");
        let dir = d.path();
        let dm = fake_pool(dir);
        let ledger_dir = dir.join("ledger");
        // First start: id allocated, created, marked created (opening the
        // device node fails on the host, after that).
        let e = ThinReplica::open_with(Box::new(dm.clone()), &opts(), "v", 1 << 20, &ledger_dir)
            .err()
            .expect("no /dev/mapper/r on the host")
            .to_string();
        assert!(e.contains("open replica /dev/mapper/r"), "{e}");
        assert!(dm
            .calls()
            .iter()
            .any(|l| l == "message pool 0 create_thin 1"));
        let l = Ledger::new(&ledger_dir, "pool").expect("ledger");
        assert!(l.volume_entries("v").expect("entries")[0].created);
        // The replica is deleted behind replicad's back: refused, not
        // replaced by an empty device.
        dm.forget_id(1);
        dm.deactivate("r");
        dm.clear_calls();
        let e = ThinReplica::open_with(Box::new(dm.clone()), &opts(), "v", 1 << 20, &ledger_dir)
            .err()
            .expect("must refuse")
            .to_string();
        assert!(e.contains("missing from the pool"), "{e}");
        assert!(
            !dm.calls().iter().any(|l| l.contains("create_thin")),
            "{:?}",
            dm.calls()
        );
        assert!(!dm.has_id(1));
    }

    #[test]
    fn failover_to_a_point_swaps_a_copy_of_it_in_as_the_replica() {
        let d = tempfile::tempdir().expect("tmp");
        let dir = d.path();
        let (mut r, dm) = fake_replica(dir);
        assert_eq!(dm.active_id("rep"), Some(1), "replica active");
        r.create_point(10).expect("point");
        r.create_point(20).expect("point");
        let p10 = r.entries(Kind::Point, 10).expect("entries")[0].id;
        dm.clear_calls();
        assert_eq!(
            r.promote(None).expect("as it is"),
            Path::new("/dev/mapper/rep")
        );
        assert!(
            !dm.calls().iter().any(|l| l.contains("create_snap")),
            "{:?}",
            dm.calls()
        );
        assert!(r.promote(Some(11)).is_err(), "no such point");
        assert_eq!(
            r.promote(Some(10)).expect("at 10"),
            Path::new("/dev/mapper/rep")
        );
        let new = r.device_id();
        assert_ne!(new, 1);
        assert!(dm
            .calls()
            .contains(&format!("message pool 0 create_snap {new} {p10}")));
        // The replica's name now maps the copy; the old replica is deleted;
        // the ledger says so; the points are untouched.
        assert_eq!(dm.active_id("rep"), Some(new));
        assert!(!dm.has_id(1));
        let mine = r.ledger.volume_entries("v").expect("entries");
        let replicas: Vec<_> = mine.iter().filter(|e| e.kind == Kind::Replica).collect();
        assert_eq!(replicas.len(), 1);
        assert_eq!(replicas[0].id, new);
        assert!(replicas[0].created);
        assert!(mine.iter().all(|e| e.id != 1));
        assert_eq!(r.list_points().expect("list"), vec![10, 20]);
    }
}
