//! replicad: the dm-replica daemon. One binary, two roles:
//!
//! * `replicad source` drains the capture ring of a protected volume (or
//!   consistency group), packs records into compressed, encrypted segments
//!   and ships them over TLS to the target;
//! * `replicad target` verifies, journals and acknowledges segments, and
//!   applies them in order to the replica, keeping recovery points.

pub mod chunkio;
pub mod cli;
pub mod control;
pub mod keystore;
pub mod link;
pub mod retry;
pub mod source;
pub mod status;
pub mod target;
pub mod tls;

/// The configuration of both roles (the `replica-config` crate).
pub use replica_config as config;

use std::path::Path;

/// Daemon errors.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// Configuration.
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    /// Keys.
    #[error(transparent)]
    Keys(#[from] replica_proto::keys::KeyError),
    /// TLS material.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// Storage.
    #[error(transparent)]
    Store(#[from] replica_store::StoreError),
    /// The capture ring.
    #[error("capture ring: {0}")]
    Ring(#[from] replica_ring::RingError),
    /// An OS error with context.
    #[error(transparent)]
    Io(#[from] replica_fs::IoError),
    /// Replication stopped for a non-recoverable error.
    #[error("Critical: {0}")]
    Critical(String),
    /// Not supported by this build.
    #[error("{0}")]
    Unsupported(String),
    /// Another process owns the state directory.
    #[error("another replicad runs with state directory {} (it holds {}); stop it first, or give this one its own state_dir", .0.display(), .0.join(replica_fs::LOCK_FILE).display())]
    StateDirBusy(std::path::PathBuf),
}

/// Creates a daemon's state directory, readable by its owner only (it holds
/// journals, status and the control socket), and takes its lock: held
/// until the process exits, so one daemon at a time owns it. Waits up to
/// [`STATE_LOCK_WAIT`] for it (`replctl point` may hold it for a moment
/// while no daemon runs).
pub fn own_state_dir(dir: &Path) -> Result<replica_fs::DirLock, DaemonError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir).map_err(|e| DaemonError::io("create state directory", dir, e))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| DaemonError::io("restrict state directory", dir, e))?;
    if let Some(l) = replica_fs::DirLock::try_lock(dir)? {
        return Ok(l);
    }
    tracing::warn!(dir = %dir.display(), "another process holds the state directory's lock; waiting up to {}s", STATE_LOCK_WAIT.as_secs());
    replica_fs::DirLock::wait(dir, STATE_LOCK_WAIT)?
        .ok_or_else(|| DaemonError::StateDirBusy(dir.to_owned()))
}

/// How long a starting daemon waits for its state directory's lock.
pub const STATE_LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(15);

impl DaemonError {
    /// Wraps an OS error.
    pub fn io(what: &'static str, path: &Path, source: std::io::Error) -> Self {
        Self::Io(replica_fs::IoError::new(what, path, source))
    }
}

/// Now, ns since the Unix epoch (0 if the clock is before it).
pub use replica_ring::now_ns;
