//! `replctl verify`: an online verify of a protected volume.

use std::time::Duration;

use replica_control::Command;

use crate::cli::VerifyArgs;
use crate::error::CtlError;

/// Runs `verify`.
pub fn run(a: VerifyArgs) -> Result<(), CtlError> {
    let sock = super::control_socket(&a.daemon)?;
    // The daemon stamps its report from the same clock.
    let since = replica_ring::now_ns();
    let r = replica_control::request(
        &sock,
        Command::Verify {
            resync: a.resync,
            max_rate: a.max_rate_mib.map(|m| m.saturating_mul(1 << 20)),
        },
    )?;
    println!("{}", r.message.as_deref().unwrap_or_default());
    if a.wait {
        let report = crate::verify::wait_verify(&sock, since, Duration::from_secs(a.timeout))?;
        println!("verify done: {}", crate::verify::summary(&report));
    }
    Ok(())
}
