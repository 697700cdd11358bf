//! `replctl status` and `replctl wait`.

use std::time::Duration;

use replica_control::status::{Role, VolumeStatus};
use replica_control::{Command, ControlError};

use crate::cli::{DaemonArgs, StatusArgs, WaitArgs};
use crate::error::CtlError;

/// Runs `status`.
pub fn run(a: StatusArgs) -> Result<(), CtlError> {
    let vols = volumes(&a.daemon)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&vols)?);
    } else {
        print_table(&vols);
    }
    Ok(())
}

/// Runs `wait`.
pub fn wait(a: WaitArgs) -> Result<(), CtlError> {
    let v = crate::wait::wait_applied(
        &a.state_dir,
        &a.volume,
        a.applied,
        &a.generation,
        Duration::from_secs(a.timeout),
    )?;
    println!(
        "volume {}: applied up to {} of generation {}",
        a.volume, v.applied_seq, v.generation
    );
    Ok(())
}

/// Whether `e` means nobody answers (rather than an answer, or a refusal
/// of this caller, which must not be hidden by a stale file).
fn not_answering(e: &ControlError) -> bool {
    match e {
        ControlError::NotRunning { .. } => true,
        ControlError::Io { source, .. } => source.kind() != std::io::ErrorKind::PermissionDenied,
        ControlError::Malformed { .. } | ControlError::Daemon { .. } => false,
    }
}

/// The daemon's answer; with only a state directory and a daemon that
/// does not answer, the status it last published there.
fn volumes(d: &DaemonArgs) -> Result<Vec<VolumeStatus>, CtlError> {
    let sock = super::control_socket(d)?;
    match (
        replica_control::request(&sock, Command::Status),
        &d.state_dir,
    ) {
        (Ok(r), _) => Ok(r.status.unwrap_or_default()),
        (Err(e), Some(dir)) if d.socket.is_none() && not_answering(&e) => {
            eprintln!(
                "replctl: daemon not answering; last published status from {}",
                dir.display()
            );
            replica_control::status::read(dir).map_err(|source| CtlError::NoStatus {
                dir: dir.clone(),
                daemon: e,
                source,
            })
        }
        (Err(e), _) => Err(e.into()),
    }
}

fn print_table(vols: &[VolumeStatus]) {
    println!(
        "{:<16} {:<9} {:<10} {:<12} {:<8} {:>12} {:>12} {:>16} {:>10} {:>12}  reasons",
        "VOLUME",
        "ROLE",
        "CONN",
        "REPLICA",
        "HEALTH",
        "DURABLE",
        "APPLIED",
        "LAG",
        "SPOOL",
        "LAST POINT"
    );
    for v in vols {
        // Lag and spool are the source's (records not yet durable on the
        // target, the age of the oldest, the bytes held for them);
        // recovery points the target's.
        let (lag, spool, point) = if v.role == Role::Primary {
            (
                format!("{} rec/{:.1}s", v.lag_records, v.lag_seconds),
                crate::progress::human_bytes(v.spool_bytes),
                "-".to_owned(),
            )
        } else {
            let point = if v.points == 0 {
                "none".to_owned()
            } else {
                v.last_point_seq.to_string()
            };
            ("-".to_owned(), "-".to_owned(), point)
        };
        println!(
            "{:<16} {:<9} {:<10} {:<12} {:<8} {:>12} {:>12} {:>16} {:>10} {:>12}  {}",
            v.volume,
            format!("{:?}", v.role),
            format!("{:?}", v.connection),
            v.replica,
            format!("{:?}", v.health),
            v.durable_seq,
            v.applied_seq,
            lag,
            spool,
            point,
            v.reasons_text()
        );
    }
    for v in vols {
        if let Some(p) = v.resync_progress.as_ref() {
            let what = if p.verify { "verify" } else { "resync" };
            let running = if p.verify {
                v.last_verify.is_none() || p.remaining_chunks > 0
            } else {
                v.resync_running
            };
            if running {
                println!(
                    "{}: {what} {} of {} chunks left: {}",
                    v.volume,
                    p.remaining_chunks,
                    p.total_chunks,
                    crate::progress::progress_line(p)
                );
            }
        }
        if let Some(r) = &v.last_verify {
            println!("{}: last verify: {}", v.volume, crate::verify::summary(r));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_are_shown_in_binary_units() {
        use crate::progress::human_bytes;
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(5 << 30), "5.0 GiB");
        assert_eq!(human_bytes(u64::MAX), "16777216.0 TiB");
    }

    #[test]
    fn only_a_daemon_that_does_not_answer_falls_back_to_the_file() {
        let path = std::path::PathBuf::from("/run/x.sock");
        let io = |kind: std::io::ErrorKind| ControlError::Io {
            path: path.clone(),
            source: kind.into(),
        };
        assert!(not_answering(&ControlError::NotRunning {
            path: path.clone(),
            source: std::io::ErrorKind::NotFound.into(),
        }));
        assert!(not_answering(&io(std::io::ErrorKind::TimedOut)));
        assert!(!not_answering(&io(std::io::ErrorKind::PermissionDenied)));
        assert!(!not_answering(&ControlError::Daemon {
            code: replica_control::ErrorCode::PermissionDenied,
            message: "uid 65534 is not allowed".into(),
        }));
    }
}
