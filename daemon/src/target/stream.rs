//! The owner of each stream's replication state, and opening a stream at
//! start-up.
//!
//! A stream is a consistency group: what one source ships in one sequence
//! space, with one journal and one set of recovery points. Today a group has
//! one member volume; a group of several adds [`Member`]s, not a new
//! structure. Everything that says how far the replica is — applied and
//! durable sequence, ring generation and its base, epoch, resync window,
//! whether a full resync is needed, recovery points, Critical, promotion and
//! a failover waiting for the applier — lives in [`StreamState`] behind the
//! stream's one lock. The accept path, the receive loop, the applier and
//! promotion all read and write it there (the applier is the only one that
//! moves the applied sequence); none of them keeps a copy of its own.
//!
//! Lock order: the state, then the journal, then a member's replica; never
//! the state while holding the journal.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
use replica_proto::keys;
use replica_store::journal::{FramePos, Journal, Scan};
use replica_store::replica::ReplicaStore;
use replica_store::state::VolumeState;
use replica_store::StoreError;

use super::apply::{Applier, ApplyMsg};
use super::compare::Answers;
use super::points::resync_reason;
use super::promote::PendingFailover;
use crate::config::{TargetConfig, TargetVolume};
use crate::keystore::KeyStore;
use crate::status::{Connection, ReasonKind, ReplicaState, StatusBoard};
use crate::DaemonError;

/// Segments queued between receiver and applier.
const APPLY_QUEUE: usize = 8;

/// One replication stream (a consistency group) and its state.
pub(super) struct Stream {
    /// The stream's name: today its one volume's id, which also names its
    /// keys, its status entry and its state directory.
    pub(super) id: String,
    /// The volume tag its segments carry.
    pub(super) tag: [u8; 16],
    /// The volumes of the group (today exactly one).
    members: Vec<Member>,
    state: Mutex<StreamState>,
    journal: Mutex<Journal>,
    /// Which connection streams into it.
    pub(super) conn: ConnSlot,
    /// What may change at run time (configuration reload).
    pub(super) settings: Settings,
    /// The applier's inbox, in stream order.
    pub(super) apply_tx: Sender<ApplyMsg>,
    /// Chunk comparisons answered, for the source's connection.
    pub(super) answers: Arc<Answers>,
}

/// A volume of a stream: the replica it is applied to.
pub(super) struct Member {
    /// Size in bytes: no record may write beyond it.
    pub(super) size: u64,
    /// Opened once, at start-up (opening runs the backend's recovery).
    /// Only the applier writes the replica (other paths ask it by message,
    /// in stream order); the point commands of the control socket open and
    /// close its points under the same lock.
    replica: Mutex<Box<dyn ReplicaStore>>,
}

impl Member {
    /// The replica (the applier's; the point commands').
    pub(super) fn replica(&self) -> MutexGuard<'_, Box<dyn ReplicaStore>> {
        self.replica.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The replication state of a stream: the one copy there is.
pub(super) struct StreamState {
    /// Where `disk` is saved.
    path: PathBuf,
    /// What is persisted: generation and its base, epoch, the applied
    /// sequence as of the last checkpoint, points, resync window, whether a
    /// full resync is needed, Critical, promotion.
    pub(super) disk: VolumeState,
    /// Last record applied to the replica, flushed or not. Only the
    /// applier moves it.
    pub(super) applied: u64,
    /// Last record acks and welcomes report as applied: flushed, recorded,
    /// and any recovery point at it taken.
    pub(super) published: u64,
    /// A failover is under way or done: no stream is accepted.
    pub(super) promoting: bool,
    /// The failover request waiting for the applier, until it takes it up
    /// (or refuses it, or its requester gives up): an unplanned one makes
    /// a retrying applier give way, a planned one is refused while the
    /// replica cannot be written (see `promote`).
    pub(super) failover: Option<PendingFailover>,
    /// A takeover is queued to the applier and not yet done: no stream is
    /// accepted (it could be journaled under the old generation's state).
    pub(super) takeover_pending: bool,
}

impl StreamState {
    /// Persists `disk` (atomically).
    pub(super) fn save(&self) -> Result<(), StoreError> {
        self.disk.save(&self.path)
    }

    /// The replica is not a consistent copy: a resync runs, or a full one
    /// is needed.
    pub(super) fn inconsistent(&self) -> bool {
        self.disk.resync_since.is_some() || self.disk.needs_full_resync
    }
}

impl Stream {
    /// The state, locked.
    pub(super) fn lock_state(&self) -> MutexGuard<'_, StreamState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The journal, locked (after the state, if both).
    pub(super) fn lock_journal(&self) -> MutexGuard<'_, Journal> {
        self.journal.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The stream's one volume (a group would route each record to the
    /// member its volume index names).
    pub(super) fn volume(&self) -> &Member {
        &self.members[0]
    }

    /// Last record durable here (journaled and synced, or applied), with
    /// the state `st` locked by the caller.
    pub(super) fn durable_with(&self, st: &StreamState) -> u64 {
        self.lock_journal().durable_seq().max(st.disk.applied_seq)
    }

    /// Marks the stream Critical (persisted: it stays Critical across
    /// restarts until an operator clears it).
    pub(super) fn go_critical(&self, board: &StatusBoard, why: &str) {
        tracing::error!(volume = %self.id, reason = why, "volume is Critical");
        {
            let mut st = self.lock_state();
            if st.disk.critical.is_none() {
                st.disk.critical = Some(why.to_owned());
                if let Err(e) = st.save() {
                    tracing::error!(error = %e, "cannot persist Critical state");
                }
            }
        }
        board.update(&self.id, |s| {
            s.connection = Connection::StandAlone;
            // The first non-recoverable error is the one persisted.
            if s.reason(ReasonKind::Stopped).is_none() {
                s.set_reason(ReasonKind::Stopped, why);
            }
        });
    }
}

/// Which connection streams into a stream. A newer connection bumps
/// `session` and waits for the older one to finish, so journal order,
/// apply order and what the stream has received always agree.
#[derive(Default)]
pub(super) struct ConnSlot {
    session: AtomicU64,
    /// Held by the one connection that streams into the stream.
    streaming: AtomicBool,
}

impl ConnSlot {
    /// Whether session `id` is still the newest.
    pub(super) fn is_current(&self, id: u64) -> bool {
        self.session.load(Ordering::Acquire) == id
    }

    /// Tells the session that streams now to stop (it sees it is no
    /// longer current); returns the id of the next one.
    pub(super) fn supersede(&self) -> u64 {
        self.session.fetch_add(1, Ordering::AcqRel) + 1
    }

    /// Waits until no connection streams, until `deadline`.
    pub(super) fn wait_idle(&self, deadline: Instant) -> bool {
        while self.streaming.load(Ordering::Acquire) {
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        true
    }
}

/// The streaming slot of a stream, held by one connection; released when
/// dropped.
pub(super) struct SlotGuard(Arc<Stream>);

impl Drop for SlotGuard {
    fn drop(&mut self) {
        self.0.conn.streaming.store(false, Ordering::Release);
    }
}

/// Takes `stream` over from an older connection (a source that
/// restarted): tells it to stop, then waits until it has. `None` if it has
/// not by `deadline`, or a newer connection came meanwhile.
pub(super) fn claim(stream: &Arc<Stream>, deadline: Instant) -> Option<(u64, SlotGuard)> {
    let id = stream.conn.supersede();
    while stream.conn.streaming.swap(true, Ordering::AcqRel) {
        if Instant::now() > deadline || !stream.conn.is_current(id) {
            return None;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Some((id, SlotGuard(stream.clone())))
}

/// A stream's settings that a configuration reload changes.
pub(super) struct Settings {
    /// Certificate subjects allowed to replicate it.
    allowed_sources: RwLock<Vec<String>>,
    /// Recovery points kept.
    keep_points: AtomicUsize,
    /// Least time between crash-consistent points, s.
    crash_point_interval_secs: AtomicU64,
}

impl Settings {
    fn new(vc: &TargetVolume) -> Self {
        Self {
            allowed_sources: RwLock::new(vc.allowed_sources.clone()),
            keep_points: AtomicUsize::new(vc.keep_points),
            crash_point_interval_secs: AtomicU64::new(vc.crash_point_interval_secs),
        }
    }

    /// Takes the reloadable settings of `vc`.
    pub(super) fn update(&self, vc: &TargetVolume) {
        *self
            .allowed_sources
            .write()
            .unwrap_or_else(|p| p.into_inner()) = vc.allowed_sources.clone();
        self.keep_points.store(vc.keep_points, Ordering::Release);
        self.crash_point_interval_secs
            .store(vc.crash_point_interval_secs, Ordering::Release);
    }

    /// Whether certificate subject `cn` may replicate the stream.
    pub(super) fn allows(&self, cn: &str) -> bool {
        self.allowed_sources
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .any(|a| a == cn)
    }

    /// Recovery points kept.
    pub(super) fn keep_points(&self) -> usize {
        self.keep_points.load(Ordering::Acquire)
    }

    /// Least time between crash-consistent points.
    pub(super) fn crash_point_interval(&self) -> Duration {
        Duration::from_secs(self.crash_point_interval_secs.load(Ordering::Acquire))
    }
}

/// Opens the stream of volume `vc`: loads its state, opens its journal
/// (moving a damaged one aside), opens its replica and deletes snapshots
/// without a record, starts its applier and queues what is journaled but
/// not applied.
pub(super) fn open(
    cfg: &TargetConfig,
    vc: &TargetVolume,
    keys: Arc<KeyStore>,
    board: Arc<StatusBoard>,
    stop: Arc<AtomicBool>,
) -> Result<(Arc<Stream>, JoinHandle<()>), DaemonError> {
    let dir = cfg.state_dir.join("volumes").join(&vc.id);
    std::fs::create_dir_all(&dir)
        .map_err(|e| DaemonError::io("create volume directory", &dir, e))?;
    let path = dir.join("state.json");
    let mut state = VolumeState::load(&path)?;
    let (journal, scan) = open_journal(&vc.id, &dir, cfg.journal_file_bytes, &mut state)?;
    let mut replica = replica_store::backend::open_replica(&cfg.state_dir, vc)?;
    sweep_points(&vc.id, replica.as_mut(), &mut state, &path)?;
    check_generation(&vc.id, &scan, &mut state, &path)?;
    // (A Critical stream's applier applies none of them.)
    let replay: Vec<FramePos> = scan
        .frames
        .into_iter()
        .filter(|f| f.header.last_seq > state.applied_seq)
        .collect();
    publish_opened(&board, &vc.id, &state, journal.durable_seq());
    // Bounded: a slow replica pushes back on the connection, and through it
    // on the source, instead of growing memory.
    let (apply_tx, apply_rx) = crossbeam_channel::bounded(APPLY_QUEUE);
    let applied = state.applied_seq;
    let promoted = state.promoted.is_some();
    let stream = Arc::new(Stream {
        id: vc.id.clone(),
        tag: keys::volume_tag(&vc.id),
        members: vec![Member {
            size: vc.size,
            replica: Mutex::new(replica),
        }],
        state: Mutex::new(StreamState {
            path,
            disk: state,
            applied,
            published: applied,
            promoting: promoted,
            failover: None,
            takeover_pending: false,
        }),
        journal: Mutex::new(journal),
        conn: ConnSlot::default(),
        settings: Settings::new(vc),
        apply_tx,
        answers: Arc::new(Answers::default()),
    });
    let s2 = stream.clone();
    let h = std::thread::Builder::new()
        .name(format!("apply-{}", vc.id))
        .spawn(move || Applier::new(s2, keys, board, stop).run(apply_rx))
        .map_err(|e| DaemonError::io("spawn applier", &dir, e))?;
    // Segments journaled but not applied before the last stop (none once
    // the replica was promoted: it is the primary volume now).
    if !promoted {
        for pos in replay {
            let _ = stream.apply_tx.send(ApplyMsg::Segment { pos, body: None });
        }
    }
    Ok((stream, h))
}

/// Opens the journal under `dir`. Acknowledged records that are damaged or
/// missing make the stream Critical (the others go on): the damaged journal
/// is kept aside for inspection and the stream starts with an empty one. A
/// journal of another format version is kept aside the same way (its
/// records are not lost: the version that wrote it reads them).
fn open_journal(
    volume: &str,
    dir: &Path,
    file_bytes: u64,
    state: &mut VolumeState,
) -> Result<(Journal, Scan), DaemonError> {
    let jdir = dir.join("journal");
    match Journal::open(&jdir, file_bytes) {
        Ok(x) => Ok(x),
        Err(e @ (StoreError::Corrupt { .. } | StoreError::Invalid(_))) => {
            let reason = match &e {
                StoreError::Corrupt { .. } => {
                    format!("journal damaged, acknowledged records lost: {e}")
                }
                _ => format!("journal unreadable: {e}"),
            };
            tracing::error!(volume = %volume, "{reason}");
            let aside = dir.join(format!("journal.damaged-{}", super::now_ns()));
            std::fs::rename(&jdir, &aside)
                .map_err(|e| DaemonError::io("move the damaged journal aside", &jdir, e))?;
            replica_fs::sync_dir(dir)?;
            if state.critical.is_none() {
                state.critical = Some(format!("{reason} (kept in {})", aside.display()));
                state.save(&dir.join("state.json"))?;
            }
            Ok(Journal::open(&jdir, file_bytes)?)
        }
        Err(e) => Err(e.into()),
    }
}

/// Snapshots without a record (a crash between taking one and recording
/// it) are deleted; records without a snapshot are dropped.
fn sweep_points(
    volume: &str,
    replica: &mut dyn ReplicaStore,
    state: &mut VolumeState,
    path: &Path,
) -> Result<(), StoreError> {
    let on_disk = replica.list_points()?;
    for id in &on_disk {
        if !state.points.iter().any(|p| p.id == *id) {
            tracing::warn!(volume = %volume, point = id, "deleting unrecorded snapshot");
            replica.delete_point(*id)?;
        }
    }
    let before = state.points.len();
    state.points.retain(|p| on_disk.contains(&p.id));
    if state.points.len() != before {
        state.save(path)?;
    }
    Ok(())
}

/// A takeover restarts the journal before it records the new generation,
/// so every frame belongs to the generation the state names; one that does
/// not would be applied in the wrong sequence space: the stream is
/// Critical.
fn check_generation(
    volume: &str,
    scan: &Scan,
    state: &mut VolumeState,
    path: &Path,
) -> Result<(), StoreError> {
    let Some(f) = scan
        .frames
        .iter()
        .find(|f| hex::encode(f.header.generation) != state.generation)
    else {
        return Ok(());
    };
    if state.critical.is_none() && state.promoted.is_none() {
        let why = format!(
            "the journal holds segment {}..={} of ring generation {}, not of the replica's ({})",
            f.header.first_seq,
            f.header.last_seq,
            hex::encode(f.header.generation),
            if state.generation.is_empty() {
                "none"
            } else {
                &state.generation
            }
        );
        tracing::error!(volume = %volume, "{why}");
        state.critical = Some(why);
        state.save(path)?;
    }
    Ok(())
}

/// The status of a stream as opened.
fn publish_opened(board: &StatusBoard, volume: &str, state: &VolumeState, journal_durable: u64) {
    let inconsistent =
        state.points.is_empty() || state.resync_since.is_some() || state.needs_full_resync;
    board.update(volume, |s| {
        s.generation = state.generation.clone();
        s.generation_base = state.generation_base;
        s.epoch = state.epoch;
        s.durable_seq = journal_durable.max(state.applied_seq);
        s.applied_seq = state.applied_seq;
        s.points = state.points.len() as u64;
        s.last_point_seq = state.points.last().map_or(0, |p| p.seq);
        s.replica = if inconsistent {
            ReplicaState::Inconsistent
        } else {
            ReplicaState::Consistent
        };
        if let Some(since) = state.resync_since {
            s.set_reason(
                ReasonKind::Resync,
                resync_reason(since, state.needs_full_resync),
            );
        }
        if let Some(c) = &state.critical {
            s.set_reason(ReasonKind::Stopped, c.clone());
        }
    });
}
