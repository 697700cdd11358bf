//! Target role: accept authorised sources, verify and journal their
//! segments durably, acknowledge, and apply them in order to the replica,
//! taking recovery points at committed flushes.
//!
//! Per stream (a consistency group; today one volume) there is one applier
//! thread that writes the replica; each connection runs on its own thread
//! and talks to the applier through a channel. The newest connection for a
//! stream wins: an older one (a source that restarted) notices and ends.
//! The replication state of a stream has one owner, `stream::Stream`,
//! which every path goes through.
//!
//! | module | what it holds |
//! |---|---|
//! | this one | [`Target`]: start-up, the accept loop, reload (SIGHUP), certificate expiry checks |
//! | `stream` | the owner of a stream's state and its members; opening a stream at start-up |
//! | `door` | the bound on connections that have not proved their key yet |
//! | `accept` | serving a connection: identity, hello, key confirmation, epoch checks, the welcome |
//! | `refusal` | why a connection is refused or ended: typed reasons and their wire codes |
//! | `takeover` | a stream of a new ring generation taking a stream over |
//! | `receive` | the stream loop: segment verification, journal group commit, acks, pings, a silent source |
//! | `apply` | the applier: opening journaled frames, applying records, retry |
//! | `keys` | the stream keys that open segments, derived once |
//! | `points` | recovery points, checkpoints, the resync window |
//! | `promote` | failover: the control command, planned and unplanned promotion |
//! | `commands` | the control commands: which stream, failover, point list/open/close |

use std::collections::HashMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::config::TargetConfig;
use crate::keystore::KeyStore;
use crate::status::{Role, StatusBoard, VolumeStatus};
use crate::DaemonError;

mod accept;
mod apply;
mod commands;
mod compare;
mod door;
mod keys;
mod points;
mod promote;
mod receive;
mod refusal;
mod stream;
mod takeover;

use stream::Stream;

/// How often a connection's thread looks at the link, its stream's slot and
/// the stop flag.
const PUMP_INTERVAL: Duration = Duration::from_millis(100);

use crate::now_ns;

/// A running target.
pub struct Target {
    streams: HashMap<String, Arc<Stream>>,
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
    door: Arc<door::Door>,
    /// This process owns the state directory while it lives.
    _state_lock: replica_fs::DirLock,
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
        let state_lock = crate::own_state_dir(&cfg.state_dir)?;
        let board = Arc::new(StatusBoard::new(
            &cfg.state_dir,
            cfg.volumes
                .iter()
                .map(|v| VolumeStatus::new(&v.id, Role::Secondary))
                .collect(),
        ));
        let mut streams = HashMap::new();
        let mut appliers = Vec::new();
        for vc in &cfg.volumes {
            let (s, applier) = stream::open(cfg, vc, keys.clone(), board.clone(), stop.clone())?;
            streams.insert(vc.id.clone(), s);
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
        replica_fs::write_atomic(&cfg.state_dir.join("listen.addr"), bound.as_bytes())?;
        let sock = cfg
            .control_socket
            .clone()
            .unwrap_or_else(|| crate::control::default_path(&cfg.state_dir));
        let handler = {
            let streams = streams.clone();
            crate::control::handler(move |volume, command| {
                commands::handle(&streams, volume, command)
            })
        };
        let control = crate::control::serve(&sock, board.clone(), stop.clone(), Some(handler))?;
        let notifier = crate::control::Notifier::new();
        // Journals scanned, replicas open, listening, control socket up:
        // only now can the target serve.
        notifier.ready(&format!(
            "listening on {bound}, {} volume(s)",
            streams.len()
        ));
        tracing::info!(listen = %bound, "target ready");
        Ok(Self {
            _state_lock: state_lock,
            streams,
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
            door: door::Door::new(
                cfg.network.max_unauthenticated,
                cfg.network.max_unauthenticated_per_address,
            ),
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
    /// (TLS file paths, each volume's `allowed_sources` and `keep_points`;
    /// the `[network]` timeouts, for new connections); anything else that
    /// changed is reported and ignored until a restart. A live session
    /// whose source is no longer allowed ends itself (its stream loop
    /// checks before each batch).
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
        for f in fixed_keys_changed(&self.config, &new) {
            tracing::error!(
                key = f,
                "configuration key cannot change at run time; restart the daemon to apply it"
            );
        }
        for nv in &new.volumes {
            if let Some(s) = self.streams.get(&nv.id) {
                s.settings.update(nv);
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
            self.streams.keys().map(String::as_str),
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
        let mut turned_away = door::TurnedAway::default();
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
                    conns.retain(|h| !h.is_finished());
                    let ticket = match self.door.enter(peer.ip()) {
                        Ok(t) => t,
                        Err(full) => {
                            // Closed at once: nothing is read or buffered.
                            turned_away.note(&peer, full);
                            continue;
                        }
                    };
                    tracing::debug!(%peer, "connection");
                    let ctx = accept::ConnCtx {
                        streams: self.streams.clone(),
                        keys: self.keys.clone(),
                        tls: self.tls.get(),
                        board: self.board.clone(),
                        stop: self.stop.clone(),
                        handshake_timeout: Duration::from_secs(
                            self.config.network.handshake_timeout_secs,
                        ),
                        liveness: crate::link::Liveness::new(&self.config.network),
                    };
                    let accepted = Instant::now();
                    match std::thread::Builder::new()
                        .name("conn".into())
                        .spawn(move || ctx.serve(sock, accepted, ticket))
                    {
                        Ok(h) => conns.push(h),
                        // The closure, the socket and the ticket are
                        // dropped: the peer sees the connection close and
                        // retries; the daemon goes on.
                        Err(e) => {
                            tracing::warn!(%peer, error = %e, "cannot start a connection thread; connection closed")
                        }
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    let fd = std::os::fd::AsFd::as_fd(&self.listener);
                    let mut fds = [nix::poll::PollFd::new(fd, nix::poll::PollFlags::POLLIN)];
                    let _ = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(200u16));
                }
                Err(e) => {
                    // Out of descriptors or memory, an aborted connection:
                    // never fatal; wait a little so a persistent error
                    // does not spin.
                    tracing::warn!(error = %e, "accept failed");
                    let fd = std::os::fd::AsFd::as_fd(&self.listener);
                    let mut fds = [nix::poll::PollFd::new(fd, nix::poll::PollFlags::empty())];
                    let _ = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(50u16));
                }
            }
            turned_away.report();
        }
        for h in conns {
            let _ = h.join();
        }
        self.notifier.stopping();
        // Appliers end when every sender of their channel is gone.
        drop(self.streams);
        for a in self.appliers {
            let _ = a.join();
        }
        let _ = self.control.join();
        self.board.flush();
        Ok(())
    }
}

/// The configuration keys that differ between `old` and `new` but only take
/// effect at a restart.
fn fixed_keys_changed(old: &TargetConfig, new: &TargetConfig) -> Vec<&'static str> {
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
    if new.network.max_unauthenticated != old.network.max_unauthenticated
        || new.network.max_unauthenticated_per_address
            != old.network.max_unauthenticated_per_address
    {
        fixed.push("network.max_unauthenticated, network.max_unauthenticated_per_address");
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
    fixed
}
