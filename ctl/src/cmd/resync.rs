//! `replctl resync`: a checksum resync (or with `--full`, a resend) of the
//! whole protected volume.

use std::time::Duration;

use replica_control::Command;

use crate::cli::ResyncArgs;
use crate::error::CtlError;

/// Runs `resync`.
pub fn run(a: ResyncArgs) -> Result<(), CtlError> {
    let sock = super::control_socket(&a.daemon)?;
    let r = replica_control::request(&sock, Command::Resync { full: a.full })?;
    println!("{}", r.message.as_deref().unwrap_or_default());
    if a.wait {
        crate::progress::wait_answered_resync(&sock, &r, Duration::from_secs(a.timeout))?;
        let st = replica_control::request(&sock, Command::Status)?;
        let summary = st
            .status
            .unwrap_or_default()
            .first()
            .and_then(|v| v.resync_progress.clone())
            .map(|p| format!(" ({})", crate::progress::progress_line(&p)))
            .unwrap_or_default();
        println!("resync done: the target applied its end; the replica is consistent{summary}");
    }
    Ok(())
}
