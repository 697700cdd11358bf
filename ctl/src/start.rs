//! Starting the source daemon `replctl protect` set up, and watching it
//! until it answers on its control socket: a background process
//! (`--spawn`) or a systemd unit. A daemon that stops before it answers is
//! reported at once, with its exit status and the end of its log (or its
//! unit's state and journal).

use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::time::{Duration, Instant};

use replica_control::ControlError;

use crate::error::Exit;

/// Why the source daemon did not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A program cannot be run.
    #[error("start {}: {source}", program.display())]
    Run {
        /// The program.
        program: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The log file cannot be created.
    #[error("{}: {source}", path.display())]
    Log {
        /// The log or state directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// `systemctl enable --now` failed.
    #[error("systemctl enable --now {unit} failed{report}")]
    Enable {
        /// The unit.
        unit: String,
        /// Its state and journal.
        report: String,
    },
    /// The spawned daemon exited before it answered.
    #[error("replicad source exited ({status}) before it answered on {}; the end of its log {}:\n{tail}", socket.display(), log.display())]
    Exited {
        /// How it exited.
        status: ExitStatus,
        /// The control socket.
        socket: PathBuf,
        /// Its log.
        log: PathBuf,
        /// The end of the log.
        tail: String,
    },
    /// The unit stopped before the daemon answered.
    #[error("replicad source stopped before it answered on {}{report}", socket.display())]
    UnitStopped {
        /// The control socket.
        socket: PathBuf,
        /// The unit's state and journal.
        report: String,
    },
    /// The daemon did not answer in time.
    #[error("replicad source did not answer on {} within {} s ({last}){detail}", socket.display(), timeout.as_secs())]
    NoAnswer {
        /// The control socket.
        socket: PathBuf,
        /// How long it was waited for.
        timeout: Duration,
        /// The last error asking it.
        last: ControlError,
        /// The end of its log, or its unit's state and journal.
        detail: String,
    },
}

impl StartError {
    /// The exit code.
    pub fn exit(&self) -> Exit {
        match self {
            Self::Run { source, .. } | Self::Log { source, .. } => Exit::of_io(source),
            _ => Exit::Failed,
        }
    }
}

/// A source daemon `replctl protect` started, watched until it answers.
#[derive(Debug)]
pub enum Started {
    /// A background process (`--spawn`), its stderr in `log`.
    Spawned {
        /// The daemon.
        child: std::process::Child,
        /// Its log.
        log: PathBuf,
    },
    /// A systemd unit.
    Unit(String),
}

/// Starts `<exe> source --config <cfg>` in the background, its stderr in
/// `<state_dir>/replicad.log`.
pub fn spawn_source(exe: &Path, cfg: &Path, state_dir: &Path) -> Result<Started, StartError> {
    let log_error = |path: &Path| {
        let path = path.to_owned();
        move |source| StartError::Log { path, source }
    };
    std::fs::create_dir_all(state_dir).map_err(log_error(state_dir))?;
    let log = state_dir.join("replicad.log");
    let err = std::fs::File::create(&log).map_err(log_error(&log))?;
    let child = Command::new(exe)
        .args(["source", "--config"])
        .arg(cfg)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(err)
        .spawn()
        .map_err(|source| StartError::Run {
            program: exe.to_owned(),
            source,
        })?;
    Ok(Started::Spawned { child, log })
}

/// `systemctl enable --now <unit>`; if the unit does not start, its state
/// and journal say why.
pub fn start_unit(unit: &str) -> Result<Started, StartError> {
    let ok = Command::new("systemctl")
        .args(["enable", "--now", unit])
        .status()
        .map_err(|source| StartError::Run {
            program: "systemctl".into(),
            source,
        })?
        .success();
    if !ok {
        return Err(StartError::Enable {
            unit: unit.to_owned(),
            report: unit_report(unit),
        });
    }
    Ok(Started::Unit(unit.to_owned()))
}

/// The last `n` lines of `path` (or why it cannot be read).
pub fn log_tail(path: &Path, n: usize) -> String {
    match std::fs::read(path) {
        Ok(b) => {
            let text = String::from_utf8_lossy(&b);
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(n)..].join("\n")
        }
        Err(e) => format!("({}: {e})", path.display()),
    }
}

/// Whether a unit's `systemctl show` properties say it is not running
/// (failed, stopped, or waiting to be restarted after a failure); the state
/// as text if so.
pub fn unit_stopped(show: &str) -> Option<String> {
    let get = |k: &str| {
        show.lines()
            .find_map(|l| l.strip_prefix(k).and_then(|v| v.strip_prefix('=')))
            .unwrap_or("")
    };
    let (active, sub) = (get("ActiveState"), get("SubState"));
    (active == "failed" || active == "inactive" || sub == "auto-restart").then(|| {
        format!(
            "{active} ({sub}), result {}, exit status {}",
            get("Result"),
            get("ExecMainStatus")
        )
    })
}

fn unit_show(unit: &str) -> String {
    Command::new("systemctl")
        .args([
            "show",
            unit,
            "--property=ActiveState,SubState,Result,ExecMainStatus",
        ])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// The unit's state and the tail of its journal, for an error message.
fn unit_report(unit: &str) -> String {
    let state = unit_stopped(&unit_show(unit)).unwrap_or_else(|| "running".into());
    let journal = Command::new("journalctl")
        .args(["-u", unit, "-n", "20", "--no-pager", "-o", "cat"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_else(|e| format!("(journalctl: {e})"));
    format!(
        ": {unit} is {state}; the end of its journal (journalctl -u {unit}):\n{}",
        journal.trim_end()
    )
}

/// Waits up to `timeout` until the daemon `started` answers on `socket`;
/// fails at once, with its exit status and the end of its log (or its
/// unit's state and journal), if it stops before.
pub fn wait_started(
    socket: &Path,
    started: &mut Started,
    timeout: Duration,
) -> Result<(), StartError> {
    let deadline = Instant::now() + timeout;
    loop {
        let last = match replica_control::request(socket, replica_control::Command::Status) {
            Ok(_) => return Ok(()),
            Err(e) => e,
        };
        match started {
            Started::Spawned { child, log } => {
                let exited = child.try_wait().map_err(|source| StartError::Run {
                    program: "replicad source".into(),
                    source,
                })?;
                if let Some(status) = exited {
                    return Err(StartError::Exited {
                        status,
                        socket: socket.to_owned(),
                        log: log.clone(),
                        tail: log_tail(log, 20),
                    });
                }
            }
            Started::Unit(unit) => {
                if unit_stopped(&unit_show(unit)).is_some() {
                    return Err(StartError::UnitStopped {
                        socket: socket.to_owned(),
                        report: unit_report(unit),
                    });
                }
            }
        }
        if Instant::now() > deadline {
            let detail = match started {
                Started::Spawned { log, .. } => {
                    format!(
                        "; the end of its log {}:\n{}",
                        log.display(),
                        log_tail(log, 20)
                    )
                }
                Started::Unit(unit) => unit_report(unit),
            };
            return Err(StartError::NoAnswer {
                socket: socket.to_owned(),
                timeout,
                last,
                detail,
            });
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_unit_that_failed_or_waits_for_a_restart_is_stopped() {
        let show = |a: &str, s: &str| {
            format!("ActiveState={a}\nSubState={s}\nResult=exit-code\nExecMainStatus=2\n")
        };
        assert_eq!(unit_stopped(&show("active", "running")), None);
        assert_eq!(unit_stopped(&show("activating", "start")), None);
        assert_eq!(
            unit_stopped(&show("failed", "failed")).as_deref(),
            Some("failed (failed), result exit-code, exit status 2")
        );
        assert!(unit_stopped(&show("activating", "auto-restart")).is_some());
        assert!(unit_stopped(&show("inactive", "dead")).is_some());
    }
}
