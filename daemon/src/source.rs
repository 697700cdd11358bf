//! Source role: a drain thread moves the capture ring, in order, into a
//! local spool (see [`crate::drain`]); sessions read the spool from the
//! target's durable position on, batch records into segments, compress and
//! seal them on worker threads and send them in order over TLS. The spool
//! is trimmed only up to what the target acknowledged as durable, so
//! reconnects and restarts resume by record sequence.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver, Sender};
use replica_proto::frame::{self, SegmentHeader};
use replica_proto::keys::{self, Direction, StreamContext, StreamKey};

use crate::keystore::KeyStore;
use replica_proto::msg::{self, ErrorClass as WireClass, Hello, Message};
use replica_ring::{Consumer, FileRelease, Release};

use crate::config::{RingSource, SourceConfig};
use crate::drain::{DrainSettings, Drainer, KernelRing, Shared, RESYNC_REASON};
use crate::link::{Link, LinkError};
use crate::retry::{Backoff, Decision, ErrorClass};
use crate::spool::SpoolError;
use crate::status::{Connection, Health, Role, StatusBoard, VolumeStatus};

/// Replaces the reason of the last session failure (`None`: the session
/// works again), keeping the reasons that outlive a connection: failed
/// source writes, a needed resync, expiring certificates. Health follows.
fn set_session_reason(s: &mut VolumeStatus, why: Option<&str>) {
    s.reasons.retain(|r| {
        r.starts_with("write failed")
            || r.starts_with(RESYNC_REASON)
            || (r.contains("certificate") && r.contains("expire"))
    });
    if let Some(w) = why {
        s.reasons.push(w.to_owned());
    }
    if s.health != Health::Critical {
        s.health = if s.reasons.is_empty() {
            Health::OK
        } else {
            Health::Warning
        };
    }
}
use crate::DaemonError;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Stop pulling sealed segments while this much is queued for the socket.
const MAX_QUEUED_BYTES: usize = 16 << 20;

/// A session failure, classified.
#[derive(Debug)]
pub struct SessionError {
    /// Retry or Critical.
    pub class: ErrorClass,
    /// Explanation.
    pub message: String,
}

impl SessionError {
    fn recoverable(m: impl Into<String>) -> Self {
        Self {
            class: ErrorClass::Recoverable,
            message: m.into(),
        }
    }
    fn fatal(m: impl Into<String>) -> Self {
        Self {
            class: ErrorClass::Fatal,
            message: m.into(),
        }
    }
    fn link(e: LinkError) -> Self {
        if e.is_certificate() {
            Self::fatal(format!("certificate refused: {e}"))
        } else {
            Self::recoverable(e.to_string())
        }
    }
}

/// The ring consumer, whatever the ring's origin.
pub type RingConsumer = Consumer<Box<dyn Release>>;

/// Opens the configured ring; for a kernel ring also the control device
/// and the volume's index (for its dirty bitmap).
pub fn open_ring(cfg: &SourceConfig) -> Result<(RingConsumer, Option<KernelRing>), DaemonError> {
    match &cfg.ring {
        RingSource::File(p) => {
            let map = replica_ring::Mapping::open_file(p, true)?;
            Ok((
                Consumer::new(map, Box::new(FileRelease) as Box<dyn Release>)?,
                None,
            ))
        }
        RingSource::Group(g) => {
            let dev =
                replica_ring::device::Device::open(std::path::Path::new(&cfg.control_device))?;
            let consumer = dev.attach(g)?;
            // One source replicates one volume; find its index in the group.
            let device = consumer.releaser().device().clone();
            let vols = device.volumes()?;
            let Some(v) = vols.iter().find(|v| v.id == cfg.volume) else {
                return Err(DaemonError::Unsupported(format!(
                    "group {g:?} has no volume {:?} (it has: {})",
                    cfg.volume,
                    vols.iter()
                        .map(|v| v.id.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            };
            if vols.len() > 1 {
                return Err(DaemonError::Unsupported(format!(
                    "group {g:?} holds {} volumes; this version replicates groups of one volume",
                    vols.len()
                )));
            }
            let size = v.sectors * 512;
            if size != cfg.volume_size {
                return Err(DaemonError::Unsupported(format!(
                    "volume {:?} is {size} bytes in the kernel but volume_size says {}",
                    cfg.volume, cfg.volume_size
                )));
            }
            tracing::info!(group = %g, volume = %cfg.volume, index = v.index, "attached to the kernel capture ring");
            let index = v.index;
            Ok((consumer.boxed(), Some(KernelRing { device, index })))
        }
    }
}

/// A batch of records to seal.
struct Job {
    header: SegmentHeader,
    plain: Vec<u8>,
}

/// A running source.
pub struct Source {
    cfg: std::sync::RwLock<Arc<SourceConfig>>,
    config_path: Option<std::path::PathBuf>,
    keys: Arc<KeyStore>,
    hup: Arc<AtomicU64>,
    tls: crate::tls::Reloadable<rustls::ClientConfig>,
    board: Arc<StatusBoard>,
    stop: Arc<AtomicBool>,
    notifier: std::sync::Mutex<crate::control::Notifier>,
    control: Option<JoinHandle<()>>,
    /// What control commands act on.
    commands: Arc<Commands>,
    hup_seen: AtomicU64,
}

/// What the source's control commands (`resync`, `failover-planned`) act
/// on; the drain's shared state once it runs.
struct Commands {
    volume: String,
    state_dir: std::path::PathBuf,
    device: Option<std::path::PathBuf>,
    volume_size: u64,
    kernel_ring: bool,
    /// The ring file (development mode).
    ring_file: Option<std::path::PathBuf>,
    /// The epoch this source is at.
    epoch: AtomicU64,
    resync_request: crate::drain::ResyncRequests,
    shared: std::sync::OnceLock<Arc<Shared>>,
    stop: Arc<AtomicBool>,
    /// One planned failover at a time.
    failing_over: std::sync::Mutex<()>,
}

impl Commands {
    fn handle(&self, r: &crate::control::Request) -> Option<Result<crate::control::Reply, String>> {
        if !matches!(
            r.command.as_str(),
            "resync" | "initial-copy" | "failover-planned" | "stop"
        ) {
            return None;
        }
        if r.volume.as_ref().is_some_and(|v| v != &self.volume) {
            return Some(Err(format!(
                "this source replicates {}, not {}",
                self.volume,
                r.volume.as_deref().unwrap_or_default()
            )));
        }
        Some(match r.command.as_str() {
            "stop" => {
                tracing::info!(volume = %self.volume, "stop requested on the control socket");
                self.stop.store(true, Ordering::Release);
                Ok(format!("replicad source for {} is stopping", self.volume).into())
            }
            "resync" => self.resync(false),
            "initial-copy" => self.resync(true),
            _ => self.planned_failover().map(Into::into),
        })
    }

    /// A full resync (`ensure`: unless one that reaches the target is
    /// pending or running already, as for an initial copy): handed to the
    /// drain, which answers with a ring position the resync's END comes
    /// after; the reply names it, so a wait sees this resync through to its
    /// END on the target.
    fn resync(&self, ensure: bool) -> Result<crate::control::Reply, String> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.resync_request
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(crate::drain::ResyncRequest {
                why: if ensure {
                    "initial copy".into()
                } else {
                    "full resync requested by an operator".into()
                },
                reply: tx,
                ensure,
            });
        let from_seq = rx.recv_timeout(Duration::from_secs(30)).map_err(|_| {
            "the capture drain did not take the resync request within 30 s (is the ring attached?); it stays queued".to_string()
        })?;
        let generation = self
            .shared
            .get()
            .map(|s| hex::encode(s.generation))
            .ok_or("the source is not replicating yet")?;
        Ok(crate::control::Reply {
            message: format!(
                "full resync of {} scheduled at record {from_seq}: every region will be resent; the replica is inconsistent until the target applies its end (its last recovery point stays)",
                self.volume
            ),
            resync: Some(crate::control::ResyncTicket {
                generation,
                from_seq,
            }),
        })
    }

    /// Planned failover: stop writes (suspend, final marker, error table),
    /// wait until the target has every record, hand over, demote this side.
    fn planned_failover(&self) -> Result<String, String> {
        let _one = self
            .failing_over
            .try_lock()
            .map_err(|_| "a planned failover is already under way".to_string())?;
        let shared = self
            .shared
            .get()
            .ok_or("the source is not replicating yet")?
            .clone();
        // The kernel's dirty regions are checked once writes are suspended
        // (a retry after the fence finds the volume gone from the kernel).
        if let Some(why) = crate::drain::planned_failover_refusal(shared.needs_resync(), Ok(None)) {
            return Err(why);
        }
        if !shared.connected.load(Ordering::Acquire) {
            return Err("not connected to the target".into());
        }
        shared.failing_over.store(true, Ordering::Release);
        let r = self.hand_over(&shared);
        if r.is_err() {
            shared.failing_over.store(false, Ordering::Release);
        }
        r
    }

    /// The planned failover once it may start (see [`Self::planned_failover`]).
    fn hand_over(&self, shared: &Arc<Shared>) -> Result<String, String> {
        let mut role = crate::failover::SourceRole::load(&self.state_dir)?;
        let upto = if self.kernel_ring {
            let dev = self
                .device
                .as_ref()
                .ok_or("`device` (the protected volume) is not configured")?;
            let name = crate::failover::dm_name(dev)?;
            match role.failing_over {
                Some(upto) if crate::failover::is_fenced(&name) => upto,
                _ => {
                    crate::failover::suspend(&name)?;
                    // Writes are stopped and every one in flight completed:
                    // no region can become dirty any more. Every region the
                    // kernel marked must have reached a resync (the fence
                    // removes the volume, and its bitmap, from the kernel).
                    if let Some(why) = crate::drain::planned_failover_refusal(
                        shared.needs_resync(),
                        shared.kernel_dirty_regions(),
                    ) {
                        let resumed = crate::failover::resume(&name)
                            .map(|()| format!("{name} resumed"))
                            .unwrap_or_else(|e| format!("{name} stays suspended: {e}"));
                        tracing::warn!(volume = %self.volume, device = %name, "planned failover refused after suspending writes: {why}");
                        return Err(format!("planned failover refused ({resumed}): {why}"));
                    }
                    let fenced = crate::failover::marker(
                        &name,
                        0xFA11_0000_0000_0000 | self.epoch.load(Ordering::Acquire),
                    )
                    .and_then(|seq| {
                        crate::failover::fence(&name, self.volume_size / 512).map(|()| seq)
                    });
                    let upto = match fenced {
                        Ok(seq) => seq,
                        Err(e) => {
                            let _ = crate::failover::resume(&name);
                            return Err(format!("cannot stop writes on {name}: {e}"));
                        }
                    };
                    tracing::warn!(volume = %self.volume, device = %name, upto, "planned failover: writes stopped (error table), last record {upto}");
                    role.failing_over = Some(upto);
                    role.save(&self.state_dir)?;
                    upto
                }
            }
        } else {
            // A ring file: the writers must have stopped; the last record
            // produced is the last one.
            let path = self.ring_file.as_ref().ok_or("no ring file configured")?;
            let map = replica_ring::Mapping::open_file(path, false).map_err(|e| e.to_string())?;
            map.header()
                .prod_seq
                .load(Ordering::Acquire)
                .wrapping_sub(1)
        };
        // Everything up to `upto` spooled, then durable on the target and
        // applied there (the target checks), then the target takes over.
        let deadline = Instant::now() + Duration::from_secs(600);
        while (shared.spool.next_seq().wrapping_sub(upto) as i64) <= 0 {
            if let Some(since) = shared.needs_resync() {
                return Err(format!(
                    "planned failover not completed: the replica needs a resync (the stream stopped at record {since}, before the last record {upto}); the source volume stays fenced; fail over (unplanned) on the target"
                ));
            }
            if Instant::now() > deadline {
                return Err(format!("record {upto} was never drained from the ring"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let epoch = self.epoch.load(Ordering::Acquire) + 1;
        let (tx, rx) = crossbeam_channel::bounded(1);
        *shared.planned.lock().unwrap_or_else(|p| p.into_inner()) =
            Some(crate::failover::PlannedFailover {
                upto,
                epoch,
                sent: false,
                reply: tx,
            });
        let answer = rx
            .recv_timeout(Duration::from_secs(900))
            .map_err(|_| "the target did not take over within 15 minutes".to_string())
            .and_then(|r| r);
        shared
            .planned
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let p = answer.map_err(|e| {
            format!("planned failover not completed: {e}; the source volume stays fenced; `replctl failover --planned` again to retry")
        })?;
        role.epoch = p.epoch;
        role.failing_over = None;
        role.demoted = Some(format!(
            "planned failover: the target became the primary at epoch {} (record {})",
            p.epoch, p.point_seq
        ));
        role.save(&self.state_dir)?;
        self.epoch.store(p.epoch, Ordering::Release);
        tracing::warn!(volume = %self.volume, epoch = p.epoch, point = p.point_seq, "planned failover complete; this source is demoted and stops");
        self.stop.store(true, Ordering::Release);
        Ok(format!(
            "planned failover of {} complete: no write lost (every record up to {upto} is on the target); the target is the primary at epoch {}, volume {} on the target host; this source is fenced and stopped",
            self.volume, p.epoch, p.device
        ))
    }
}

impl Source {
    /// Loads keys and TLS material.
    pub fn new(cfg: SourceConfig, sig: crate::cli::Signals) -> Result<Self, DaemonError> {
        let stop = sig.stop.clone();
        // The daemon's own writes must never be captured.
        crate::protected::check_not_protected(&cfg.state_dir, "state_dir")?;
        crate::protected::check_not_protected(&cfg.spool_dir(), "spool.dir")?;
        let keys = KeyStore::load(&cfg.keys)?;
        let tls = crate::tls::Reloadable::new(crate::tls::client_config(&cfg.tls)?);
        crate::create_state_dir(&cfg.state_dir)?;
        let board = Arc::new(StatusBoard::new(
            &cfg.state_dir,
            vec![VolumeStatus::new(&cfg.volume, Role::Primary)],
        ));
        let sock = cfg
            .control_socket
            .clone()
            .unwrap_or_else(|| crate::control::default_path(&cfg.state_dir));
        let role = crate::failover::SourceRole::load(&cfg.state_dir).map_err(|e| {
            DaemonError::Unsupported(format!("cannot read this source's role: {e}"))
        })?;
        if let Some(why) = &role.demoted {
            return Err(DaemonError::Unsupported(format!(
                "volume {} was failed over ({why}): this source is demoted and will not replicate it; protect it anew from the current primary",
                cfg.volume
            )));
        }
        let commands = Arc::new(Commands {
            volume: cfg.volume.clone(),
            state_dir: cfg.state_dir.clone(),
            device: cfg.device.clone(),
            volume_size: cfg.volume_size,
            kernel_ring: matches!(cfg.ring, RingSource::Group(_)),
            ring_file: match &cfg.ring {
                RingSource::File(p) => Some(p.clone()),
                RingSource::Group(_) => None,
            },
            epoch: AtomicU64::new(cfg.epoch.max(role.epoch)),
            resync_request: Arc::default(),
            shared: std::sync::OnceLock::new(),
            stop: stop.clone(),
            failing_over: std::sync::Mutex::new(()),
        });
        let handler: crate::control::Handler = {
            let c = commands.clone();
            Arc::new(move |r: &crate::control::Request| c.handle(r))
        };
        let control = Some(crate::control::serve(
            &sock,
            board.clone(),
            stop.clone(),
            Some(handler),
        )?);
        Ok(Self {
            cfg: std::sync::RwLock::new(Arc::new(cfg)),
            config_path: None,
            keys,
            tls,
            board,
            stop,
            notifier: std::sync::Mutex::new(crate::control::Notifier::new()),
            control,
            commands,
            hup: sig.hup,
            hup_seen: AtomicU64::new(0),
        })
    }

    /// The target says the volume was failed over without this source (its
    /// epoch is older): never write to it again. The role is recorded, the
    /// protected volume is fenced (error table) so its writers get errors,
    /// and replication stops (Critical). Returns the reason.
    fn demote(&self, why: &str) -> String {
        let cfg = self.cfg();
        let mut role = crate::failover::SourceRole::load(&cfg.state_dir).unwrap_or_default();
        role.epoch = role.epoch.max(self.epoch());
        role.demoted = Some(format!("the target refused this source: {why}"));
        if let Err(e) = role.save(&cfg.state_dir) {
            tracing::error!(error = %e, "cannot record the demotion");
        }
        let fenced = match (&cfg.ring, &cfg.device) {
            (RingSource::Group(_), Some(dev)) => crate::failover::dm_name(dev)
                .and_then(|name| crate::failover::fence(&name, cfg.volume_size / 512))
                .map(|()| "; the protected volume now fails every write (error table)"),
            (RingSource::Group(_), None) => Err("`device` is not configured".to_string()),
            _ => Ok(""),
        };
        let fenced = fenced.unwrap_or_else(|e| {
            tracing::error!("cannot fence the protected volume: {e}");
            "; the protected volume could NOT be fenced: stop its writers"
        });
        format!(
            "demoted: the volume was failed over to the target ({why}); this source must not write to it{fenced}; protect it anew from the new primary"
        )
    }

    /// The epoch this source is at.
    fn epoch(&self) -> u64 {
        self.commands.epoch.load(Ordering::Acquire)
    }

    /// The configuration in force.
    fn cfg(&self) -> Arc<SourceConfig> {
        self.cfg.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Re-read `path` on SIGHUP for what can change at run time.
    pub fn reload_from(mut self, path: &std::path::Path) -> Self {
        self.config_path = Some(path.to_owned());
        self
    }

    /// Applies what may change at run time (target address and name,
    /// certificate paths: at the next connection; segment settings: at the
    /// next session; retry schedule: at the next failure); every other
    /// changed key is reported and keeps its running value.
    fn reload_config(&self) {
        let Some(path) = &self.config_path else {
            return;
        };
        let new = match SourceConfig::load(path) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "configuration reload failed; keeping the configuration in force");
                return;
            }
        };
        let old = self.cfg();
        let fixed: Vec<&str> = [
            ("volume", new.volume != old.volume),
            ("volume_size", new.volume_size != old.volume_size),
            ("ring", new.ring != old.ring),
            ("keys", new.keys != old.keys),
            ("state_dir", new.state_dir != old.state_dir),
            ("control_socket", new.control_socket != old.control_socket),
            ("control_device", new.control_device != old.control_device),
            ("epoch", new.epoch != old.epoch),
            ("spool", new.spool != old.spool),
            ("device", new.device != old.device),
        ]
        .into_iter()
        .filter_map(|(k, changed)| changed.then_some(k))
        .collect();
        for k in &fixed {
            tracing::error!(
                key = k,
                "configuration key cannot change at run time; restart the daemon to apply it"
            );
        }
        let mut merged = new;
        merged.volume = old.volume.clone();
        merged.volume_size = old.volume_size;
        merged.ring = old.ring.clone();
        merged.keys = old.keys.clone();
        merged.state_dir = old.state_dir.clone();
        merged.control_socket = old.control_socket.clone();
        merged.control_device = old.control_device.clone();
        merged.epoch = old.epoch;
        merged.spool = old.spool.clone();
        merged.device = old.device.clone();
        *self.cfg.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(merged);
        tracing::info!("configuration reloaded");
    }

    fn tick(&self) {
        self.notifier
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .tick();
        let h = self.hup.load(Ordering::Acquire);
        if self.hup_seen.swap(h, Ordering::AcqRel) != h {
            self.reload();
        }
    }

    /// SIGHUP: reload keys (the next segment uses the new active key) and
    /// certificates (the next connection uses them).
    fn reload(&self) {
        self.reload_config();
        let cfg = self.cfg();
        crate::tls::reload_material(&self.keys, &self.tls, || {
            crate::tls::client_config(&cfg.tls)
        });
        self.check_expiry();
    }

    /// Warns (log and status) about certificates that expire soon.
    fn check_expiry(&self) {
        let cfg = self.cfg();
        crate::tls::publish_expiry(&cfg.tls, &self.board, [cfg.volume.as_str()]);
    }

    /// Replicates until stopped. Returns an error only for a
    /// non-recoverable condition (after publishing Critical).
    pub fn run(mut self) -> Result<(), DaemonError> {
        let r = self.run_inner();
        self.notifier
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .stopping();
        self.stop.store(true, Ordering::Release);
        if let Some(c) = self.control.take() {
            let _ = c.join();
        }
        r
    }

    fn run_inner(&self) -> Result<(), DaemonError> {
        let cfg = self.cfg();
        let spool_dir = cfg.spool_dir();
        let (consumer, kernel) = open_ring(&cfg)?;
        let generation = consumer.mapping().generation();
        let vol = cfg.volume.clone();
        self.board.update(&vol, |s| {
            s.generation = hex::encode(generation);
            s.epoch = self.epoch();
            s.captured_seq = consumer.next_seq();
        });
        let (drainer, shared) = Drainer::new(
            DrainSettings {
                volume: vol.clone(),
                volume_size: cfg.volume_size,
                chunk_bytes: cfg.spool.chunk_bytes.min(cfg.segment.max_bytes),
                limit_bytes: cfg.spool.limit(cfg.volume_size),
                region_bytes: cfg.spool.region_kib * 1024,
                state_path: cfg.state_dir.join("resync.state"),
                device: cfg.device.clone(),
                resync_window: cfg.resync.window_bytes,
                resync_max_bytes: cfg.resync.max_write_bytes,
                spool_dir: spool_dir.clone(),
                spool_file_bytes: cfg.spool.file_bytes,
                last_generation: crate::failover::SourceRole::load(&cfg.state_dir)
                    .ok()
                    .and_then(|r| r.generation)
                    .and_then(|g| {
                        let mut b = [0u8; 16];
                        hex::decode_to_slice(g, &mut b).ok().map(|()| b)
                    }),
            },
            consumer,
            kernel,
            self.board.clone(),
            self.stop.clone(),
            self.commands.resync_request.clone(),
        )?;
        let _ = self.commands.shared.set(shared.clone());
        // From now on a different ring means writes may have been missed.
        let mut role = crate::failover::SourceRole::load(&cfg.state_dir).unwrap_or_default();
        if role.generation.as_deref() != Some(hex::encode(generation).as_str()) {
            role.generation = Some(hex::encode(generation));
            role.save(&cfg.state_dir).map_err(|e| {
                DaemonError::Unsupported(format!("cannot record the ring generation: {e}"))
            })?;
        }
        let drain = std::thread::Builder::new()
            .name("drain".into())
            .spawn(move || drainer.run())
            .map_err(|e| DaemonError::io("start the drain thread", &spool_dir, e))?;
        // Ring attached, spool open, control socket up: the source can serve.
        self.notifier
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .ready(&format!(
                "replicating volume {} to {}",
                cfg.volume, cfg.target
            ));
        let r = self.replicate(&shared);
        self.stop.store(true, Ordering::Release);
        shared.spool.wake();
        if drain.join().is_err() {
            tracing::error!("drain thread panicked");
            std::process::abort();
        }
        r
    }

    /// Sessions with the target, retried on the schedule, until stopped or
    /// Critical.
    fn replicate(&self, shared: &Arc<Shared>) -> Result<(), DaemonError> {
        let vol = self.cfg().volume.clone();
        let mut backoff = Backoff::from_secs(&self.cfg().retry.schedule_secs);
        while !self.stop.load(Ordering::Acquire) {
            self.board
                .update(&vol, |s| s.connection = Connection::Connecting);
            let err = match self.session(shared, &mut backoff) {
                Ok(()) => break,
                Err(e) => e,
            };
            backoff.set_schedule_secs(&self.cfg().retry.schedule_secs);
            match backoff.on_failure(err.class, Instant::now()) {
                Decision::Critical => {
                    tracing::error!(volume = %vol, "replication stopped: {}", err.message);
                    self.board.update(&vol, |s| {
                        s.connection = Connection::StandAlone;
                        s.health = Health::Critical;
                        set_session_reason(s, Some(&err.message));
                    });
                    return Err(DaemonError::Critical(err.message));
                }
                Decision::RetryAt(at) => {
                    tracing::warn!(volume = %vol, attempt = backoff.attempts(), "replication interrupted, retrying: {}", err.message);
                    self.board.update(&vol, |s| {
                        s.connection = Connection::Retrying;
                        s.health = Health::Warning;
                        set_session_reason(s, Some(&err.message));
                        s.retries = backoff.attempts() as u64;
                    });
                    while Instant::now() < at && !self.stop.load(Ordering::Acquire) {
                        self.tick();
                        if let Some(f) = shared.fatal() {
                            return Err(self.critical(&vol, f));
                        }
                        std::thread::sleep((at - Instant::now()).min(Duration::from_millis(50)));
                    }
                }
            }
        }
        self.board
            .update(&vol, |s| s.connection = Connection::StandAlone);
        Ok(())
    }

    /// Publishes a Critical stop.
    fn critical(&self, vol: &str, why: String) -> DaemonError {
        tracing::error!(volume = %vol, "replication stopped: {why}");
        self.board.update(vol, |s| {
            s.connection = Connection::StandAlone;
            s.health = Health::Critical;
            set_session_reason(s, Some(&why));
        });
        DaemonError::Critical(why)
    }

    fn connect(&self) -> Result<Link, SessionError> {
        let cfg = self.cfg();
        let addrs: Vec<_> = cfg
            .target
            .to_socket_addrs()
            .map_err(|e| SessionError::recoverable(format!("resolve {}: {e}", cfg.target)))?
            .collect();
        let mut last = None;
        let mut sock = None;
        for a in addrs {
            match TcpStream::connect_timeout(&a, CONNECT_TIMEOUT) {
                Ok(s) => {
                    sock = Some(s);
                    break;
                }
                Err(e) => last = Some(e),
            }
        }
        let sock = sock.ok_or_else(|| {
            SessionError::recoverable(format!(
                "connect {}: {}",
                cfg.target,
                last.map_or_else(|| "no address".to_owned(), |e| e.to_string())
            ))
        })?;
        let name = rustls_pki_types::ServerName::try_from(cfg.target_name.clone())
            .map_err(|e| SessionError::fatal(format!("target_name {:?}: {e}", cfg.target_name)))?;
        let conn = rustls::ClientConnection::new(self.tls.get(), name)
            .map_err(|e| SessionError::fatal(format!("TLS setup: {e}")))?;
        let mut link =
            Link::new(sock, rustls::Connection::Client(conn)).map_err(SessionError::link)?;
        link.handshake(HANDSHAKE_TIMEOUT)
            .map_err(SessionError::link)?;
        Ok(link)
    }

    /// One connection's life.
    fn session(&self, shared: &Arc<Shared>, backoff: &mut Backoff) -> Result<(), SessionError> {
        let cfg = self.cfg();
        let mut link = self.connect()?;
        let welcome = self.handshake(&mut link, shared)?;
        backoff.reset();
        let vol = cfg.volume.clone();
        self.board.update(&vol, |s| {
            s.connection = Connection::Connected;
            set_session_reason(s, None);
            s.retries = 0;
            s.durable_seq = welcome.durable;
        });
        let key = Arc::new(SessionKeys {
            store: self.keys.clone(),
            stream_id: welcome.stream_id,
            volume: cfg.volume.clone(),
            epoch: self.epoch(),
            cache: std::sync::Mutex::new(None),
        });
        key.current().map_err(SessionError::fatal)?;

        let session_stop = Arc::new(AtomicBool::new(false));
        let (job_tx, job_rx) = bounded::<Job>(cfg.segment.queue);
        let (out_tx, out_rx) =
            bounded::<(u64, Result<Vec<u8>, String>)>(cfg.segment.queue + cfg.segment.workers);
        let (wake_rx, wake_tx) =
            UnixStream::pair().map_err(|e| SessionError::recoverable(format!("wake pipe: {e}")))?;
        let _ = wake_rx.set_nonblocking(true);
        let _ = wake_tx.set_nonblocking(true);
        let wake_tx = Arc::new(wake_tx);

        let mut workers = Vec::new();
        for i in 0..cfg.segment.workers {
            let rx = job_rx.clone();
            let tx = out_tx.clone();
            let key = key.clone();
            let wake = wake_tx.clone();
            let level = cfg.segment.zstd_level;
            workers.push(
                std::thread::Builder::new()
                    .name(format!("seal-{i}"))
                    .spawn(move || seal_worker(rx, tx, &key, level, &wake))
                    .ok(),
            );
        }
        drop(job_rx);
        drop(out_tx);

        let batcher = {
            let ctx = BatchCtx {
                header: SegmentHeader {
                    features: 0,
                    key_id: 0, // set by seal
                    stream_id: welcome.stream_id,
                    generation: shared.generation,
                    volume_tag: keys::volume_tag(&cfg.volume),
                    epoch: self.epoch(),
                    counter: 0,
                    first_seq: 0,
                    last_seq: 0,
                    record_count: 0,
                    plain_len: 0,
                    cipher_len: 0,
                    zstd_level: 0,
                    source_time_ns: 0,
                },
                max_bytes: cfg.segment.max_bytes,
                resume: welcome.durable.wrapping_add(1),
                gap: false,
                shared: shared.clone(),
                stop: session_stop.clone(),
                global_stop: self.stop.clone(),
            };
            std::thread::Builder::new()
                .name("batch".into())
                .spawn(move || ctx.run(job_tx))
                .map_err(|e| SessionError::recoverable(format!("cannot start a thread: {e}")))?
        };

        shared.connected.store(true, Ordering::Release);
        let io_result = self.pump(&mut link, &out_rx, &wake_rx, shared);
        shared.connected.store(false, Ordering::Release);
        session_stop.store(true, Ordering::Release);
        shared.spool.wake();
        drop(out_rx);
        let batch_result = match batcher.join() {
            Ok(r) => r,
            Err(_) => {
                tracing::error!("batching thread panicked");
                std::process::abort();
            }
        };
        for w in workers.into_iter().flatten() {
            let _ = w.join();
        }
        if io_result.is_ok() {
            link.close(Duration::from_secs(2));
        }
        // The batcher's error (a damaged spool) outranks the link's.
        match (batch_result, io_result) {
            (Err(e), _) => Err(e),
            (Ok(()), r) => r,
        }
    }

    fn handshake(&self, link: &mut Link, shared: &Shared) -> Result<Welcomed, SessionError> {
        let cfg = self.cfg();
        let src_rand = keys::random16().map_err(|e| SessionError::recoverable(e.to_string()))?;
        let oldest = shared.spool.oldest_seq();
        link.send(&Message::Hello(Hello {
            protocol: msg::PROTOCOL_VERSION,
            features: msg::PROTOCOL_FEATURES,
            volume: cfg.volume.clone(),
            generation: hex::encode(shared.generation),
            epoch: self.epoch(),
            source_random: hex::encode(src_rand),
            oldest_seq: oldest,
            key_id: self.keys.get().active(),
            resync: shared.needs_resync().is_some(),
            replica_seeded: !cfg.initial_copy,
        }));
        let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
        let w = loop {
            match link.recv().map_err(SessionError::link)? {
                Some(Message::Welcome(w)) => break w,
                Some(Message::Error(e)) => {
                    if e.class == WireClass::Fatal
                        && matches!(e.code.as_str(), "stale-epoch" | "promoted")
                    {
                        return Err(SessionError::fatal(self.demote(&e.message)));
                    }
                    return Err(match e.class {
                        WireClass::Fatal => SessionError::fatal(format!(
                            "target refused: {} ({})",
                            e.message, e.code
                        )),
                        WireClass::Recoverable => SessionError::recoverable(format!(
                            "target busy: {} ({})",
                            e.message, e.code
                        )),
                    });
                }
                Some(other) => {
                    return Err(SessionError::fatal(format!(
                        "expected welcome, got {other:?}"
                    )))
                }
                None => {}
            }
            let left = deadline
                .checked_duration_since(Instant::now())
                .ok_or_else(|| SessionError::recoverable("no welcome from target"))?;
            link.pump(left.min(Duration::from_millis(100)), None)
                .map_err(SessionError::link)?;
        };
        if w.protocol != msg::PROTOCOL_VERSION {
            return Err(SessionError::fatal(format!(
                "target speaks protocol {}",
                w.protocol
            )));
        }
        let mut tgt_rand = [0u8; 16];
        hex::decode_to_slice(&w.target_random, &mut tgt_rand)
            .map_err(|_| SessionError::fatal("malformed welcome"))?;
        // Resume right after what the target has durably, which the spool
        // must still hold (or not have reached yet).
        let resume = w.durable_seq.wrapping_add(1);
        let oldest = shared.spool.oldest_seq();
        if (resume.wrapping_sub(oldest) as i64) < 0 {
            return Err(SessionError::fatal(format!(
                "sequence gap: the target has records up to {} but this source's spool starts at {oldest}: not the same source, or the target lost data",
                w.durable_seq
            )));
        }
        shared.acknowledged(w.durable_seq);
        // This target's figures, not the highest ever seen: a target that
        // started over (a new replica) is behind.
        shared
            .target_applied
            .store(w.applied_seq, Ordering::Release);
        self.board.update(&cfg.volume, |s| {
            s.durable_seq = w.durable_seq;
            s.applied_seq = w.applied_seq;
            s.target_inconsistent = w.inconsistent || w.resync_required;
        });
        if w.resync_required {
            tracing::warn!(volume = %cfg.volume, "the target holds no consistent copy of the volume: a full resync follows");
            shared.copy_required.store(true, Ordering::Release);
        }
        tracing::info!(volume = %cfg.volume, durable = w.durable_seq, "connected");
        Ok(Welcomed {
            stream_id: keys::stream_id(&src_rand, &tgt_rand),
            durable: w.durable_seq,
        })
    }

    /// Sends sealed segments in counter order and handles acks.
    fn pump(
        &self,
        link: &mut Link,
        out_rx: &Receiver<(u64, Result<Vec<u8>, String>)>,
        wake: &UnixStream,
        shared: &Shared,
    ) -> Result<(), SessionError> {
        let cfg = self.cfg();
        let mut next = 0u64;
        let mut pending: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
        let mut workers_done = false;
        loop {
            if self.stop.load(Ordering::Acquire) {
                return Ok(());
            }
            self.tick();
            if let Some(f) = shared.fatal() {
                return Err(SessionError::fatal(f));
            }
            let handing_over = {
                let mut pf = shared.planned.lock().unwrap_or_else(|p| p.into_inner());
                match pf.as_mut() {
                    Some(f) => {
                        // The target has every record: ask it to take over.
                        let durable = shared.durable.load(Ordering::Acquire);
                        if !f.sent && (durable.wrapping_sub(f.upto) as i64) >= 0 {
                            link.send(&Message::Promote(msg::Promote {
                                upto: f.upto,
                                epoch: f.epoch,
                            }));
                            f.sent = true;
                            tracing::info!(volume = %cfg.volume, upto = f.upto, epoch = f.epoch, "asking the target to take over");
                        }
                        true
                    }
                    None => false,
                }
            };
            if !handing_over
                && !shared.failing_over.load(Ordering::Acquire)
                && shared.closed.load(Ordering::Acquire)
                && shared.durable.load(Ordering::Acquire).wrapping_add(1) == shared.spool.next_seq()
            {
                return Err(SessionError::fatal(
                    "capture ring closed: the protected volume's table was removed; everything captured is durable on the target; protect it again to resume",
                ));
            }
            // Collect what the workers finished, in counter order.
            while link.queued() < MAX_QUEUED_BYTES && !workers_done {
                match out_rx.try_recv() {
                    Ok((c, Ok(f))) => {
                        pending.insert(c, f);
                    }
                    Ok((_, Err(e))) => {
                        return Err(SessionError::fatal(format!("sealing failed: {e}")))
                    }
                    Err(crossbeam_channel::TryRecvError::Empty) => break,
                    Err(crossbeam_channel::TryRecvError::Disconnected) => workers_done = true,
                }
                while let Some(f) = pending.remove(&next) {
                    let n = f.len() as u64;
                    link.send_segment(f);
                    next += 1;
                    self.board.update(&cfg.volume, |s| {
                        s.segments += 1;
                        s.frame_bytes += n;
                    });
                }
            }
            if workers_done && pending.is_empty() {
                // The batcher stopped (ring error or shutdown): flush and end.
                if link.drained() {
                    return Ok(());
                }
            }
            let woke = link
                .pump(Duration::from_millis(100), Some(wake.as_fd()))
                .map_err(SessionError::link)?;
            if woke {
                let mut b = [0u8; 256];
                while matches!((&*wake).read(&mut b), Ok(n) if n > 0) {}
            }
            while let Some(m) = link.recv().map_err(SessionError::link)? {
                match m {
                    Message::Ack(a) => {
                        shared.acknowledged(a.durable_seq);
                        shared
                            .target_applied
                            .store(a.applied_seq, Ordering::Release);
                        // Acks of one session only move forward.
                        self.board.update(&cfg.volume, |s| {
                            s.durable_seq = s.durable_seq.max(a.durable_seq);
                            s.applied_seq = s.applied_seq.max(a.applied_seq);
                            s.target_inconsistent = a.flags & msg::ACK_INCONSISTENT != 0;
                        });
                        if a.flags & msg::ACK_NEEDS_FULL_RESYNC != 0 {
                            // The drain makes sure a full resync that
                            // reaches this target is pending or running.
                            shared.copy_required.store(true, Ordering::Release);
                        }
                    }
                    Message::Promoted(p) => {
                        let pf = shared
                            .planned
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .take();
                        match pf {
                            Some(f) => {
                                let _ = f.reply.send(Ok(p));
                                // The failover command records the demotion
                                // and stops the daemon.
                                let deadline = Instant::now() + Duration::from_secs(30);
                                while !self.stop.load(Ordering::Acquire)
                                    && Instant::now() < deadline
                                {
                                    std::thread::sleep(Duration::from_millis(10));
                                }
                                return Ok(());
                            }
                            None => {
                                return Err(SessionError::fatal(format!(
                                    "the target says it took over (epoch {}) but no failover was asked for",
                                    p.epoch
                                )))
                            }
                        }
                    }
                    Message::Error(e) => {
                        if let Some(f) = shared
                            .planned
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .as_ref()
                            .filter(|f| f.sent)
                        {
                            let _ = f.reply.send(Err(format!("target: {}", e.message)));
                        }
                        return Err(match e.class {
                            WireClass::Fatal => {
                                SessionError::fatal(format!("target: {} ({})", e.message, e.code))
                            }
                            WireClass::Recoverable => SessionError::recoverable(format!(
                                "target: {} ({})",
                                e.message, e.code
                            )),
                        });
                    }
                    other => {
                        return Err(SessionError::fatal(format!(
                            "unexpected message from target: {other:?}"
                        )))
                    }
                }
            }
        }
    }
}

struct Welcomed {
    stream_id: [u8; 16],
    durable: u64,
}

/// The stream key of a session, following the active key of the keyring:
/// after a reload the next segment is sealed with the new key (same stream,
/// counter going on), so rotation does not interrupt replication.
struct SessionKeys {
    store: Arc<KeyStore>,
    stream_id: [u8; 16],
    volume: String,
    epoch: u64,
    cache: std::sync::Mutex<Option<(u64, Arc<StreamKey>)>>,
}

impl SessionKeys {
    fn current(&self) -> Result<Arc<StreamKey>, String> {
        let v = self.store.version();
        let mut c = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((cv, k)) = c.as_ref() {
            if *cv == v {
                return Ok(k.clone());
            }
        }
        let kr = self.store.get();
        let ctx = StreamContext {
            stream_id: self.stream_id,
            volume: &self.volume,
            direction: Direction::Forward,
            epoch: self.epoch,
        };
        let k = Arc::new(StreamKey::derive(&kr, kr.active(), &ctx).map_err(|e| e.to_string())?);
        *c = Some((v, k.clone()));
        Ok(k)
    }
}

fn seal_worker(
    rx: Receiver<Job>,
    tx: Sender<(u64, Result<Vec<u8>, String>)>,
    key: &SessionKeys,
    level: i32,
    wake: &UnixStream,
) {
    let mut compressor = match zstd::bulk::Compressor::new(level) {
        Ok(c) => c,
        Err(e) => {
            let _ = tx.send((0, Err(format!("zstd: {e}"))));
            return;
        }
    };
    for job in rx {
        let c = job.header.counter;
        let r = key.current().and_then(|k| {
            frame::seal_with(&mut compressor, job.header, &job.plain, level, &k)
                .map_err(|e| e.to_string())
        });
        drop(job.plain);
        if tx.send((c, r)).is_err() {
            return;
        }
        let _ = (&*wake).write(&[1]);
    }
}

struct BatchCtx {
    header: SegmentHeader,
    max_bytes: usize,
    /// First record to send.
    resume: u64,
    /// The segment being packed starts a resync after a gap.
    gap: bool,
    shared: Arc<Shared>,
    stop: Arc<AtomicBool>,
    global_stop: Arc<AtomicBool>,
}

impl BatchCtx {
    fn stopping(&self) -> bool {
        self.stop.load(Ordering::Acquire) || self.global_stop.load(Ordering::Acquire)
    }

    fn run(mut self, tx: Sender<Job>) -> Result<(), SessionError> {
        let r = self.batch_loop(&tx);
        if let Err(e) = &r {
            if e.class == ErrorClass::Recoverable && e.message.starts_with("spool") {
                self.shared.report_damage(e.message.clone());
            }
        }
        r
    }

    /// Reads spool chunks from `resume` on and packs them into segments: a
    /// segment closes at `max_bytes` or when the spool has nothing more.
    fn batch_loop(&mut self, tx: &Sender<Job>) -> Result<(), SessionError> {
        let spool = self.shared.spool.clone();
        let mut reader = spool.reader(self.resume);
        let mut plain: Vec<u8> = Vec::with_capacity(self.max_bytes + (1 << 20));
        let mut first: Option<u64> = None;
        let mut last = 0u64;
        let mut last_time = 0u64;
        loop {
            if self.stopping() {
                return Ok(());
            }
            match reader.next_chunk() {
                Ok(Some(c)) => {
                    // A resync after a gap starts a segment of its own, which
                    // tells the target the gap is intended.
                    if first.is_some()
                        && (c.gap_from.is_some()
                            || plain.len() + c.plain.len() > frame::MAX_PLAIN_LEN as usize)
                    {
                        self.emit(tx, &mut plain, &mut first, last, last_time)?;
                    }
                    if first.is_none() {
                        self.gap = c.gap_from.is_some();
                    }
                    first.get_or_insert(c.first_seq);
                    last = c.last_seq;
                    last_time = c.last_ns;
                    plain.extend_from_slice(&c.plain);
                    if plain.len() >= self.max_bytes {
                        self.emit(tx, &mut plain, &mut first, last, last_time)?;
                    }
                }
                Ok(None) => {
                    if first.is_some() {
                        self.emit(tx, &mut plain, &mut first, last, last_time)?;
                        continue;
                    }
                    spool.wait_for(reader.seq(), reader.drops(), Duration::from_millis(100));
                }
                Err(SpoolError::Dropped) => {
                    // The drain switched to a dirty map: what was read and
                    // not sent is covered by it. The stream goes on from
                    // where the spool starts again (after the gap, a resync).
                    plain.clear();
                    first = None;
                    self.gap = false;
                    reader = spool.reader(spool.oldest_seq());
                }
                Err(e) => return Err(SessionError::recoverable(format!("spool: {e}"))),
            }
        }
    }

    fn emit(
        &mut self,
        tx: &Sender<Job>,
        plain: &mut Vec<u8>,
        first: &mut Option<u64>,
        last: u64,
        last_time: u64,
    ) -> Result<(), SessionError> {
        let Some(f) = first.take() else { return Ok(()) };
        let mut h = self.header.clone();
        h.first_seq = f;
        h.last_seq = last;
        h.record_count = last
            .checked_sub(f)
            .and_then(|d| d.checked_add(1))
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| {
                SessionError::fatal(format!("records {f}..={last} do not make one segment"))
            })?;
        h.source_time_ns = last_time;
        if std::mem::take(&mut self.gap) {
            h.features |= frame::FEATURE_RESYNC_GAP;
        }
        self.header.counter += 1;
        let job = Job {
            header: h,
            plain: std::mem::replace(plain, Vec::with_capacity(self.max_bytes + (1 << 20))),
        };
        let mut job = Some(job);
        while let Some(j) = job.take() {
            match tx.send_timeout(j, Duration::from_millis(100)) {
                Ok(()) => {}
                Err(crossbeam_channel::SendTimeoutError::Timeout(j)) => {
                    if self.stopping() {
                        return Ok(());
                    }
                    job = Some(j);
                }
                Err(crossbeam_channel::SendTimeoutError::Disconnected(_)) => return Ok(()),
            }
        }
        Ok(())
    }
}
