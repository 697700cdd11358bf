//! `replctl resync`: a full resync of a protected volume.

use std::time::Duration;

use replica_control::Command;

use crate::cli::ResyncArgs;
use crate::error::CtlError;

/// Runs `resync`.
pub fn run(a: ResyncArgs) -> Result<(), CtlError> {
    let sock = super::control_socket(&a.daemon)?;
    let r = replica_control::request(&sock, Command::Resync)?;
    println!("{}", r.message.as_deref().unwrap_or_default());
    if a.wait {
        crate::progress::wait_answered_resync(&sock, &r, Duration::from_secs(a.timeout))?;
        println!("resync done: the target applied its end; the replica is consistent");
    }
    Ok(())
}
