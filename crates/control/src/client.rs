//! The client side: one request, one answer.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::{Command, ErrorCode, Request, Response};

/// The control socket's file name in a daemon's state directory.
pub const SOCKET_FILE: &str = "replicad.sock";

/// How long [`request`] waits for an answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a request got no successful answer.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// Nothing listens on the socket (no such file, or no daemon accepting).
    #[error("{}: {source} (is the daemon running?)", path.display())]
    NotRunning {
        /// The socket.
        path: PathBuf,
        /// The connect error.
        #[source]
        source: std::io::Error,
    },
    /// Connecting, writing or reading failed otherwise (the socket's mode
    /// refused the caller, the answer did not come in time).
    #[error("{}: {source}", path.display())]
    Io {
        /// The socket.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The answer is not a response of this protocol.
    #[error("{}: malformed response: {source}", path.display())]
    Malformed {
        /// The socket.
        path: PathBuf,
        /// What JSON says.
        #[source]
        source: serde_json::Error,
    },
    /// The daemon refused the command or it failed there.
    #[error("{message}")]
    Daemon {
        /// What kind of error.
        code: ErrorCode,
        /// The daemon's words.
        message: String,
    },
}

impl ControlError {
    /// The daemon's error code, when it answered with an error.
    pub fn daemon_code(&self) -> Option<ErrorCode> {
        match self {
            Self::Daemon { code, .. } => Some(*code),
            _ => None,
        }
    }
}

/// The default socket path for a state directory.
pub fn default_path(state_dir: &Path) -> PathBuf {
    state_dir.join(SOCKET_FILE)
}

/// Sends `command` to a daemon's control socket.
pub fn request(path: &Path, command: Command) -> Result<Response, ControlError> {
    request_for(path, command, None)
}

/// Sends `command` about `volume` to a daemon's control socket.
pub fn request_for(
    path: &Path,
    command: Command,
    volume: Option<&str>,
) -> Result<Response, ControlError> {
    send(
        path,
        &Request::new(command).for_volume(volume),
        ANSWER_TIMEOUT,
    )
}

/// Sends a request and waits up to `timeout` for the answer (long
/// operations such as a failover answer when they are done). An error
/// answer is [`ControlError::Daemon`].
pub fn send(path: &Path, req: &Request, timeout: Duration) -> Result<Response, ControlError> {
    let io = |source| ControlError::Io {
        path: path.to_owned(),
        source,
    };
    let s = UnixStream::connect(path).map_err(|source| {
        use std::io::ErrorKind::{ConnectionRefused, NotFound};
        if matches!(source.kind(), NotFound | ConnectionRefused) {
            ControlError::NotRunning {
                path: path.to_owned(),
                source,
            }
        } else {
            io(source)
        }
    })?;
    s.set_read_timeout(Some(timeout)).map_err(io)?;
    let mut line = serde_json::to_vec(req).map_err(|source| ControlError::Malformed {
        path: path.to_owned(),
        source,
    })?;
    line.push(b'\n');
    (&s).write_all(&line).map_err(io)?;
    let mut answer = String::new();
    BufReader::new(&s).read_line(&mut answer).map_err(io)?;
    let r: Response = serde_json::from_str(&answer).map_err(|source| ControlError::Malformed {
        path: path.to_owned(),
        source,
    })?;
    match r.error_code() {
        None => Ok(r),
        Some(code) => Err(ControlError::Daemon {
            code,
            message: r.error.unwrap_or_else(|| "request failed".into()),
        }),
    }
}
