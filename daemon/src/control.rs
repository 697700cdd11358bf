//! The control socket: a Unix stream socket, mode 0600, whose callers are
//! checked with SO_PEERCRED (root or the daemon's own user only). One JSON
//! request per line, one JSON response per line:
//!
//! ```text
//! -> {"version":1,"command":"status"}
//! <- {"version":1,"ok":true,"status":[{...per volume...}]}
//! <- {"version":1,"ok":false,"error":"..."}
//! ```
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

use serde::{Deserialize, Serialize};

use crate::status::{StatusBoard, VolumeStatus};
use crate::DaemonError;

/// Version of the control protocol.
pub const CONTROL_VERSION: u32 = 1;

/// A request.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    /// Protocol version.
    pub version: u32,
    /// `status`, or a command of the daemon's role (source: `resync`).
    pub command: String,
    /// The volume a command is about (default: the daemon's only one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume: Option<String>,
    /// For `failover`: `latest` or a recovery point's record sequence.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub point: Option<String>,
}

/// A role's commands beyond `status`: `Some(Ok(reply))` done,
/// `Some(Err(why))` refused, `None` not a command of this role.
pub type Handler = Arc<dyn Fn(&Request) -> Option<Result<Reply, String>> + Send + Sync>;

/// What a command did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// For the operator.
    pub message: String,
    /// For `resync`: which resync to wait for.
    pub resync: Option<ResyncTicket>,
}

impl From<String> for Reply {
    fn from(message: String) -> Self {
        Self {
            message,
            resync: None,
        }
    }
}

/// Names the resync a `resync` command started: it is done when the
/// source, still on ring generation `generation`, reports a resync END at
/// or after `from_seq` that the target has applied.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResyncTicket {
    /// The capture ring generation, hex.
    pub generation: String,
    /// The ring position the request was taken at.
    pub from_seq: u64,
}

/// A response.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Response {
    /// Protocol version.
    pub version: u32,
    /// Success.
    pub ok: bool,
    /// Per-volume status (for `status`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<Vec<VolumeStatus>>,
    /// What a command did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Error text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// For `resync`: the resync it started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resync: Option<ResyncTicket>,
}

impl Response {
    fn err(m: impl Into<String>) -> Self {
        Self {
            version: CONTROL_VERSION,
            ok: false,
            status: None,
            message: None,
            error: Some(m.into()),
            resync: None,
        }
    }
}

/// The default socket path for a state directory.
pub fn default_path(state_dir: &Path) -> PathBuf {
    state_dir.join("replicad.sock")
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
            Response::err(format!(
                "permission denied: uid {uid} is not allowed (root or the daemon's user only)"
            ))
        }
        (Ok(_), Ok(_)) => respond(&line, board, handler),
        (Ok(_), Err(e)) => Response::err(format!("reading request: {e}")),
        (Err(e), _) => Response::err(format!("cannot identify caller: {e}")),
    };
    let mut out = serde_json::to_vec(&resp).unwrap_or_default();
    out.push(b'\n');
    let _ = w.write_all(&out);
}

use std::io::Read as _;

fn respond(line: &str, board: &StatusBoard, handler: Option<&Handler>) -> Response {
    let req: Request = match serde_json::from_str(line.trim()) {
        Ok(r) => r,
        Err(e) => return Response::err(format!("malformed request: {e}")),
    };
    if req.version != CONTROL_VERSION {
        return Response::err(format!(
            "control protocol version {} not supported (this daemon speaks {CONTROL_VERSION})",
            req.version
        ));
    }
    match req.command.as_str() {
        "status" => Response {
            version: CONTROL_VERSION,
            ok: true,
            status: Some(board.all()),
            message: None,
            error: None,
            resync: None,
        },
        other => match handler.and_then(|h| h(&req)) {
            Some(Ok(m)) => Response {
                version: CONTROL_VERSION,
                ok: true,
                status: None,
                message: Some(m.message),
                error: None,
                resync: m.resync,
            },
            Some(Err(e)) => Response::err(e),
            None => Response::err(format!("unknown command {other:?}")),
        },
    }
}

/// Sends one request to a daemon's control socket.
pub fn request(path: &Path, command: &str) -> Result<Response, String> {
    request_for(path, command, None)
}

/// Sends one request about `volume` to a daemon's control socket.
pub fn request_for(path: &Path, command: &str, volume: Option<&str>) -> Result<Response, String> {
    send(
        path,
        &Request {
            version: CONTROL_VERSION,
            command: command.to_owned(),
            volume: volume.map(str::to_owned),
            point: None,
        },
        Duration::from_secs(10),
    )
}

/// Sends a request and waits up to `timeout` for the answer (long
/// operations such as a failover answer when they are done).
pub fn send(path: &Path, req: &Request, timeout: Duration) -> Result<Response, String> {
    let mut s = UnixStream::connect(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let _ = s.set_read_timeout(Some(timeout));
    let mut b = serde_json::to_vec(req).map_err(|e| e.to_string())?;
    b.push(b'\n');
    s.write_all(&b)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let mut line = String::new();
    BufReader::new(&s)
        .read_line(&mut line)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let r: Response =
        serde_json::from_str(&line).map_err(|e| format!("malformed response: {e}"))?;
    if r.ok {
        Ok(r)
    } else {
        Err(r.error.unwrap_or_else(|| "request failed".into()))
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
