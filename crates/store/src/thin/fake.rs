//! An in-memory device-mapper with one thin pool, for the thin backend's
//! tests: the pool's device ids, the active devices (live and inactive
//! table, suspended), and every call in a log written as the `dmsetup`
//! command that would do the same. It behaves as the kernel does where the
//! backend depends on it (`EEXIST` for a taken id, `ENODATA` for a missing
//! one, `EBUSY` for an open device or an active id, `ENXIO` for a missing
//! device), and records a violation when a snapshot is created before its
//! id is in the ledger.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};

use replica_dm::{DevInfo, DeviceMapper, DmError, DmErrorKind, Errno, Op, Table};

use super::ledger::Ledger;
use super::tables::parse_thin_table;

/// The pool's name.
pub const POOL: &str = "pool";

/// The pool's table: with `error_if_no_space`.
pub const POOL_TABLE: &str = "0 8192 thin-pool 254:2 254:3 128 0 1 error_if_no_space";

/// The pool's status: writable, nearly empty.
pub const POOL_STATUS: &str =
    "0 8192 thin-pool 0 10/1024 0/64 - rw discard_passdown error_if_no_space - 768";

struct Device {
    minor: u32,
    live: Table,
    inactive: Option<Table>,
    suspended: bool,
    read_only: bool,
}

struct State {
    pool_table: Table,
    pool_status: Table,
    /// Thin device ids that exist in the pool.
    ids: BTreeSet<u32>,
    active: BTreeMap<String, Device>,
    /// Devices someone holds open.
    open: BTreeSet<String>,
    fail_snapshots: bool,
    next_minor: u32,
    log: Vec<String>,
    violations: Vec<String>,
    ledger: Option<Ledger>,
}

/// The fake; clones share one state.
#[derive(Clone)]
pub struct FakeDm(Arc<Mutex<State>>);

fn parse(text: &str) -> Table {
    text.parse().expect("table text")
}

fn err(op: Op, name: &str, errno: Errno) -> DmError {
    DmErrorKind::Ioctl {
        op,
        name: name.to_owned(),
        source: errno,
    }
    .into()
}

impl FakeDm {
    /// A pool named [`POOL`] with this table and status, and nothing else.
    pub fn with_pool(pool_table: &str, pool_status: &str) -> Self {
        Self(Arc::new(Mutex::new(State {
            pool_table: parse(pool_table),
            pool_status: parse(pool_status),
            ids: BTreeSet::new(),
            active: BTreeMap::new(),
            open: BTreeSet::new(),
            fail_snapshots: false,
            next_minor: 10,
            log: Vec::new(),
            violations: Vec::new(),
            ledger: None,
        })))
    }

    /// A usable pool ([`POOL_TABLE`], [`POOL_STATUS`]).
    pub fn new() -> Self {
        Self::with_pool(POOL_TABLE, POOL_STATUS)
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.0.lock().expect("fake state")
    }

    fn log(&self, line: String) -> MutexGuard<'_, State> {
        let mut s = self.state();
        s.log.push(line);
        s
    }

    /// Checks snapshots against `ledger`: each id must be entered first.
    pub fn watch_ledger(&self, ledger: Ledger) {
        self.state().ledger = Some(ledger);
    }

    /// Thin device `id` exists in the pool (made behind replicad's back,
    /// or as a test's starting point).
    pub fn add_id(&self, id: u32) {
        self.state().ids.insert(id);
    }

    /// Thin device `id` is deleted behind replicad's back.
    pub fn forget_id(&self, id: u32) {
        self.state().ids.remove(&id);
    }

    /// Whether thin device `id` exists in the pool.
    pub fn has_id(&self, id: u32) -> bool {
        self.state().ids.contains(&id)
    }

    /// How many thin devices the pool has.
    pub fn id_count(&self) -> usize {
        self.state().ids.len()
    }

    /// Activates `name` as thin device `id` without a log line (a test's
    /// starting point).
    pub fn activate(&self, name: &str, id: u32) {
        self.state()
            .insert(name, super::tables::thin_table("253:1", 2048, id), false);
    }

    /// Deactivates `name` without a log line (behind replicad's back).
    pub fn deactivate(&self, name: &str) {
        self.state().active.remove(name);
    }

    /// Whether `name` is active.
    pub fn is_active(&self, name: &str) -> bool {
        self.state().active.contains_key(name)
    }

    /// The thin device id `name` maps, if it is active.
    pub fn active_id(&self, name: &str) -> Option<u32> {
        let s = self.state();
        let d = s.active.get(name)?;
        Some(parse_thin_table(&d.live).expect("thin table").device_id)
    }

    /// Someone holds `name` open (or lets go of it).
    pub fn set_open(&self, name: &str, open: bool) {
        let mut s = self.state();
        if open {
            s.open.insert(name.to_owned());
        } else {
            s.open.remove(name);
        }
    }

    /// Makes every later `create_snap` fail with EINVAL.
    pub fn fail_snapshots(&self) {
        self.state().fail_snapshots = true;
    }

    /// Every call so far, as dmsetup command lines.
    pub fn calls(&self) -> Vec<String> {
        self.state().log.clone()
    }

    /// Forgets the calls so far.
    pub fn clear_calls(&self) {
        self.state().log.clear();
    }

    /// Snapshots created before their id was in the ledger.
    pub fn violations(&self) -> Vec<String> {
        self.state().violations.clone()
    }
}

/// The thin device id a table activates.
fn id_of(table: &Table) -> u32 {
    parse_thin_table(table)
        .expect("the backend activates thin tables")
        .device_id
}

impl State {
    /// Activates `name` with `table`.
    fn insert(&mut self, name: &str, table: Table, read_only: bool) {
        let minor = self.next_minor;
        self.next_minor += 1;
        self.active.insert(
            name.to_owned(),
            Device {
                minor,
                live: table,
                inactive: None,
                suspended: false,
                read_only,
            },
        );
    }

    fn pool_message(&mut self, name: &str, message: &str) -> Result<String, DmError> {
        let op = Op::Message(message.to_owned());
        let e = |errno| Err(err(op.clone(), name, errno));
        let words: Vec<&str> = message.split_whitespace().collect();
        let id = |i: usize| -> u32 { words[i].parse().expect("a device id") };
        let active_ids: BTreeSet<u32> = self.active.values().map(|d| id_of(&d.live)).collect();
        match words.first().copied() {
            Some("create_snap") => {
                let (new, origin) = (id(1), id(2));
                if self.ids.contains(&new) {
                    return e(Errno::EEXIST);
                }
                if !self.ids.contains(&origin) {
                    return e(Errno::ENODATA);
                }
                if self.fail_snapshots {
                    return e(Errno::EINVAL);
                }
                let entered = self
                    .ledger
                    .as_ref()
                    .map(|l| l.entries().expect("ledger").iter().any(|x| x.id == new));
                if entered == Some(false) {
                    self.violations
                        .push(format!("create_snap {new} before its intent"));
                }
                self.ids.insert(new);
            }
            Some("create_thin") => {
                if !self.ids.insert(id(1)) {
                    return e(Errno::EEXIST);
                }
            }
            Some("delete") => {
                if !self.ids.contains(&id(1)) {
                    return e(Errno::ENODATA);
                }
                if active_ids.contains(&id(1)) {
                    return e(Errno::EBUSY);
                }
                self.ids.remove(&id(1));
            }
            _ => panic!("unexpected message {message:?} to {name}"),
        }
        Ok(String::new())
    }

    fn device(&mut self, op: Op, name: &str) -> Result<&mut Device, DmError> {
        self.active
            .get_mut(name)
            .ok_or_else(|| err(op, name, Errno::ENXIO))
    }
}

impl DeviceMapper for FakeDm {
    fn info(&self, name: &str) -> Result<Option<DevInfo>, DmError> {
        let s = self.log(format!("info {name}"));
        if name == POOL {
            return Ok(Some(DevInfo {
                suspended: false,
                read_only: false,
                live_table: true,
                open_count: 1,
                major: 254,
                minor: 1,
            }));
        }
        Ok(s.active.get(name).map(|d| DevInfo {
            suspended: d.suspended,
            read_only: d.read_only,
            live_table: true,
            open_count: u32::from(s.open.contains(name)),
            major: 253,
            minor: d.minor,
        }))
    }

    fn table(&self, name: &str) -> Result<Table, DmError> {
        let mut s = self.log(format!("table {name}"));
        if name == POOL {
            return Ok(s.pool_table.clone());
        }
        Ok(s.device(Op::Table, name)?.live.clone())
    }

    fn status(&self, name: &str) -> Result<Table, DmError> {
        let s = self.log(format!("status {name}"));
        assert_eq!(name, POOL, "the backend reads only the pool's status");
        Ok(s.pool_status.clone())
    }

    fn create(&self, name: &str, table: &Table, read_only: bool) -> Result<(), DmError> {
        let ro = if read_only { " --readonly" } else { "" };
        let mut s = self.log(format!("create {name}{ro} --table {table}"));
        if s.active.contains_key(name) || name == POOL {
            return Err(err(Op::Create, name, Errno::EBUSY));
        }
        if !s.ids.contains(&id_of(table)) {
            return Err(err(Op::Load, name, Errno::ENODATA));
        }
        s.insert(name, table.clone(), read_only);
        Ok(())
    }

    fn reload(&self, name: &str, table: &Table) -> Result<(), DmError> {
        let mut s = self.log(format!("reload {name} --table {table}"));
        if !s.ids.contains(&id_of(table)) {
            return Err(err(Op::Load, name, Errno::ENODATA));
        }
        s.device(Op::Load, name)?.inactive = Some(table.clone());
        Ok(())
    }

    fn suspend(&self, name: &str) -> Result<(), DmError> {
        let mut s = self.log(format!("suspend {name}"));
        s.device(Op::Suspend, name)?.suspended = true;
        Ok(())
    }

    fn resume(&self, name: &str) -> Result<(), DmError> {
        let mut s = self.log(format!("resume {name}"));
        let d = s.device(Op::Resume, name)?;
        if let Some(t) = d.inactive.take() {
            d.live = t;
        }
        d.suspended = false;
        Ok(())
    }

    fn remove(&self, name: &str) -> Result<(), DmError> {
        let mut s = self.log(format!("remove {name}"));
        s.device(Op::Remove, name)?;
        if s.open.contains(name) {
            return Err(err(Op::Remove, name, Errno::EBUSY));
        }
        s.active.remove(name);
        Ok(())
    }

    fn message(&self, name: &str, message: &str) -> Result<String, DmError> {
        let mut s = self.log(format!("message {name} 0 {message}"));
        assert_eq!(name, POOL, "the backend sends messages only to the pool");
        s.pool_message(name, message)
    }
}
