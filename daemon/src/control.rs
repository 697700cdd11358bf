//! The control socket's server: a Unix stream socket, mode 0600, whose
//! callers are checked with SO_PEERCRED (root or the daemon's own user
//! only), one JSON request per line and one JSON response per line (the
//! protocol's types are [`replica_control`]'s).
//!
//! Also here: the systemd notification protocol (READY, STATUS, WATCHDOG).

use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub use replica_control::{default_path, ResyncTicket, CONTROL_VERSION};
use replica_control::{Command, Envelope, ErrorCode, Response};

use crate::status::StatusBoard;
use crate::DaemonError;

/// A role's commands beyond `status`: given the volume the request names
/// (if any) and the command, `Some(Ok(reply))` done, `Some(Err(e))`
/// refused or failed (the response carries [`CommandFailure::code`]),
/// `None` not a command of this role. Built with [`handler`].
pub type Handler = Arc<
    dyn Fn(Option<&str>, &Command) -> Option<Result<Reply, Box<dyn CommandFailure>>> + Send + Sync,
>;

/// Why a role's command did not do what it was asked: the operator's
/// words (`Display`) and, for programs, the response's code.
pub trait CommandFailure: std::error::Error + Send + Sync {
    /// The code the error response carries ([`ErrorCode::Refused`],
    /// [`ErrorCode::NotFound`] or [`ErrorCode::Failed`]).
    fn code(&self) -> ErrorCode;
}

/// A [`Handler`] from a role's typed handler.
pub fn handler<E>(
    f: impl Fn(Option<&str>, &Command) -> Option<Result<Reply, E>> + Send + Sync + 'static,
) -> Handler
where
    E: CommandFailure + 'static,
{
    Arc::new(move |volume, command| {
        f(volume, command).map(|r| r.map_err(|e| Box::new(e) as Box<dyn CommandFailure>))
    })
}

/// What a command did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// Done: what it did, for the operator.
    Done(String),
    /// A resync was scheduled: what it will do, and which resync to wait
    /// for.
    Resync {
        /// For the operator.
        message: String,
        /// The resync's ticket.
        ticket: ResyncTicket,
    },
    /// `point-list`: the replica backend's snapshots, ascending.
    Points(Vec<u64>),
    /// `point-open`: the device or file that holds the point.
    Opened(PathBuf),
}

impl Reply {
    /// The successful response that says it.
    fn response(self) -> Response {
        let ok = Response::ok();
        match self {
            Reply::Done(message) => Response {
                message: Some(message),
                ..ok
            },
            Reply::Resync { message, ticket } => Response {
                message: Some(message),
                resync: Some(ticket),
                ..ok
            },
            Reply::Points(points) => Response {
                points: Some(points),
                ..ok
            },
            Reply::Opened(path) => Response {
                path: Some(path),
                ..ok
            },
        }
    }
}

/// Serves the control socket until `stop`.
pub fn serve(
    path: &Path,
    board: Arc<StatusBoard>,
    stop: Arc<AtomicBool>,
    handler: Option<Handler>,
) -> Result<JoinHandle<()>, DaemonError> {
    let io = |e| DaemonError::io("control socket", path, e);
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(e)),
    }
    // Bound under a temporary name, restricted, then renamed into place:
    // the socket never appears at `path` with a wider mode.
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".{}.tmp", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let _ = std::fs::remove_file(&tmp);
    let listener = UnixListener::bind(&tmp).map_err(io)?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            io(e)
        })?;
    listener.set_nonblocking(true).map_err(io)?;
    let own_uid = nix::unistd::geteuid().as_raw();
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            let active = Arc::new(std::sync::atomic::AtomicUsize::new(0));
            while !stop.load(Ordering::Acquire) {
                match listener.accept() {
                    Ok((s, _)) => {
                        let b = board.clone();
                        let h = handler.clone();
                        let a = active.clone();
                        a.fetch_add(1, Ordering::AcqRel);
                        let spawned = std::thread::Builder::new()
                            .name("control-conn".into())
                            .spawn(move || {
                                handle(s, &b, h.as_ref(), own_uid);
                                a.fetch_sub(1, Ordering::AcqRel);
                            });
                        if spawned.is_err() {
                            active.fetch_sub(1, Ordering::AcqRel);
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        let mut fds = [nix::poll::PollFd::new(
                            listener.as_fd(),
                            nix::poll::PollFlags::POLLIN,
                        )];
                        let _ = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(200u16));
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "control socket accept failed");
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
            }
            // Let answers being written (a command that stopped the
            // daemon) reach their callers.
            let deadline = Instant::now() + Duration::from_secs(10);
            while active.load(Ordering::Acquire) > 0 && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
        })
        .map_err(io)
}

fn handle(s: UnixStream, board: &StatusBoard, handler: Option<&Handler>, own_uid: u32) {
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = s.set_write_timeout(Some(Duration::from_secs(5)));
    // Commands may take long (a failover waits for the replica); the
    // answer is written when they are done.
    let mut w = match s.try_clone() {
        Ok(w) => w,
        Err(_) => return,
    };
    let uid = nix::sys::socket::getsockopt(&s, nix::sys::socket::sockopt::PeerCredentials)
        .map(|c| c.uid());
    // Read the request line whoever asks, so a refused caller gets the
    // refusal rather than a reset connection.
    let mut line = String::new();
    let read = BufReader::new(&s).take(64 * 1024).read_line(&mut line);
    let resp = match (uid, read) {
        (Ok(uid), _) if uid != 0 && uid != own_uid => {
            tracing::warn!(uid, "control socket: refused caller");
            Response::error(
                ErrorCode::PermissionDenied,
                format!(
                    "permission denied: uid {uid} is not allowed (root or the daemon's user only)"
                ),
            )
        }
        (Ok(_), Ok(_)) => respond(&line, board, handler),
        (Ok(_), Err(e)) => {
            Response::error(ErrorCode::MalformedRequest, format!("reading request: {e}"))
        }
        (Err(e), _) => Response::error(
            ErrorCode::PermissionDenied,
            format!("cannot identify caller: {e}"),
        ),
    };
    let mut out = serde_json::to_vec(&resp).unwrap_or_default();
    out.push(b'\n');
    let _ = w.write_all(&out);
}

use std::io::Read as _;

fn respond(line: &str, board: &StatusBoard, handler: Option<&Handler>) -> Response {
    // The version first: a peer of another version is told so, whatever
    // else its request holds.
    let env: Envelope = match serde_json::from_str(line.trim()) {
        Ok(e) => e,
        Err(e) => {
            return Response::error(
                ErrorCode::MalformedRequest,
                format!("malformed request: {e}"),
            )
        }
    };
    if env.version != CONTROL_VERSION {
        return Response::error(
            ErrorCode::UnsupportedVersion,
            format!(
                "control protocol version {} not supported (this daemon speaks {CONTROL_VERSION})",
                env.version
            ),
        );
    }
    let req: replica_control::Request = match serde_json::from_str(line.trim()) {
        Ok(r) => r,
        Err(e) => {
            return match env.command {
                Some(c) if !Command::is_name(&c) => {
                    Response::error(ErrorCode::UnknownCommand, format!("unknown command {c:?}"))
                }
                _ => Response::error(
                    ErrorCode::MalformedRequest,
                    format!("malformed request: {e}"),
                ),
            }
        }
    };
    let one = match &req.volume {
        Some(v) => match board.get(v) {
            Some(s) => Some(s),
            None => return Response::error(ErrorCode::NotFound, format!("no volume {v:?} here")),
        },
        None => None,
    };
    if req.command == Command::Status {
        return Response {
            status: Some(one.map_or_else(|| board.all(), |s| vec![s])),
            ..Response::ok()
        };
    }
    match handler.and_then(|h| h(req.volume.as_deref(), &req.command)) {
        Some(Ok(reply)) => reply.response(),
        Some(Err(e)) => Response::error(e.code(), e.to_string()),
        None => Response::error(
            ErrorCode::UnknownCommand,
            format!(
                "unknown command {:?}: not a command of this daemon's role",
                req.command.name()
            ),
        ),
    }
}

/// systemd notifications (no-ops when not started by systemd).
pub struct Notifier {
    watchdog: Option<Duration>,
    last: Instant,
}

impl Notifier {
    /// Reads the watchdog interval systemd asked for, if any.
    pub fn new() -> Self {
        let watchdog = sd_notify::watchdog_enabled().map(|d| d / 2);
        Self {
            watchdog,
            last: Instant::now(),
        }
    }

    /// The daemon can serve.
    pub fn ready(&self, status: &str) {
        let _ = sd_notify::notify(&[
            sd_notify::NotifyState::Ready,
            sd_notify::NotifyState::Status(status),
        ]);
    }

    /// Updates the status line systemd shows.
    pub fn status(&self, status: &str) {
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Status(status)]);
    }

    /// Called from a main loop: pings the watchdog when due, so a hung loop
    /// gets the daemon restarted.
    pub fn tick(&mut self) {
        if let Some(every) = self.watchdog {
            if self.last.elapsed() >= every {
                let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
                self.last = Instant::now();
            }
        }
    }

    /// The daemon is stopping.
    pub fn stopping(&self) {
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    }
}

impl Default for Notifier {
    fn default() -> Self {
        Self::new()
    }
}
