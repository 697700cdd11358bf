//! Source role: a drain thread moves the capture ring, in order, into a
//! local spool (see [`drain`]); sessions read the spool from the
//! target's durable position on, batch records into segments, compress and
//! seal them on worker threads and send them in order over TLS. The spool
//! is trimmed only up to what the target acknowledged as durable, so
//! reconnects and restarts resume by record sequence.

pub mod batch;
pub mod commands;
pub mod dirty;
pub mod drain;
pub mod failover;
pub mod protected;
pub mod pump;
pub mod ring;
pub mod seal;
pub mod session;
pub mod spool;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::keystore::KeyStore;

use crate::config::{RingSource, SourceConfig};
use crate::retry::{Backoff, Decision};
use crate::source::drain::{DrainSettings, Drainer, Shared};
use crate::status::{Connection, ReasonKind, Role, StatusBoard, VolumeStatus};

use crate::DaemonError;

use commands::Commands;
use ring::open_ring;

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
    /// This process owns the state directory while it lives.
    _state_lock: replica_fs::DirLock,
}

impl Source {
    /// Loads keys and TLS material.
    pub fn new(cfg: SourceConfig, sig: crate::cli::Signals) -> Result<Self, DaemonError> {
        let stop = sig.stop.clone();
        // The daemon's own writes must never be captured.
        crate::source::protected::check_not_protected(&cfg.state_dir, "state_dir")?;
        crate::source::protected::check_not_protected(&cfg.spool_dir(), "spool.dir")?;
        let keys = KeyStore::load(&cfg.keys)?;
        let tls = crate::tls::Reloadable::new(crate::tls::client_config(&cfg.tls)?);
        let state_lock = crate::own_state_dir(&cfg.state_dir)?;
        let board = Arc::new(StatusBoard::new(
            &cfg.state_dir,
            vec![VolumeStatus::new(&cfg.volume, Role::Primary)],
        ));
        let sock = cfg
            .control_socket
            .clone()
            .unwrap_or_else(|| crate::control::default_path(&cfg.state_dir));
        let role = crate::source::failover::SourceRole::load(&cfg.state_dir).map_err(|e| {
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
            requests: Default::default(),
            shared: std::sync::OnceLock::new(),
            stop: stop.clone(),
            failing_over: std::sync::Mutex::new(()),
        });
        let handler = {
            let c = commands.clone();
            crate::control::handler(move |volume, command| c.handle(volume, command))
        };
        let control = Some(crate::control::serve(
            &sock,
            board.clone(),
            stop.clone(),
            Some(handler),
        )?);
        Ok(Self {
            _state_lock: state_lock,
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
        let mut role =
            crate::source::failover::SourceRole::load(&cfg.state_dir).unwrap_or_default();
        role.epoch = role.epoch.max(self.epoch());
        role.demoted = Some(format!("the target refused this source: {why}"));
        if let Err(e) = role.save(&cfg.state_dir) {
            tracing::error!(error = %e, "cannot record the demotion");
        }
        let fenced = match (&cfg.ring, &cfg.device) {
            (RingSource::Group(_), Some(dev)) => crate::source::failover::dm_name(dev)
                .map_err(Into::into)
                .and_then(|name| crate::source::failover::fence(&name, cfg.volume_size / 512))
                .map(|()| "; the protected volume now fails every write (error table)")
                .map_err(|e| e.to_string()),
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
    /// certificate paths, `[network]` settings: at the next connection;
    /// segment settings: at the next session; retry schedule: at the next
    /// failure); every other changed key is reported and keeps its running
    /// value.
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
        self.board.flush();
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
                region_bytes: u64::from(cfg.resync.chunk_kib) * 1024,
                state_path: cfg.state_dir.join("resync.state"),
                device: cfg.device.clone(),
                resync_window: cfg.resync.window_bytes,
                resync_max_bytes: cfg.resync.max_write_bytes,
                spool_dir: spool_dir.clone(),
                spool_file_bytes: cfg.spool.file_bytes,
                last_generation: crate::source::failover::SourceRole::load(&cfg.state_dir)
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
            self.commands.requests.clone(),
            self.keys.clone(),
        )?;
        let _ = self.commands.shared.set(shared.clone());
        // From now on a different ring means writes may have been missed.
        let mut role =
            crate::source::failover::SourceRole::load(&cfg.state_dir).unwrap_or_default();
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
            let message = err.to_string();
            match backoff.on_failure(err.class(), Instant::now()) {
                Decision::Critical => {
                    tracing::error!(volume = %vol, "replication stopped: {message}");
                    self.board.update(&vol, |s| {
                        s.connection = Connection::StandAlone;
                        s.clear_reason(ReasonKind::Session);
                        s.set_reason(ReasonKind::Stopped, message.clone());
                    });
                    return Err(DaemonError::Critical(message));
                }
                Decision::RetryAt(at) => {
                    tracing::warn!(volume = %vol, attempt = backoff.attempts(), "replication interrupted, retrying: {message}");
                    self.board.update(&vol, |s| {
                        s.connection = Connection::Retrying;
                        s.set_reason(ReasonKind::Session, message.clone());
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
            s.clear_reason(ReasonKind::Session);
            s.set_reason(ReasonKind::Stopped, why.clone());
        });
        DaemonError::Critical(why)
    }
}
