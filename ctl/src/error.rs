//! replctl's errors and its exit codes: every error is a [`CtlError`],
//! which names the [`Exit`] code the process ends with.

use std::path::PathBuf;

use replica_control::{ControlError, ErrorCode};

/// The exit codes of `replctl` (documented in `replctl --help` and
/// docs/operations.md). 1 is not used, so a caller can tell these from an
/// older replctl, which exited 1 on every error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Exit {
    /// Done.
    Ok = 0,
    /// A bad argument or option (clap's own code for usage errors).
    Usage = 2,
    /// What was named does not exist: a volume, point, file, state
    /// directory, or no daemon answers on the socket.
    NotFound = 3,
    /// Refused: by the daemon (not allowed, not now, not a command of its
    /// role, another protocol version) or by replctl (it exists already,
    /// the daemon could not start with this configuration).
    Refused = 4,
    /// Anything else failed.
    Failed = 5,
    /// The volume is Critical: replication stopped for a non-recoverable
    /// error while replctl waited for it.
    Critical = 6,
}

impl Exit {
    /// Every code, in order.
    pub const ALL: [Exit; 6] = [
        Exit::Ok,
        Exit::Usage,
        Exit::NotFound,
        Exit::Refused,
        Exit::Failed,
        Exit::Critical,
    ];

    /// The process exit status.
    pub fn code(self) -> u8 {
        self as u8
    }

    /// What the code means, in one line (`replctl --help`, the docs).
    pub fn summary(self) -> &'static str {
        match self {
            Exit::Ok => "done",
            Exit::Usage => "usage: a bad argument or option",
            Exit::NotFound => {
                "not found: no such volume, point, file or state directory, or no daemon answering"
            }
            Exit::Refused => {
                "refused: by the daemon (not allowed, not now, not its role's command, another protocol version) or by replctl (exists already, the daemon cannot start with it)"
            }
            Exit::Failed => "failed: anything else",
            Exit::Critical => {
                "Critical: the volume stopped replicating with a non-recoverable error while replctl waited for it"
            }
        }
    }

    /// The table of exit codes `replctl --help` ends with.
    pub fn help() -> String {
        let mut s = String::from("Exit codes:");
        for e in Self::ALL {
            s.push_str(&format!("\n  {}  {}", e.code(), e.summary()));
        }
        s
    }

    /// The code a daemon's error code ends replctl with.
    pub fn of_daemon(code: ErrorCode) -> Self {
        match code {
            ErrorCode::NotFound => Exit::NotFound,
            ErrorCode::UnsupportedVersion
            | ErrorCode::PermissionDenied
            | ErrorCode::UnknownCommand
            | ErrorCode::Refused => Exit::Refused,
            ErrorCode::MalformedRequest | ErrorCode::Failed => Exit::Failed,
        }
    }

    /// The code an OS error ends replctl with.
    pub fn of_io(e: &std::io::Error) -> Self {
        match e.kind() {
            std::io::ErrorKind::NotFound => Exit::NotFound,
            std::io::ErrorKind::PermissionDenied | std::io::ErrorKind::AlreadyExists => {
                Exit::Refused
            }
            _ => Exit::Failed,
        }
    }

    /// The code a control request's error ends replctl with.
    pub fn of_control(e: &ControlError) -> Self {
        match e {
            ControlError::NotRunning { .. } => Exit::NotFound,
            ControlError::Io { source, .. } => Exit::of_io(source),
            ControlError::Malformed { .. } => Exit::Failed,
            ControlError::Daemon { code, .. } => Exit::of_daemon(*code),
        }
    }
}

impl From<Exit> for std::process::ExitCode {
    fn from(e: Exit) -> Self {
        std::process::ExitCode::from(e.code())
    }
}

/// A replctl error: what went wrong, with its cause, and the exit code it
/// ends the process with ([`CtlError::exit`]).
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    /// A bad combination of arguments that clap does not catch.
    #[error("{0}")]
    Usage(String),
    /// Talking to a daemon.
    #[error(transparent)]
    Control(#[from] ControlError),
    /// A configuration file.
    #[error(transparent)]
    Config(#[from] replica_config::ConfigError),
    /// A keyring.
    #[error(transparent)]
    Keys(#[from] replica_proto::keys::KeyError),
    /// Which keys a target still needs.
    #[error(transparent)]
    NeededKeys(#[from] crate::keys::NeededKeysError),
    /// Certificates.
    #[error(transparent)]
    Certs(#[from] crate::certs::CertError),
    /// On-disk state, journals, replicas.
    #[error(transparent)]
    Store(#[from] replica_store::StoreError),
    /// The development-mode feeder.
    #[error(transparent)]
    Dev(#[from] crate::dev::DevError),
    /// Waiting for a record to be applied.
    #[error(transparent)]
    Wait(#[from] crate::wait::WaitError),
    /// Waiting for a resync.
    #[error(transparent)]
    Resync(#[from] crate::progress::ResyncWaitError),
    /// An online verify.
    #[error(transparent)]
    Verify(#[from] crate::verify::VerifyError),
    /// Protecting or unprotecting a volume.
    #[error(transparent)]
    Protect(#[from] crate::protect::ProtectError),
    /// Starting the source daemon.
    #[error(transparent)]
    Start(#[from] crate::start::StartError),
    /// A volume a configuration file does not list.
    #[error("no volume {volume} in {}", config.display())]
    NoSuchVolume {
        /// The volume asked for.
        volume: String,
        /// The configuration file.
        config: PathBuf,
    },
    /// No daemon answers and it published no status.
    #[error("{}: no daemon answering ({daemon}) and no published status: {source}", dir.display())]
    NoStatus {
        /// The state directory.
        dir: PathBuf,
        /// Why the daemon did not answer.
        daemon: ControlError,
        /// Why its status file cannot be read.
        #[source]
        source: std::io::Error,
    },
    /// A daemon's successful answer lacks what the command asks for.
    #[error("the daemon's answer to {command} has no {field}")]
    Incomplete {
        /// The command's wire name.
        command: &'static str,
        /// The field that is missing.
        field: &'static str,
    },
    /// A file replctl reads or writes itself.
    #[error(transparent)]
    Io(#[from] replica_fs::IoError),
    /// Printing JSON.
    #[error("JSON output: {0}")]
    Json(#[from] serde_json::Error),
    /// A daemon owns the state directory but does not answer.
    #[error("a replicad holds {} (its lock) but does not answer on its control socket: wait until it has started or stopped, then retry", .0.display())]
    StateDirBusy(std::path::PathBuf),
}

impl CtlError {
    /// The exit code this error ends replctl with.
    pub fn exit(&self) -> Exit {
        use replica_config::ConfigError;
        use replica_proto::keys::KeyError;
        use replica_store::StoreError;
        match self {
            Self::Usage(_) => Exit::Usage,
            Self::Control(e) => Exit::of_control(e),
            Self::Config(ConfigError::Io { source, .. }) => Exit::of_io(source),
            Self::Config(_) => Exit::Failed,
            Self::Keys(KeyError::Io { source, .. }) => Exit::of_io(source),
            Self::Keys(KeyError::Permissions { .. }) => Exit::Refused,
            Self::Keys(_) => Exit::Failed,
            Self::NeededKeys(e) => e.exit(),
            Self::Certs(e) => e.exit(),
            Self::Store(StoreError::Io(replica_fs::IoError { source, .. })) => Exit::of_io(source),
            Self::Store(StoreError::NoSuchPoint(_)) => Exit::NotFound,
            Self::Store(_) => Exit::Failed,
            Self::Dev(e) => e.exit(),
            Self::Wait(e) => e.exit(),
            Self::Resync(e) => e.exit(),
            Self::Verify(e) => e.exit(),
            Self::Protect(e) => e.exit(),
            Self::Start(e) => e.exit(),
            Self::NoSuchVolume { .. } => Exit::NotFound,
            Self::NoStatus { source, .. } => Exit::of_io(source),
            Self::Io(replica_fs::IoError { source, .. }) => Exit::of_io(source),
            Self::Incomplete { .. } | Self::Json(_) => Exit::Failed,
            Self::StateDirBusy(_) => Exit::Refused,
        }
    }

    /// Wraps an OS error with context.
    pub fn io(what: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io(replica_fs::IoError::new(what, path, source))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_operations_guide_lists_every_exit_code() {
        let doc = include_str!("../../docs/operations.md");
        for e in Exit::ALL {
            let row = format!("| {} | {} |", e.code(), e.summary());
            assert!(doc.contains(&row), "docs/operations.md lacks the row {row}");
        }
        assert_eq!(Exit::help().lines().count(), 1 + Exit::ALL.len());
    }

    #[test]
    fn daemon_codes_map_to_exit_codes() {
        assert_eq!(Exit::of_daemon(ErrorCode::NotFound), Exit::NotFound);
        assert_eq!(Exit::of_daemon(ErrorCode::UnknownCommand), Exit::Refused);
        assert_eq!(Exit::of_daemon(ErrorCode::PermissionDenied), Exit::Refused);
        assert_eq!(
            Exit::of_daemon(ErrorCode::UnsupportedVersion),
            Exit::Refused
        );
        assert_eq!(Exit::of_daemon(ErrorCode::Refused), Exit::Refused);
        assert_eq!(Exit::of_daemon(ErrorCode::Failed), Exit::Failed);
        let e = CtlError::from(ControlError::Daemon {
            code: ErrorCode::NotFound,
            message: "no volume".into(),
        });
        assert_eq!(e.exit(), Exit::NotFound);
        let e = CtlError::from(ControlError::NotRunning {
            path: "/run/x.sock".into(),
            source: std::io::ErrorKind::NotFound.into(),
        });
        assert_eq!(e.exit(), Exit::NotFound);
    }
}
