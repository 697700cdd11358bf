//! Target role: accept authorised sources, verify and journal their
//! segments durably, acknowledge, and apply them in order to the replica,
//! taking recovery points at committed flushes.
//!
//! Per volume there is one applier thread that owns the replica; each
//! connection runs on its own thread and talks to the applier through a
//! channel. The newest connection for a volume wins: an older one (a source
//! that restarted) notices and ends.

use std::collections::HashMap;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crossbeam_channel::{Receiver, Sender};
use replica_proto::frame::{self, resync, FrameError, RecordView, SegmentHeader};
use replica_proto::keys::{self, Direction, StreamContext, StreamKey};

use crate::keystore::KeyStore;
use replica_proto::msg::{self, Ack, ErrorClass, ErrorMsg, Hello, Message, Welcome};
use replica_store::journal::{self, FramePos, Journal};
use replica_store::replica::{ApplyOp, ReplicaStore};
use replica_store::state::{PointKind, RecoveryPoint, VolumeState};
use replica_store::StoreError;

use crate::config::{TargetConfig, TargetVolume};
use crate::link::{Link, LinkError};
use crate::status::{Connection, Health, Role, StatusBoard, VolumeStatus};
use crate::DaemonError;

pub mod backend;

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const PUMP_INTERVAL: Duration = Duration::from_millis(100);
/// Segments queued between receiver and applier.
const APPLY_QUEUE: usize = 8;

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// What the applier is asked to do, in order.
enum ApplyMsg {
    /// A journaled segment: where it is, and its authenticated (still
    /// compressed) payload when the receiver still has it; after a restart
    /// the applier reads and authenticates the frame from the journal
    /// itself.
    Segment {
        pos: FramePos,
        body: Option<Vec<u8>>,
    },
    /// Failover: promote the replica once everything queued before is
    /// applied.
    Promote {
        req: PromoteReq,
        reply: Sender<Result<msg::Promoted, String>>,
    },
    /// A stream of another ring generation takes the volume over (or the
    /// first stream of a volume the target has no record of): once every
    /// earlier segment is applied, the journal starts over in the new
    /// sequence space at `base` (the last record before the stream's
    /// first). The applier is the only writer of the applied sequence, so
    /// the reset happens in its order, never behind its back.
    Takeover {
        takeover: Takeover,
        reply: Sender<Result<(), StoreError>>,
    },
}

/// What a [`ApplyMsg::Takeover`] sets.
#[derive(Debug, Clone)]
struct Takeover {
    /// The new ring generation, hex.
    generation: String,
    /// The last record of the new generation taken as applied.
    base: u64,
    /// The replica holds no consistent copy from here on: a full resync
    /// must end before it is consistent again.
    needs_full_resync: bool,
}

/// A failover request.
#[derive(Debug, Clone, Copy)]
struct PromoteReq {
    /// Planned: the old primary's last record, which must be applied; the
    /// replica is promoted as it is then.
    planned_upto: Option<u64>,
    /// Unplanned: a recovery point's sequence, or the latest consistent
    /// state (`None`).
    point: Option<u64>,
    /// The epoch to move to (planned: the source's; else the current + 1).
    epoch: Option<u64>,
}

/// The applier flushes the replica and persists how far it is after this
/// many segments or this long, whichever comes first.
const CHECKPOINT_SEGMENTS: u32 = 64;
const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(1);

/// How long a failover may wait for the replica to catch up.
const PROMOTE_TIMEOUT: Duration = Duration::from_secs(600);

/// Shared state of one volume.
struct Volume {
    cfg: TargetVolume,
    dir: PathBuf,
    tag: [u8; 16],
    state: Mutex<VolumeState>,
    journal: Mutex<Journal>,
    applied: AtomicU64,
    session: AtomicU64,
    /// Certificate subjects allowed to replicate it (reloadable).
    allowed_sources: std::sync::RwLock<Vec<String>>,
    /// Recovery points kept (reloadable).
    keep_points: std::sync::atomic::AtomicUsize,
    /// Least time between crash-consistent points, s (reloadable).
    crash_point_interval: AtomicU64,
    /// Held by the one connection that streams into this volume. A newer
    /// connection bumps `session` and waits for the older one to finish,
    /// so journal order, apply order and `received` always agree.
    streaming: AtomicBool,
    /// A failover is under way or done: no stream is accepted.
    promoting: AtomicBool,
    /// A takeover is queued to the applier and not yet done: no stream is
    /// accepted (it could be journaled under the old generation's state).
    takeover_pending: AtomicBool,
    apply_tx: Sender<ApplyMsg>,
}

impl Volume {
    fn state_path(&self) -> PathBuf {
        self.dir.join("state.json")
    }

    fn allowed(&self) -> Vec<String> {
        self.allowed_sources
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn lock_state(&self) -> std::sync::MutexGuard<'_, VolumeState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_journal(&self) -> std::sync::MutexGuard<'_, Journal> {
        self.journal.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Marks the volume Critical (persisted: it stays Critical across
    /// restarts until an operator clears it).
    fn go_critical(&self, board: &StatusBoard, why: &str) {
        tracing::error!(volume = %self.cfg.id, reason = why, "volume is Critical");
        {
            let mut st = self.lock_state();
            if st.critical.is_none() {
                st.critical = Some(why.to_owned());
                if let Err(e) = st.save(&self.state_path()) {
                    tracing::error!(error = %e, "cannot persist Critical state");
                }
            }
        }
        board.update(&self.cfg.id, |s| {
            s.health = Health::Critical;
            s.connection = Connection::StandAlone;
            if !s.reasons.iter().any(|r| r == why) {
                s.reasons.push(why.to_owned());
            }
        });
    }
}

/// A running target.
pub struct Target {
    volumes: HashMap<String, Arc<Volume>>,
    appliers: Vec<JoinHandle<()>>,
    keys: Arc<KeyStore>,
    tls: Arc<crate::tls::Reloadable<rustls::ServerConfig>>,
    tls_cfg: crate::config::TlsConfig,
    config: TargetConfig,
    config_path: Option<PathBuf>,
    board: Arc<StatusBoard>,
    stop: Arc<AtomicBool>,
    listener: TcpListener,
    control: JoinHandle<()>,
    notifier: crate::control::Notifier,
    hup: Arc<AtomicU64>,
}

/// A failure handling one connection, classified.
#[derive(Debug)]
struct Refusal {
    class: ErrorClass,
    code: &'static str,
    message: String,
}

impl Refusal {
    fn fatal(code: &'static str, message: impl Into<String>) -> Self {
        Self {
            class: ErrorClass::Fatal,
            code,
            message: message.into(),
        }
    }
    fn recoverable(code: &'static str, message: impl Into<String>) -> Self {
        Self {
            class: ErrorClass::Recoverable,
            code,
            message: message.into(),
        }
    }
}

impl Target {
    /// Opens every volume (journal scan, replay of unapplied segments,
    /// orphan point cleanup) and binds the listener.
    pub fn start(cfg: &TargetConfig, sig: crate::cli::Signals) -> Result<Self, DaemonError> {
        let stop = sig.stop.clone();
        let keys = KeyStore::load(&cfg.keys)?;
        let tls = Arc::new(crate::tls::Reloadable::new(crate::tls::server_config(
            &cfg.tls,
        )?));
        crate::create_state_dir(&cfg.state_dir)?;
        let board = Arc::new(StatusBoard::new(
            &cfg.state_dir,
            cfg.volumes
                .iter()
                .map(|v| VolumeStatus::new(&v.id, Role::Secondary))
                .collect(),
        ));
        let mut volumes = HashMap::new();
        let mut appliers = Vec::new();
        for vc in &cfg.volumes {
            let (vol, applier) = open_volume(cfg, vc, keys.clone(), board.clone(), stop.clone())?;
            volumes.insert(vc.id.clone(), vol);
            appliers.push(applier);
        }
        let listener = TcpListener::bind(&cfg.listen)
            .map_err(|e| DaemonError::io("listen on", Path::new(&cfg.listen), e))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| DaemonError::io("listen on", Path::new(&cfg.listen), e))?;
        let bound = listener
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        // The bound address (useful with port 0) for operators and tools.
        replica_store::state::write_atomic(&cfg.state_dir.join("listen.addr"), bound.as_bytes())?;
        let sock = cfg
            .control_socket
            .clone()
            .unwrap_or_else(|| crate::control::default_path(&cfg.state_dir));
        let handler: crate::control::Handler = {
            let vols = volumes.clone();
            Arc::new(move |r: &crate::control::Request| {
                (r.command == "failover")
                    .then(|| failover_command(&vols, r).map(crate::control::Reply::from))
            })
        };
        let control = crate::control::serve(&sock, board.clone(), stop.clone(), Some(handler))?;
        let notifier = crate::control::Notifier::new();
        // Journals scanned, replicas open, listening, control socket up:
        // only now can the target serve.
        notifier.ready(&format!(
            "listening on {bound}, {} volume(s)",
            volumes.len()
        ));
        tracing::info!(listen = %bound, "target ready");
        Ok(Self {
            volumes,
            appliers,
            keys,
            tls,
            tls_cfg: cfg.tls.clone(),
            config: cfg.clone(),
            config_path: None,
            board,
            stop,
            listener,
            control,
            notifier,
            hup: sig.hup,
        })
    }

    /// SIGHUP: reload keys and certificates (new connections use them).
    /// A file that does not load leaves what is in force.
    fn reload(&mut self) {
        self.reload_config();
        crate::tls::reload_material(&self.keys, &self.tls, || {
            crate::tls::server_config(&self.tls_cfg)
        });
        self.check_expiry();
    }

    /// Applies what may change at run time from the configuration file
    /// (TLS file paths, each volume's `allowed_sources` and `keep_points`);
    /// anything else that changed is reported and ignored until a restart.
    fn reload_config(&mut self) {
        let Some(path) = self.config_path.clone() else {
            return;
        };
        let new = match TargetConfig::load(&path) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "configuration reload failed; keeping the configuration in force");
                return;
            }
        };
        let old = &self.config;
        let mut fixed = Vec::new();
        if new.listen != old.listen {
            fixed.push("listen");
        }
        if new.state_dir != old.state_dir {
            fixed.push("state_dir");
        }
        if new.control_socket != old.control_socket {
            fixed.push("control_socket");
        }
        if new.keys != old.keys {
            fixed.push("keys");
        }
        if new.journal_file_bytes != old.journal_file_bytes {
            fixed.push("journal_file_bytes");
        }
        let same_volumes = new.volumes.len() == old.volumes.len()
            && new
                .volumes
                .iter()
                .zip(&old.volumes)
                .all(|(n, o)| n.id == o.id && n.size == o.size && n.replica == o.replica);
        if !same_volumes {
            fixed.push("volume (ids, sizes, replicas)");
        }
        for f in &fixed {
            tracing::error!(
                key = f,
                "configuration key cannot change at run time; restart the daemon to apply it"
            );
        }
        for nv in &new.volumes {
            if let Some(v) = self.volumes.get(&nv.id) {
                *v.allowed_sources.write().unwrap_or_else(|p| p.into_inner()) =
                    nv.allowed_sources.clone();
                v.keep_points.store(nv.keep_points, Ordering::Release);
                v.crash_point_interval
                    .store(nv.crash_point_interval_secs, Ordering::Release);
            }
        }
        self.tls_cfg = new.tls.clone();
        tracing::info!("configuration reloaded");
        self.config = new;
    }

    /// Warns (log and status) about certificates that expire soon.
    fn check_expiry(&self) {
        crate::tls::publish_expiry(
            &self.tls_cfg,
            &self.board,
            self.volumes.keys().map(String::as_str),
        );
    }

    /// Re-read `path` on SIGHUP for what can change at run time.
    pub fn reload_from(mut self, path: &Path) -> Self {
        self.config_path = Some(path.to_owned());
        self
    }

    /// Accepts connections until `stop` is set, then waits for the
    /// appliers to finish what is journaled.
    pub fn run(mut self) -> Result<(), DaemonError> {
        let mut conns: Vec<JoinHandle<()>> = Vec::new();
        let mut hup_seen = self.hup.load(Ordering::Acquire);
        self.check_expiry();
        let mut last_expiry_check = Instant::now();
        while !self.stop.load(Ordering::Acquire) {
            self.notifier.tick();
            if self.hup.load(Ordering::Acquire) != hup_seen {
                hup_seen = self.hup.load(Ordering::Acquire);
                self.reload();
            }
            if last_expiry_check.elapsed() > Duration::from_secs(3600) {
                self.check_expiry();
                last_expiry_check = Instant::now();
            }
            match self.listener.accept() {
                Ok((sock, peer)) => {
                    tracing::info!(%peer, "connection");
                    let ctx = ConnCtx {
                        volumes: self.volumes.clone(),
                        keys: self.keys.clone(),
                        tls: self.tls.get(),
                        board: self.board.clone(),
                        stop: self.stop.clone(),
                    };
                    conns.push(std::thread::spawn(move || ctx.serve(sock)));
                    conns.retain(|h| !h.is_finished());
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    let fd = std::os::fd::AsFd::as_fd(&self.listener);
                    let mut fds = [nix::poll::PollFd::new(fd, nix::poll::PollFlags::POLLIN)];
                    let _ = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(200u16));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
        for h in conns {
            let _ = h.join();
        }
        self.notifier.stopping();
        // Appliers end when every sender of their channel is gone.
        drop(self.volumes);
        for a in self.appliers {
            let _ = a.join();
        }
        let _ = self.control.join();
        Ok(())
    }
}

fn open_volume(
    cfg: &TargetConfig,
    vc: &TargetVolume,
    keys: Arc<KeyStore>,
    board: Arc<StatusBoard>,
    stop: Arc<AtomicBool>,
) -> Result<(Arc<Volume>, JoinHandle<()>), DaemonError> {
    let dir = cfg.state_dir.join("volumes").join(&vc.id);
    std::fs::create_dir_all(&dir)
        .map_err(|e| DaemonError::io("create volume directory", &dir, e))?;
    let mut state = VolumeState::load(&dir.join("state.json"))?;
    let jdir = dir.join("journal");
    let (journal, scan) = match Journal::open(&jdir, cfg.journal_file_bytes) {
        Ok(x) => x,
        // Acknowledged records are damaged or missing: this volume is
        // Critical (the others go on). The damaged journal is kept aside
        // for inspection; the volume starts with an empty one.
        // A journal of another format version is kept aside the same way
        // (its records are not lost: the version that wrote it reads them).
        Err(e @ (StoreError::Corrupt { .. } | StoreError::Invalid(_))) => {
            let reason = match &e {
                StoreError::Corrupt { .. } => {
                    format!("journal damaged, acknowledged records lost: {e}")
                }
                _ => format!("journal unreadable: {e}"),
            };
            tracing::error!(volume = %vc.id, "{reason}");
            let aside = dir.join(format!("journal.damaged-{}", now_ns()));
            std::fs::rename(&jdir, &aside)
                .map_err(|e| DaemonError::io("move the damaged journal aside", &jdir, e))?;
            journal::sync_dir(&dir)?;
            if state.critical.is_none() {
                state.critical = Some(format!("{reason} (kept in {})", aside.display()));
                state.save(&dir.join("state.json"))?;
            }
            Journal::open(&jdir, cfg.journal_file_bytes)?
        }
        Err(e) => return Err(e.into()),
    };
    let mut replica = backend::open_replica(&cfg.state_dir, vc)?;
    // Snapshots without a record (a crash between taking one and recording
    // it) are deleted; records without a snapshot are dropped.
    let on_disk = replica.list_points()?;
    for id in &on_disk {
        if !state.points.iter().any(|p| p.id == *id) {
            tracing::warn!(volume = %vc.id, point = id, "deleting unrecorded snapshot");
            replica.delete_point(*id)?;
        }
    }
    let before = state.points.len();
    state.points.retain(|p| on_disk.contains(&p.id));
    if state.points.len() != before {
        state.save(&dir.join("state.json"))?;
    }
    let durable = journal.durable_seq().max(state.applied_seq);
    // Bounded: a slow replica pushes back on the connection, and through it
    // on the source, instead of growing memory.
    let (apply_tx, apply_rx) = crossbeam_channel::bounded(APPLY_QUEUE);
    // A takeover restarts the journal before it records the new generation,
    // so every frame belongs to the generation the state names; one that
    // does not would be applied in the wrong sequence space.
    if let Some(f) = scan
        .frames
        .iter()
        .find(|f| hex::encode(f.header.generation) != state.generation)
    {
        if state.critical.is_none() && state.promoted.is_none() {
            let why = format!(
                "the journal holds segment {}..={} of ring generation {}, not of the replica's ({})",
                f.header.first_seq,
                f.header.last_seq,
                hex::encode(f.header.generation),
                if state.generation.is_empty() { "none" } else { &state.generation }
            );
            tracing::error!(volume = %vc.id, "{why}");
            state.critical = Some(why);
            state.save(&dir.join("state.json"))?;
        }
    }
    // (A Critical volume's applier applies none of them.)
    let replay: Vec<FramePos> = scan
        .frames
        .into_iter()
        .filter(|f| f.header.last_seq > state.applied_seq)
        .collect();
    board.update(&vc.id, |s| {
        s.generation = state.generation.clone();
        s.generation_base = state.generation_base;
        s.epoch = state.epoch;
        s.durable_seq = durable;
        s.applied_seq = state.applied_seq;
        s.points = state.points.len() as u64;
        s.last_point_seq = state.points.last().map_or(0, |p| p.seq);
        s.replica =
            if state.points.is_empty() || state.resync_since.is_some() || state.needs_full_resync {
                "Inconsistent".into()
            } else {
                "Consistent".into()
            };
        if let Some(since) = state.resync_since {
            s.health = Health::Warning;
            s.reasons = vec![resync_reason(since, state.needs_full_resync)];
        }
        if let Some(c) = &state.critical {
            s.health = Health::Critical;
            s.reasons = vec![c.clone()];
        }
    });
    let applied = state.applied_seq;
    let promoted = state.promoted.is_some();
    let vol = Arc::new(Volume {
        cfg: vc.clone(),
        dir: dir.clone(),
        tag: keys::volume_tag(&vc.id),
        state: Mutex::new(state),
        journal: Mutex::new(journal),
        applied: AtomicU64::new(applied),
        session: AtomicU64::new(0),
        streaming: AtomicBool::new(false),
        promoting: AtomicBool::new(promoted),
        takeover_pending: AtomicBool::new(false),
        allowed_sources: std::sync::RwLock::new(vc.allowed_sources.clone()),
        keep_points: std::sync::atomic::AtomicUsize::new(vc.keep_points),
        crash_point_interval: AtomicU64::new(vc.crash_point_interval_secs),
        apply_tx,
    });
    let v2 = vol.clone();
    let h = std::thread::Builder::new()
        .name(format!("apply-{}", vc.id))
        .spawn(move || Applier::new(v2, replica, keys, board, stop).run(apply_rx))
        .map_err(|e| DaemonError::io("spawn applier", &dir, e))?;
    // Segments journaled but not applied before the last stop (none once
    // the replica was promoted: it is the primary volume now).
    if !promoted {
        for pos in replay {
            let _ = vol.apply_tx.send(ApplyMsg::Segment { pos, body: None });
        }
    }
    Ok((vol, h))
}

/// A segment appended to the journal, with its authenticated payload.
type Journaled = (FramePos, Vec<u8>);

struct ConnCtx {
    volumes: HashMap<String, Arc<Volume>>,
    keys: Arc<KeyStore>,
    tls: Arc<rustls::ServerConfig>,
    board: Arc<StatusBoard>,
    stop: Arc<AtomicBool>,
}

/// What the connection knows after the handshake.
/// Releases a volume's streaming slot when a session ends.
struct StreamGuard(Arc<Volume>);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.streaming.store(false, Ordering::Release);
    }
}

struct Session {
    vol: Arc<Volume>,
    _guard: StreamGuard,
    id: u64,
    stream_id: [u8; 16],
    generation: [u8; 16],
    epoch: u64,
    next_counter: u64,
    /// Last record durable in the journal (acknowledged).
    durable: u64,
    /// Last record appended to the journal (durable at the next sync).
    received: u64,
    keys: HashMap<u32, StreamKey>,
}

impl ConnCtx {
    fn serve(self, sock: TcpStream) {
        let conn = match rustls::ServerConnection::new(self.tls.clone()) {
            Ok(c) => rustls::Connection::Server(c),
            Err(e) => {
                tracing::error!(error = %e, "TLS setup");
                return;
            }
        };
        let mut link = match Link::new(sock, conn) {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "connection setup");
                return;
            }
        };
        if let Err(e) = link.handshake(HANDSHAKE_TIMEOUT) {
            // A refused certificate is logged; the client sees the alert.
            tracing::warn!(error = %e, "TLS handshake failed");
            return;
        }
        let mut session = match self.accept(&mut link) {
            Ok(s) => s,
            Err((vol, r)) => {
                self.refuse(&mut link, vol.as_ref(), &r);
                return;
            }
        };
        let vol = session.vol.clone();
        self.board.update(&vol.cfg.id, |s| {
            s.connection = Connection::Connected;
            if s.health == Health::Warning {
                s.health = Health::OK;
                s.reasons.clear();
            }
        });
        let result = self.stream(&mut link, &mut session);
        if session.vol.session.load(Ordering::Acquire) == session.id {
            self.board
                .update(&vol.cfg.id, |s| s.connection = Connection::StandAlone);
        }
        match result {
            Ok(()) => link.close(Duration::from_secs(1)),
            Err(r) => self.refuse(&mut link, Some(&vol), &r),
        }
    }

    fn refuse(&self, link: &mut Link, vol: Option<&Arc<Volume>>, r: &Refusal) {
        tracing::warn!(code = r.code, class = ?r.class, "{}", r.message);
        if let Some(v) = vol {
            match r.class {
                ErrorClass::Fatal => v.go_critical(&self.board, &r.message),
                ErrorClass::Recoverable => self.board.update(&v.cfg.id, |s| {
                    s.health = Health::Warning;
                    s.reasons = vec![r.message.clone()];
                }),
            }
        }
        link.send(&Message::Error(ErrorMsg {
            class: r.class,
            code: r.code.into(),
            message: r.message.clone(),
        }));
        link.close(Duration::from_secs(2));
    }

    /// Checks the peer and its hello. On refusal, the volume is returned
    /// with the error when the error says something about the volume's
    /// replica (it then goes Critical); refusals of the caller (unknown
    /// volume, not authorised, stale epoch) leave the volume alone.
    fn accept(&self, link: &mut Link) -> Result<Session, (Option<Arc<Volume>>, Refusal)> {
        self.accept_inner(link)
            .map_err(|(critical, vol, r)| (if critical { vol } else { None }, r))
    }

    fn accept_inner(
        &self,
        link: &mut Link,
    ) -> Result<Session, (bool, Option<Arc<Volume>>, Refusal)> {
        let caller = |r: Refusal| (false, None, r);
        let cn = link
            .tls()
            .peer_certificates()
            .and_then(|c| c.first())
            .and_then(crate::tls::subject_cn)
            .ok_or_else(|| {
                caller(Refusal::fatal(
                    "no-identity",
                    "client certificate has no subject common name",
                ))
            })?;
        let hello = recv_hello(link).map_err(caller)?;
        if hello.protocol != msg::PROTOCOL_VERSION {
            return Err(caller(Refusal::fatal(
                "protocol",
                format!("protocol version {} not supported", hello.protocol),
            )));
        }
        let vol = self.volumes.get(&hello.volume).cloned().ok_or_else(|| {
            caller(Refusal::fatal(
                "volume-not-found",
                format!("volume {:?} is not configured on this target", hello.volume),
            ))
        })?;
        if !vol.allowed().iter().any(|a| a == &cn) {
            return Err(caller(Refusal::fatal(
                "not-authorized",
                format!(
                    "certificate subject {cn:?} is not allowed to replicate volume {}",
                    vol.cfg.id
                ),
            )));
        }
        // Take the volume over from an older connection (a source that
        // restarted): tell it to stop, then wait until it has.
        let id = vol.session.fetch_add(1, Ordering::AcqRel) + 1;
        let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
        while vol.streaming.swap(true, Ordering::AcqRel) {
            if Instant::now() > deadline || vol.session.load(Ordering::Acquire) != id {
                return Err(caller(Refusal::recoverable(
                    "busy",
                    "another connection is still streaming into this volume",
                )));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let guard = StreamGuard(vol.clone());
        let bad_hex = || caller(Refusal::fatal("protocol", "malformed hello"));
        let mut generation = [0u8; 16];
        hex::decode_to_slice(&hello.generation, &mut generation).map_err(|_| bad_hex())?;
        let mut src_rand = [0u8; 16];
        hex::decode_to_slice(&hello.source_random, &mut src_rand).map_err(|_| bad_hex())?;
        let target_rand =
            keys::random16().map_err(|e| caller(Refusal::recoverable("random", e.to_string())))?;
        let replica_err = |r: Refusal| (true, Some(vol.clone()), r);
        let stream_id = keys::stream_id(&src_rand, &target_rand);

        let gen_hex = hex::encode(generation);
        let takeover = {
            let st = vol.lock_state();
            if let Some(c) = &st.critical {
                return Err(caller(Refusal::fatal(
                    "critical",
                    format!("volume {} is Critical: {c}", vol.cfg.id),
                )));
            }
            if let Some(p) = &st.promoted {
                return Err(caller(Refusal::fatal(
                    "promoted",
                    format!("volume {} was failed over to this host at epoch {} and is the primary now: the old source must reprotect", vol.cfg.id, p.epoch),
                )));
            }
            if vol.promoting.load(Ordering::Acquire) {
                return Err(caller(Refusal::recoverable(
                    "failover",
                    format!("volume {} is being failed over", vol.cfg.id),
                )));
            }
            if vol.takeover_pending.load(Ordering::Acquire) {
                return Err(caller(Refusal::recoverable(
                    "busy",
                    "a takeover of a new ring generation is still being applied",
                )));
            }
            if hello.epoch < st.epoch {
                return Err(caller(Refusal::fatal(
                    "stale-epoch",
                    format!("source is at epoch {} but the target is at {}: the source was failed over and must reprotect", hello.epoch, st.epoch),
                )));
            }
            takeover_for(&st, &gen_hex, &hello)
        };
        if let Some(t) = takeover {
            // Queued behind every segment of the old generation: the
            // applier applies them, then starts the new sequence space.
            let (tx, rx) = crossbeam_channel::bounded(1);
            let busy = || {
                caller(Refusal::recoverable(
                    "busy",
                    "still applying the previous ring generation's journal",
                ))
            };
            // Set before it is queued, cleared by the applier once done:
            // no other stream gets in between (this one holds the
            // streaming slot; a later one is refused while it is set).
            vol.takeover_pending.store(true, Ordering::Release);
            if vol
                .apply_tx
                .send_timeout(
                    ApplyMsg::Takeover {
                        takeover: t,
                        reply: tx,
                    },
                    TAKEOVER_WAIT,
                )
                .is_err()
            {
                vol.takeover_pending.store(false, Ordering::Release);
                return Err(busy());
            }
            match rx.recv_timeout(TAKEOVER_WAIT) {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(replica_err(store_refusal(&e))),
                Err(_) => return Err(busy()),
            }
        }
        let (durable, applied, epoch, resync_required, inconsistent) = {
            let mut st = vol.lock_state();
            if st.generation != gen_hex || st.critical.is_some() || st.promoted.is_some() {
                // The applier refused the takeover (Critical, promoted) or
                // another one got in between.
                return Err(caller(Refusal::recoverable(
                    "busy",
                    "the volume changed while the stream was accepted",
                )));
            }
            st.epoch = hello.epoch;
            st.save(&vol.state_path())
                .map_err(|e| caller(store_refusal(&e)))?;
            let durable = vol.lock_journal().durable_seq().max(st.applied_seq);
            if hello.oldest_seq > durable.saturating_add(1) {
                return Err(replica_err(Refusal::fatal(
                    "sequence-gap",
                    format!("source starts at record {} but the target has only up to {durable}: records are missing", hello.oldest_seq),
                )));
            }
            (
                durable,
                vol.applied.load(Ordering::Acquire),
                st.epoch,
                st.needs_full_resync,
                st.resync_since.is_some() || st.needs_full_resync,
            )
        };
        if !self.keys.get().ids().contains(&hello.key_id) {
            return Err(replica_err(Refusal::fatal(
                "unknown-key",
                format!(
                    "source seals with key id {} which this target does not have",
                    hello.key_id
                ),
            )));
        }
        link.send(&Message::Welcome(Welcome {
            protocol: msg::PROTOCOL_VERSION,
            features: hello.features & msg::PROTOCOL_FEATURES,
            target_random: hex::encode(target_rand),
            durable_seq: durable,
            applied_seq: applied,
            epoch,
            resync_required,
            inconsistent,
        }));
        tracing::info!(volume = %vol.cfg.id, source = %cn, durable, resync_required, "stream accepted");
        self.board.update(&vol.cfg.id, |s| {
            s.generation = hex::encode(generation);
            s.epoch = epoch;
        });
        Ok(Session {
            _guard: guard,
            vol,
            id,
            stream_id,
            generation,
            epoch,
            next_counter: 0,
            durable,
            received: durable,
            keys: HashMap::new(),
        })
    }

    fn stream(&self, link: &mut Link, s: &mut Session) -> Result<(), Refusal> {
        let net = |e: LinkError| Refusal::recoverable("network", e.to_string());
        let mut last_applied_sent = s.vol.applied.load(Ordering::Acquire);
        let mut last_durable_sent = s.durable;
        let mut last_flags_sent = ack_flags(&s.vol.lock_state());
        loop {
            if self.stop.load(Ordering::Acquire) {
                return Ok(());
            }
            if s.vol.session.load(Ordering::Acquire) != s.id {
                tracing::info!(volume = %s.vol.cfg.id, "a newer connection took over this volume");
                return Ok(());
            }
            link.pump(PUMP_INTERVAL, None).map_err(net)?;
            let mut appended: Vec<Journaled> = Vec::new();
            let mut dup_ack = false;
            let mut failure = None;
            loop {
                let m = match link.recv() {
                    Ok(Some(m)) => m,
                    Ok(None) => break,
                    Err(LinkError::Closed) if appended.is_empty() => return Ok(()),
                    Err(LinkError::Closed) => break,
                    Err(e) => {
                        failure = Some(net(e));
                        break;
                    }
                };
                match m {
                    Message::Segment(f) => match self.segment(s, f) {
                        Ok(Some(a)) => appended.push(a),
                        Ok(None) => dup_ack = true,
                        Err(r) => {
                            failure = Some(r);
                            break;
                        }
                    },
                    Message::Error(e) => {
                        return Err(Refusal::recoverable(
                            "peer",
                            format!("source reported: {}", e.message),
                        ))
                    }
                    Message::Promote(p) => {
                        // Everything before it in the stream is journaled
                        // and queued: the applier promotes after it.
                        let r = request_promotion(
                            &s.vol,
                            PromoteReq {
                                planned_upto: Some(p.upto),
                                point: None,
                                epoch: Some(p.epoch),
                            },
                        );
                        match r {
                            Ok(done) => {
                                link.send(&Message::Promoted(done));
                                link.close(Duration::from_secs(5));
                                return Ok(());
                            }
                            Err(e) => {
                                failure = Some(Refusal::fatal("promote-failed", e));
                                break;
                            }
                        }
                    }
                    other => {
                        failure = Some(Refusal::fatal(
                            "protocol",
                            format!("unexpected message {other:?}"),
                        ));
                        break;
                    }
                }
            }
            // Group commit: one fsync for everything that arrived, then ack.
            if !appended.is_empty() {
                let durable = s.vol.lock_journal().sync().map_err(|e| store_refusal(&e))?;
                s.durable = durable;
                self.board
                    .update(&s.vol.cfg.id, |st| st.durable_seq = durable);
            }
            // Acknowledged as soon as it is durable, before the (bounded)
            // hand-over to the applier, which may wait for a slow replica.
            // The applied record first, then what the replica is good for:
            // the applier clears the resync before it publishes the END as
            // applied, so "consistent" never comes with an applied record
            // the replica was not consistent at.
            let applied = s.vol.applied.load(Ordering::Acquire);
            let flags = ack_flags(&s.vol.lock_state());
            if dup_ack
                || applied != last_applied_sent
                || s.durable != last_durable_sent
                || flags != last_flags_sent
            {
                link.send(&Message::Ack(Ack {
                    durable_seq: s.durable,
                    applied_seq: applied,
                    flags,
                }));
                let _ = link.pump(Duration::ZERO, None);
                last_applied_sent = applied;
                last_durable_sent = s.durable;
                last_flags_sent = flags;
            }
            for (pos, body) in appended {
                let _ = s.vol.apply_tx.send(ApplyMsg::Segment {
                    pos,
                    body: Some(body),
                });
            }
            if let Some(r) = failure {
                return Err(r);
            }
        }
    }

    /// Verifies one segment and appends it to the journal. `Ok(None)` for
    /// a duplicate of what is already durable.
    fn segment(&self, s: &mut Session, f: Vec<u8>) -> Result<Option<Journaled>, Refusal> {
        let h = frame::check(&f).map_err(|e| match e {
            FrameError::Unsupported(_) => Refusal::fatal("unsupported", e.to_string()),
            // Its checksums hold, so it was not damaged on the way: a
            // sender that builds such headers is broken, resending helps not.
            FrameError::Malformed(_) => Refusal::fatal("malformed-segment", e.to_string()),
            _ => Refusal::recoverable("corrupt-segment", format!("rejected segment: {e}")),
        })?;
        if h.volume_tag != s.vol.tag {
            return Err(Refusal::fatal(
                "wrong-volume",
                "segment belongs to another volume (replayed or misrouted)",
            ));
        }
        if h.stream_id != s.stream_id {
            return Err(Refusal::fatal(
                "wrong-stream",
                "segment belongs to another stream (replayed)",
            ));
        }
        if h.generation != s.generation || h.epoch != s.epoch {
            return Err(Refusal::fatal(
                "wrong-generation",
                "segment of another ring generation or epoch",
            ));
        }
        if h.counter != s.next_counter {
            return Err(Refusal::fatal(
                "replay",
                format!(
                    "segment counter {} where {} was expected (replayed or reordered)",
                    h.counter, s.next_counter
                ),
            ));
        }
        if !s.keys.contains_key(&h.key_id) {
            let ctx = StreamContext {
                stream_id: s.stream_id,
                volume: &s.vol.cfg.id,
                direction: Direction::Forward,
                epoch: s.epoch,
            };
            let k = StreamKey::derive(&self.keys.get(), h.key_id, &ctx).map_err(|_| {
                Refusal::fatal(
                    "unknown-key",
                    format!("segment sealed with unknown key id {}", h.key_id),
                )
            })?;
            s.keys.insert(h.key_id, k);
        }
        let key = s
            .keys
            .get(&h.key_id)
            .ok_or_else(|| Refusal::fatal("unknown-key", "key vanished"))?;
        // Authenticate here (the second AES-GCM pass after TLS); the
        // applier decompresses and checks the records, on its own thread.
        let body = frame::authenticate(&h, &f, key).map_err(|e| match e {
            FrameError::Authentication => Refusal::fatal(
                "authentication",
                format!("segment {}..={} failed authentication: the data keys differ between source and target", h.first_seq, h.last_seq),
            ),
            other => Refusal::fatal("malformed-segment", other.to_string()),
        })?;
        s.next_counter += 1;
        self.board.update(&s.vol.cfg.id, |st| {
            st.segments += 1;
            st.record_bytes += u64::from(h.plain_len);
            st.frame_bytes += f.len() as u64;
        });
        if h.last_seq <= s.received {
            // Everything in it is already journaled: acknowledge, keep once.
            return Ok(None);
        }
        if h.first_seq > s.received + 1 && h.features & frame::FEATURE_RESYNC_GAP == 0 {
            return Err(Refusal::fatal(
                "sequence-gap",
                format!(
                    "segment starts at record {} but the target has only up to {}",
                    h.first_seq, s.received
                ),
            ));
        }
        let pos = s
            .vol
            .lock_journal()
            .append(&f, &h)
            .map_err(|e| store_refusal(&e))?;
        s.received = h.last_seq;
        Ok(Some((pos, body)))
    }
}

/// The `failover` control command (unplanned: the source is gone).
fn failover_command(
    vols: &HashMap<String, Arc<Volume>>,
    r: &crate::control::Request,
) -> Result<String, String> {
    let vol = match &r.volume {
        Some(v) => vols.get(v).ok_or_else(|| format!("no volume {v:?} here"))?,
        None if vols.len() == 1 => vols.values().next().ok_or("no volume")?,
        None => return Err("several volumes: name one (--volume)".into()),
    };
    let point = match r.point.as_deref() {
        None | Some("latest") => None,
        Some(p) => Some(p.parse::<u64>().map_err(|_| {
            format!("point {p:?}: give `latest` or a recovery point's record sequence")
        })?),
    };
    let p = unplanned_failover(vol, point)?;
    Ok(format!(
        "volume {} failed over: primary at epoch {}, recovery point at record {}, volume {}",
        vol.cfg.id, p.epoch, p.point_seq, p.device
    ))
}

/// Stops streams into `vol` and asks its applier to promote the replica;
/// waits for the answer.
fn request_promotion(vol: &Volume, req: PromoteReq) -> Result<msg::Promoted, String> {
    vol.promoting.store(true, Ordering::Release);
    let (tx, rx) = crossbeam_channel::bounded(1);
    let sent = vol
        .apply_tx
        .send_timeout(ApplyMsg::Promote { req, reply: tx }, PROMOTE_TIMEOUT)
        .map_err(|_| "the applier is not running".to_string());
    let r = sent.and_then(|()| {
        rx.recv_timeout(PROMOTE_TIMEOUT)
            .map_err(|_| format!("the replica did not catch up within {PROMOTE_TIMEOUT:?}"))
            .and_then(|r| r)
    });
    if r.is_err() && vol.lock_state().promoted.is_none() {
        // Not failed over after all: streams may come back.
        vol.promoting.store(false, Ordering::Release);
    }
    r
}

/// An operator's failover of `vol` (the source is gone): the current
/// stream is stopped, everything journaled is applied, and the replica is
/// promoted at `point` (a recovery point's sequence) or at the latest
/// consistent state.
fn unplanned_failover(vol: &Volume, point: Option<u64>) -> Result<msg::Promoted, String> {
    vol.promoting.store(true, Ordering::Release);
    // End the stream that may be running and wait until it has (it may be
    // handing its last segments to a busy applier).
    vol.session.fetch_add(1, Ordering::AcqRel);
    let deadline = Instant::now() + PROMOTE_TIMEOUT;
    while vol.streaming.load(Ordering::Acquire) {
        if Instant::now() > deadline {
            vol.promoting.store(false, Ordering::Release);
            return Err("the current stream did not stop".into());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    request_promotion(
        vol,
        PromoteReq {
            planned_upto: None,
            point,
            epoch: None,
        },
    )
}

/// Status reason while a resync runs.
const RESYNC_RUNNING: &str = "resync in progress";

fn is_resync_begin(r: &RecordView<'_>) -> bool {
    r.op == frame::ring_op::MARKER
        && r.flags & frame::RECORD_FLAG_RESYNC != 0
        && matches!(
            resync::Marker::from_aux(r.aux),
            Some(resync::Marker::Begin { .. })
        )
}

fn store_refusal(e: &StoreError) -> Refusal {
    if e.is_recoverable() {
        Refusal::recoverable("target-storage", format!("target storage: {e}"))
    } else {
        Refusal::fatal("target-storage", format!("target storage: {e}"))
    }
}

fn check_bounds(records: &[RecordView<'_>], size: u64) -> Result<(), String> {
    for r in records {
        if matches!(
            r.op,
            frame::ring_op::WRITE | frame::ring_op::DISCARD | frame::ring_op::WRITE_ZEROES
        ) {
            let start = r.sector.checked_mul(512).ok_or("sector overflow")?;
            let end = start
                .checked_add(u64::from(r.len))
                .ok_or("length overflow")?;
            if end > size {
                return Err(format!(
                    "record {} writes [{start}, {end}) beyond the volume end {size}",
                    r.seq
                ));
            }
        }
    }
    Ok(())
}

fn recv_hello(link: &mut Link) -> Result<Hello, Refusal> {
    let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
    loop {
        match link.recv() {
            Ok(Some(Message::Hello(h))) => return Ok(h),
            Ok(Some(other)) => {
                return Err(Refusal::fatal(
                    "protocol",
                    format!("expected hello, got {other:?}"),
                ))
            }
            Ok(None) => {}
            Err(e) => return Err(Refusal::recoverable("network", e.to_string())),
        }
        let left = deadline
            .checked_duration_since(Instant::now())
            .ok_or_else(|| {
                Refusal::recoverable("timeout", "no hello within the handshake timeout")
            })?;
        link.pump(left.min(PUMP_INTERVAL), None)
            .map_err(|e| Refusal::recoverable("network", e.to_string()))?;
    }
}

/// How long the accept path waits for the applier to take a new
/// generation over (it applies the old one's queued segments first); the
/// source retries after a refusal, and the queued takeover still happens.
const TAKEOVER_WAIT: Duration = Duration::from_secs(8);

/// Whether a stream of generation `gen_hex` takes the volume over, and how.
fn takeover_for(st: &VolumeState, gen_hex: &str, hello: &Hello) -> Option<Takeover> {
    let needs_full_resync = if st.generation.is_empty() {
        // No record of this volume: the replica is a copy of the source only
        // if the operator said so and the stream has every record of the
        // generation; otherwise the whole volume must be sent.
        !(hello.replica_seeded && hello.oldest_seq <= 1)
    } else if st.generation != gen_hex {
        // Another capture ring (the source host restarted, the table was
        // created anew): writes between the two may never have been
        // captured, so only a full resync makes the replica consistent.
        true
    } else {
        return None;
    };
    Some(Takeover {
        generation: gen_hex.to_owned(),
        base: hello.oldest_seq.saturating_sub(1),
        needs_full_resync,
    })
}

/// The id of a new recovery point at record `seq`: the sequence itself
/// (a point taken again at the same record of this generation replaces
/// the old one), unless another point has that id — one of an earlier ring
/// generation, whose sequences started over — then the next id above
/// every point's, so a new point never replaces another record's.
fn point_id(st: &VolumeState, seq: u64) -> u64 {
    if st
        .points
        .iter()
        .any(|p| p.id == seq && !(p.seq == seq && p.generation == st.generation))
    {
        // A point has the id `seq`, so the largest id is at least `seq`.
        st.points
            .iter()
            .map(|p| p.id)
            .max()
            .map_or(seq, |m| m.saturating_add(1))
    } else {
        seq
    }
}

/// What an ack says about the replica's state.
fn ack_flags(st: &VolumeState) -> u64 {
    let mut f = 0;
    if st.resync_since.is_some() || st.needs_full_resync {
        f |= msg::ACK_INCONSISTENT;
    }
    if st.needs_full_resync {
        f |= msg::ACK_NEEDS_FULL_RESYNC;
    }
    f
}

/// The status reason while the replica waits for or runs a resync.
fn resync_reason(since: u64, full: bool) -> String {
    if full {
        format!("{RESYNC_RUNNING} since record {since}: the replica holds no consistent copy until a full resync ends")
    } else {
        format!("{RESYNC_RUNNING} since record {since}")
    }
}

/// Applies journaled segments to the replica in order.
struct Applier {
    vol: Arc<Volume>,
    replica: Box<dyn ReplicaStore>,
    keys: Arc<KeyStore>,
    board: Arc<StatusBoard>,
    stop: Arc<AtomicBool>,
    key_cache: HashMap<([u8; 16], u32, u64), StreamKey>,
    applied: u64,
    unflushed_segments: u32,
    /// When the replica was last flushed and its applied record persisted.
    last_checkpoint: Instant,
    /// When the last recovery point was taken (since this start).
    last_point: Option<Instant>,
    /// Reused decompression context (None if it could not be allocated:
    /// then each segment gets a fresh one).
    dctx: Option<zstd::bulk::Decompressor<'static>>,
    /// The backend's warnings in the status (e.g. thin pool space), and
    /// when they were last asked for.
    store_warnings: Vec<String>,
    warnings_checked: Option<Instant>,
}

impl Applier {
    fn new(
        vol: Arc<Volume>,
        replica: Box<dyn ReplicaStore>,
        keys: Arc<KeyStore>,
        board: Arc<StatusBoard>,
        stop: Arc<AtomicBool>,
    ) -> Self {
        let applied = vol.applied.load(Ordering::Acquire);
        Self {
            vol,
            replica,
            keys,
            board,
            stop,
            key_cache: HashMap::new(),
            applied,
            unflushed_segments: 0,
            last_checkpoint: Instant::now(),
            last_point: None,
            dctx: zstd::bulk::Decompressor::new().ok(),
            store_warnings: Vec::new(),
            warnings_checked: None,
        }
    }

    /// Puts the backend's warnings (pool space) in the status, at most
    /// every few seconds unless `now`.
    fn check_store(&mut self, now: bool) {
        if !now
            && self
                .warnings_checked
                .is_some_and(|t| t.elapsed() < Duration::from_secs(5))
        {
            return;
        }
        self.warnings_checked = Some(Instant::now());
        let new = match self.replica.warnings() {
            Ok(w) => w,
            Err(e) => vec![format!("replica storage status unavailable: {e}")],
        };
        if new != self.store_warnings {
            for w in &new {
                tracing::warn!(volume = %self.vol.cfg.id, "{w}");
            }
        }
        let old = std::mem::replace(&mut self.store_warnings, new.clone());
        // Other paths replace the reasons at times: put these back too.
        let in_place = self.board.get(&self.vol.cfg.id).is_some_and(|s| {
            new.iter().all(|w| s.reasons.contains(w))
                && !s
                    .reasons
                    .iter()
                    .any(|r| old.contains(r) && !new.contains(r))
                && (new.is_empty() || s.health != Health::OK)
                && !(s.health == Health::Warning && s.reasons.is_empty())
        });
        if in_place {
            return;
        }
        self.board.update(&self.vol.cfg.id, |s| {
            s.reasons.retain(|r| !old.contains(r) && !new.contains(r));
            s.reasons.extend(new.iter().cloned());
            if s.health == Health::OK && !new.is_empty() {
                s.health = Health::Warning;
            } else if s.health == Health::Warning && s.reasons.is_empty() {
                s.health = Health::OK;
            }
        });
    }

    fn run(mut self, rx: Receiver<ApplyMsg>) {
        loop {
            let msg = match rx.recv_timeout(Duration::from_millis(200)) {
                Ok(m) => m,
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                    self.check_store(false);
                    if self.unflushed_segments > 0 {
                        self.retry("checkpoint", |a| a.checkpoint());
                    }
                    if self.stop.load(Ordering::Acquire) && rx.is_empty() {
                        break;
                    }
                    continue;
                }
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => break,
            };
            let (pos, body) = match msg {
                ApplyMsg::Segment { pos, body } => (pos, body),
                ApplyMsg::Promote { req, reply } => {
                    let r = self.promote(req);
                    if let Err(e) = &r {
                        tracing::error!(volume = %self.vol.cfg.id, "failover refused: {e}");
                    }
                    let _ = reply.send(r);
                    continue;
                }
                ApplyMsg::Takeover { takeover, reply } => {
                    let r = self.take_over(&takeover);
                    self.vol.takeover_pending.store(false, Ordering::Release);
                    if let Err(e) = &r {
                        tracing::error!(volume = %self.vol.cfg.id, error = %e, "takeover of a new ring generation failed");
                    }
                    let _ = reply.send(r);
                    continue;
                }
            };
            let other_generation = {
                let st = self.vol.lock_state();
                if st.critical.is_some() || st.promoted.is_some() {
                    continue;
                }
                hex::encode(pos.header.generation) != st.generation
            };
            if other_generation {
                // Takeovers are ordered behind every segment of the old
                // generation and no stream is accepted while one is
                // pending: a segment of another generation here would be
                // applied in the wrong sequence space.
                self.vol.go_critical(
                    &self.board,
                    &format!(
                        "segment {}..={} belongs to ring generation {}, not to the replica's",
                        pos.header.first_seq,
                        pos.header.last_seq,
                        hex::encode(pos.header.generation)
                    ),
                );
                continue;
            }
            if pos.header.last_seq <= self.applied {
                continue;
            }
            let gap = pos.header.features & frame::FEATURE_RESYNC_GAP != 0;
            if pos.header.first_seq > self.applied.saturating_add(1) && !gap {
                // Cannot happen while segments arrive in journal order; if
                // it does, applying would silently skip records.
                self.vol.go_critical(
                    &self.board,
                    &format!(
                        "segment {}..={} would leave a gap after applied record {}",
                        pos.header.first_seq, pos.header.last_seq, self.applied
                    ),
                );
                continue;
            }
            let plain = match body {
                Some(b) => match self.dctx.as_mut() {
                    Some(d) => frame::decompress_with(d, &pos.header, &b),
                    None => frame::decompress(&pos.header, &b),
                }
                .map_err(|e| e.to_string()),
                None => {
                    let dir = self.vol.lock_journal().dir().to_owned();
                    journal::read_frame(&dir, &pos)
                        .map_err(|e| format!("journal unreadable: {e}"))
                        .and_then(|b| self.open(&pos.header, &b))
                }
            };
            let size = self.vol.cfg.size;
            let records = match plain.as_deref().map_err(Clone::clone).and_then(|p| {
                let r = frame::decode_records(&pos.header, p).map_err(|e| e.to_string())?;
                check_bounds(&r, size)?;
                if gap && !r.first().is_some_and(is_resync_begin) {
                    return Err("a segment after a sequence gap does not start a resync".into());
                }
                Ok(r)
            }) {
                Ok(r) => r,
                Err(e) => {
                    self.vol.go_critical(
                        &self.board,
                        &format!(
                            "journaled segment {}..={}: {e}",
                            pos.header.first_seq, pos.header.last_seq
                        ),
                    );
                    continue;
                }
            };
            if let Some(()) = self.retry("apply", |a| a.apply_records(&pos.header, &records)) {
                self.unflushed_segments += 1;
                // A flush of the replica costs the same for one small
                // segment as for many: bounded by time and count, not per
                // segment, so a stream of small segments keeps up.
                if self.unflushed_segments >= CHECKPOINT_SEGMENTS
                    || self.last_checkpoint.elapsed() >= CHECKPOINT_INTERVAL
                {
                    self.retry("checkpoint", |a| a.checkpoint());
                }
            } else if self.stop.load(Ordering::Acquire) {
                break;
            }
        }
        if self.unflushed_segments > 0 {
            let _ = self.checkpoint();
        }
    }

    /// Runs `f` until it succeeds, retrying recoverable storage errors
    /// (full disk) with a bounded wait that watches `stop`. A
    /// non-recoverable error makes the volume Critical.
    fn retry(
        &mut self,
        what: &str,
        mut f: impl FnMut(&mut Self) -> Result<(), StoreError>,
    ) -> Option<()> {
        let mut wait = Duration::from_millis(100);
        loop {
            match f(self) {
                Ok(()) => {
                    if self.board.get(&self.vol.cfg.id).is_some_and(|s| {
                        s.health == Health::Warning
                            && s.reasons.iter().any(|r| r.starts_with("replica"))
                    }) {
                        self.board.update(&self.vol.cfg.id, |s| {
                            s.reasons.retain(|r| !r.starts_with("replica"));
                            if s.reasons.is_empty() {
                                s.health = Health::OK;
                            }
                        });
                    }
                    return Some(());
                }
                Err(e) if e.is_recoverable() => {
                    let why = format!("replica {what} failed, retrying: {e}");
                    tracing::warn!(volume = %self.vol.cfg.id, "{why}");
                    self.board.update(&self.vol.cfg.id, |s| {
                        if s.health == Health::OK {
                            s.health = Health::Warning;
                        }
                        s.reasons.retain(|r| !r.starts_with("replica"));
                        s.reasons.push(why.clone());
                    });
                    self.check_store(true);
                    let until = Instant::now() + wait;
                    while Instant::now() < until {
                        if self.stop.load(Ordering::Acquire) {
                            return None;
                        }
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    wait = (wait * 2).min(Duration::from_secs(10));
                }
                Err(e) => {
                    self.vol
                        .go_critical(&self.board, &format!("replica {what}: {e}"));
                    return None;
                }
            }
        }
    }

    /// Authenticates and decompresses a journaled frame.
    fn open(&mut self, h: &SegmentHeader, bytes: &[u8]) -> Result<Vec<u8>, String> {
        let k = (h.stream_id, h.key_id, h.epoch);
        if !self.key_cache.contains_key(&k) {
            let ctx = StreamContext {
                stream_id: h.stream_id,
                volume: &self.vol.cfg.id,
                direction: Direction::Forward,
                epoch: h.epoch,
            };
            let key =
                StreamKey::derive(&self.keys.get(), h.key_id, &ctx).map_err(|e| e.to_string())?;
            if self.key_cache.len() > 64 {
                self.key_cache.clear();
            }
            self.key_cache.insert(k, key);
        }
        let key = self.key_cache.get(&k).ok_or("key cache")?;
        frame::open(h, bytes, key).map_err(|e| e.to_string())
    }

    fn apply_records(
        &mut self,
        h: &SegmentHeader,
        records: &[RecordView<'_>],
    ) -> Result<(), StoreError> {
        let mut ops: Vec<ApplyOp<'_>> = Vec::new();
        let start = self.applied;
        let mut applied = self.applied;
        for r in records {
            if r.seq <= applied {
                continue;
            }
            let off = r.sector * 512;
            match r.op {
                frame::ring_op::WRITE => ops.push(ApplyOp::Write {
                    offset: off,
                    data: r.data,
                }),
                frame::ring_op::DISCARD => ops.push(ApplyOp::Discard {
                    offset: off,
                    len: u64::from(r.len),
                }),
                frame::ring_op::WRITE_ZEROES => ops.push(ApplyOp::Zero {
                    offset: off,
                    len: u64::from(r.len),
                }),
                frame::ring_op::MARKER if r.flags & frame::RECORD_FLAG_RESYNC != 0 => {
                    self.replica.apply(&ops)?;
                    ops.clear();
                    match resync::Marker::from_aux(r.aux) {
                        Some(resync::Marker::Begin { full }) => self.resync_begin(r, full)?,
                        Some(resync::Marker::End) => {
                            if self.resync_end(r)? {
                                self.point(r, PointKind::Marker)?;
                            }
                        }
                        // Data markers become writes on the source; a
                        // stray one carries nothing to apply.
                        Some(resync::Marker::Data { .. }) | None => {}
                    }
                    applied = r.seq;
                    self.applied = applied;
                    continue;
                }
                frame::ring_op::FLUSH | frame::ring_op::MARKER => {
                    self.replica.apply(&ops)?;
                    ops.clear();
                    let kind = if r.op == frame::ring_op::MARKER {
                        PointKind::Marker
                    } else {
                        PointKind::Crash
                    };
                    let interval =
                        Duration::from_secs(self.vol.crash_point_interval.load(Ordering::Acquire));
                    let due = kind == PointKind::Marker
                        || self.last_point.is_none_or(|t| t.elapsed() >= interval);
                    if due && self.vol.lock_state().resync_since.is_none() {
                        self.point(r, kind)?;
                    }
                    applied = r.seq;
                    self.applied = applied;
                    continue;
                }
                _ => {} // skipped (failed on the source)
            }
            applied = r.seq;
        }
        self.replica.apply(&ops)?;
        let n = records
            .iter()
            .filter(|r| r.seq > start && r.seq <= applied)
            .count() as u64;
        debug_assert!(applied <= h.last_seq);
        self.applied = applied;
        self.board
            .update(&self.vol.cfg.id, |s| s.applied_records += n);
        Ok(())
    }

    /// Promotes the replica (failover). Planned: every record up to the old
    /// primary's last one must be applied, and no resync may be running.
    /// Unplanned: the chosen recovery point, or the latest consistent state
    /// (the applied records, or the last point while a resync runs).
    fn promote(&mut self, req: PromoteReq) -> Result<msg::Promoted, String> {
        let (epoch_now, resyncing, last_point, existing) = {
            let st = self.vol.lock_state();
            (
                st.epoch,
                st.resync_since.is_some(),
                st.points.last().map(|p| p.seq),
                st.promoted.clone(),
            )
        };
        if let Some(p) = existing {
            if req.epoch == Some(p.epoch) {
                // The source asked again (its first answer was lost).
                return Ok(msg::Promoted {
                    epoch: p.epoch,
                    point_seq: p.point_seq,
                    device: p.device,
                });
            }
            return Err(format!(
                "already failed over (epoch {}, at record {})",
                p.epoch, p.point_seq
            ));
        }
        let epoch = req.epoch.unwrap_or(epoch_now + 1);
        if epoch <= epoch_now {
            return Err(format!(
                "failover to epoch {epoch} but the replica is at epoch {epoch_now} already"
            ));
        }
        // Which state becomes the primary: `None` = as applied now.
        let rollback: Option<u64> = match (req.planned_upto, req.point) {
            (Some(upto), _) => {
                if resyncing {
                    return Err("a resync is running: the replica is not consistent".into());
                }
                if self.applied < upto {
                    return Err(format!(
                        "the replica has applied up to record {} but the primary ended at {upto}",
                        self.applied
                    ));
                }
                None
            }
            (None, Some(seq)) => {
                let st = self.vol.lock_state();
                if !st.points.iter().any(|p| p.seq == seq) {
                    return Err(format!(
                        "no recovery point at record {seq} (points: {})",
                        st.points
                            .iter()
                            .map(|p| p.seq.to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ));
                }
                (Some(seq) != last_point || resyncing || self.applied != seq).then_some(seq)
            }
            (None, None) if resyncing => match last_point {
                Some(seq) => Some(seq),
                None => {
                    return Err(
                        "a resync is running and no recovery point exists: nothing consistent to fail over to"
                            .into(),
                    )
                }
            },
            (None, None) => None,
        };
        let point_seq = match rollback {
            Some(seq) => seq,
            None => {
                // Mark the promoted state as a recovery point of its own.
                self.persist_applied().map_err(|e| e.to_string())?;
                if last_point != Some(self.applied) && self.applied > 0 {
                    let id = point_id(&self.vol.lock_state(), self.applied);
                    if let Err(e) = self.replica.create_point(id) {
                        // The promoted volume is what matters: a missing
                        // snapshot of it (no space) does not stop the failover.
                        tracing::warn!(volume = %self.vol.cfg.id, error = %e, "no recovery point at the failover; promoting anyway");
                        return self.finish_promotion(req, epoch, self.applied, None);
                    }
                    let mut st = self.vol.lock_state();
                    let gen = st.generation.clone();
                    st.points.retain(|p| p.id != id);
                    st.points.push(RecoveryPoint {
                        id,
                        seq: self.applied,
                        generation: gen,
                        source_time_ns: 0,
                        created_ns: now_ns(),
                        kind: PointKind::Failover,
                        marker: None,
                    });
                    st.save(&self.vol.state_path()).map_err(|e| e.to_string())?;
                }
                self.applied
            }
        };
        self.finish_promotion(req, epoch, point_seq, rollback)
    }

    /// Promotes the replica at `point_seq`, rolled back to the point of
    /// sequence `rollback` if given, and records it.
    fn finish_promotion(
        &mut self,
        req: PromoteReq,
        epoch: u64,
        point_seq: u64,
        rollback: Option<u64>,
    ) -> Result<msg::Promoted, String> {
        let point_id = match rollback {
            Some(seq) => Some(
                self.vol
                    .lock_state()
                    .points
                    .iter()
                    .rfind(|p| p.seq == seq)
                    .map(|p| p.id)
                    .ok_or_else(|| format!("no recovery point at record {seq}"))?,
            ),
            None => None,
        };
        let device = self
            .replica
            .promote(point_id)
            .map_err(|e| format!("promote the replica: {e}"))?;
        let promotion = replica_store::state::Promotion {
            epoch,
            point_seq,
            planned: req.planned_upto.is_some(),
            device: device.display().to_string(),
            at_ns: now_ns(),
        };
        {
            let mut st = self.vol.lock_state();
            st.epoch = epoch;
            st.applied_seq = point_seq;
            st.resync_since = None;
            st.promoted = Some(promotion.clone());
            st.save(&self.vol.state_path()).map_err(|e| e.to_string())?;
        }
        self.applied = point_seq;
        self.vol.applied.store(point_seq, Ordering::Release);
        tracing::warn!(
            volume = %self.vol.cfg.id,
            epoch,
            point = point_seq,
            device = %promotion.device,
            planned = promotion.planned,
            "failed over: the replica is the primary volume now"
        );
        self.board.update(&self.vol.cfg.id, |s| {
            s.role = Role::Primary;
            s.connection = Connection::StandAlone;
            s.replica = "UpToDate".into();
            s.health = Health::OK;
            s.reasons = vec![format!(
                "failed over at record {point_seq} (epoch {epoch}); the volume is {}",
                promotion.device
            )];
            s.epoch = epoch;
            s.applied_seq = point_seq;
        });
        Ok(msg::Promoted {
            epoch,
            point_seq,
            device: promotion.device,
        })
    }

    /// A resync starts at `r`: until it ends the replica is a mix of old and
    /// new regions, so no recovery point is taken (the last one stays the
    /// one to fail over to). A `full` one resends every region: its END
    /// makes even a replica without a consistent copy consistent.
    fn resync_begin(&mut self, r: &RecordView<'_>, full: bool) -> Result<(), StoreError> {
        self.applied = r.seq;
        self.replica.flush()?;
        let needs_full = {
            let mut st = self.vol.lock_state();
            st.applied_seq = r.seq;
            st.resync_since = Some(r.seq);
            if full {
                st.needs_full_resync = false;
            }
            st.save(&self.vol.state_path())?;
            st.needs_full_resync
        };
        tracing::warn!(volume = %self.vol.cfg.id, seq = r.seq, full, "resync started: the replica is inconsistent until it ends");
        self.board.update(&self.vol.cfg.id, |s| {
            s.replica = "Inconsistent".into();
            s.reasons.retain(|x| !x.starts_with(RESYNC_RUNNING));
            s.reasons.push(resync_reason(r.seq, needs_full));
            if s.health == Health::OK {
                s.health = Health::Warning;
            }
        });
        Ok(())
    }

    /// The resync that started earlier has sent every region. Returns
    /// whether the replica is consistent now: not while it still waits for
    /// a full resync (this one resent only some regions).
    fn resync_end(&mut self, r: &RecordView<'_>) -> Result<bool, StoreError> {
        {
            let mut st = self.vol.lock_state();
            if st.needs_full_resync {
                tracing::warn!(volume = %self.vol.cfg.id, seq = r.seq, "a partial resync ended, but the replica still needs a full one: it stays inconsistent");
                return Ok(false);
            }
            st.resync_since = None;
        }
        tracing::info!(volume = %self.vol.cfg.id, seq = r.seq, "resync complete");
        self.board.update(&self.vol.cfg.id, |s| {
            s.reasons.retain(|x| !x.starts_with(RESYNC_RUNNING));
            if s.reasons.is_empty() && s.health == Health::Warning {
                s.health = Health::OK;
            }
        });
        Ok(true)
    }

    /// Takes the volume over for a new ring generation (see
    /// [`ApplyMsg::Takeover`]): everything queued before is applied and
    /// flushed, the journal starts over, and the state names the new
    /// generation, the base sequence and whether a full resync is needed,
    /// all saved before the first segment of the new generation is
    /// journaled.
    fn take_over(&mut self, t: &Takeover) -> Result<(), StoreError> {
        {
            let st = self.vol.lock_state();
            if let Some(c) = &st.critical {
                return Err(StoreError::Invalid(format!("the volume is Critical: {c}")));
            }
            if st.promoted.is_some() {
                return Err(StoreError::Invalid("the replica was promoted".into()));
            }
            if st.generation == t.generation {
                // Asked twice (the first answer timed out): done already.
                return Ok(());
            }
            if st.generation.is_empty() {
                tracing::warn!(volume = %self.vol.cfg.id, generation = %t.generation, full_resync = t.needs_full_resync, "first stream of a volume this target has no record of");
            } else {
                tracing::warn!(volume = %self.vol.cfg.id, old = %st.generation, new = %t.generation, "a new capture ring generation takes the volume over: the replica is inconsistent until a full resync ends");
            }
        }
        // The old generation's applied records are flushed and recorded:
        // its recovery points stay valid.
        self.persist_applied()?;
        // The journal first: a crash before the state is saved leaves the
        // old generation in the state and an empty journal (the source
        // takes over again); never new-generation state over old frames.
        self.vol.lock_journal().restart()?;
        let since = t.base.saturating_add(1);
        {
            let mut st = self.vol.lock_state();
            st.generation = t.generation.clone();
            st.applied_seq = t.base;
            st.generation_base = t.base;
            st.needs_full_resync = t.needs_full_resync;
            st.resync_since = t.needs_full_resync.then_some(since);
            st.save(&self.vol.state_path())?;
        }
        self.applied = t.base;
        self.unflushed_segments = 0;
        self.vol.applied.store(t.base, Ordering::Release);
        self.board.update(&self.vol.cfg.id, |s| {
            s.generation = t.generation.clone();
            s.generation_base = t.base;
            s.applied_seq = t.base;
            s.durable_seq = t.base;
            s.reasons.retain(|x| !x.starts_with(RESYNC_RUNNING));
            s.replica = "Inconsistent".into();
            if t.needs_full_resync {
                s.reasons.push(resync_reason(since, true));
                if s.health == Health::OK {
                    s.health = Health::Warning;
                }
            }
        });
        Ok(())
    }

    /// Flushes the replica and records a recovery point at record `r`.
    ///
    /// Everything up to `r` is made durable and the journal trimmed first,
    /// so the space a snapshot needs is freed before it is taken. A snapshot
    /// that fails for lack of space is skipped (with a warning): a missed
    /// recovery point is better than a replica that stops advancing.
    fn point(&mut self, r: &RecordView<'_>, kind: PointKind) -> Result<(), StoreError> {
        self.applied = r.seq;
        self.persist_applied()?;
        let keep = self.vol.keep_points.load(Ordering::Acquire);
        let id = point_id(&self.vol.lock_state(), r.seq);
        if let Err(e) = self.replica.create_point(id) {
            if !e.is_recoverable() {
                return Err(e);
            }
            let why = format!("recovery point at record {} skipped: {e}", r.seq);
            tracing::warn!(volume = %self.vol.cfg.id, "{why}");
            self.board.update(&self.vol.cfg.id, |s| {
                if s.health == Health::OK {
                    s.health = Health::Warning;
                }
                s.reasons = vec![why.clone()];
            });
            self.publish_applied();
            return Ok(());
        }
        let (count, pruned) = {
            let mut st = self.vol.lock_state();
            let gen = st.generation.clone();
            st.points.retain(|p| p.id != id);
            st.points.push(RecoveryPoint {
                id,
                seq: r.seq,
                generation: gen,
                source_time_ns: r.submit_ns,
                created_ns: now_ns(),
                kind,
                marker: (kind == PointKind::Marker).then_some(r.aux),
            });
            let mut pruned = Vec::new();
            while st.points.len() > keep {
                pruned.push(st.points.remove(0).id);
            }
            st.save(&self.vol.state_path())?;
            (st.points.len(), pruned)
        };
        for id in pruned {
            self.replica.delete_point(id)?;
        }
        self.last_point = Some(Instant::now());
        self.vol.applied.store(r.seq, Ordering::Release);
        self.board.update(&self.vol.cfg.id, |s| {
            s.applied_seq = r.seq;
            s.points = count as u64;
            s.last_point_seq = r.seq;
            s.replica = "Consistent".into();
            if s.reasons.iter().any(|x| x.starts_with("recovery point")) {
                s.reasons.retain(|x| !x.starts_with("recovery point"));
                if s.reasons.is_empty() {
                    s.health = Health::OK;
                }
            }
        });
        Ok(())
    }

    /// Flushes the replica, persists the applied sequence and trims the
    /// journal.
    fn checkpoint(&mut self) -> Result<(), StoreError> {
        self.persist_applied()?;
        self.publish_applied();
        Ok(())
    }

    /// Flushes the replica, persists the applied sequence, trims the journal.
    fn persist_applied(&mut self) -> Result<(), StoreError> {
        self.replica.flush()?;
        self.check_store(false);
        {
            let mut st = self.vol.lock_state();
            st.applied_seq = self.applied;
            st.save(&self.vol.state_path())?;
        }
        self.unflushed_segments = 0;
        self.last_checkpoint = Instant::now();
        self.vol.lock_journal().trim(self.applied)?;
        Ok(())
    }

    /// Tells acks and status how far the replica is (after any recovery
    /// point at that sequence exists).
    fn publish_applied(&self) {
        let applied = self.applied;
        self.vol.applied.store(applied, Ordering::Release);
        self.board
            .update(&self.vol.cfg.id, |s| s.applied_seq = applied);
    }
}
