//! `replctl failover`: planned (on the source) or unplanned (on the target).

use std::time::{Duration, Instant};

use replica_control::{Command, Request};

use crate::cli::FailoverArgs;
use crate::error::CtlError;

/// How long a failover may take to answer (it waits for the replica).
const FAILOVER_TIMEOUT: Duration = Duration::from_secs(1200);

/// Runs `failover`.
pub fn run(a: FailoverArgs) -> Result<(), CtlError> {
    let sock = super::control_socket(&a.daemon)?;
    let command = if a.planned {
        Command::FailoverPlanned
    } else {
        Command::Failover { point: a.point }
    };
    let req = Request::new(command).for_volume(a.volume.as_deref());
    let started = Instant::now();
    let r = replica_control::send(&sock, &req, FAILOVER_TIMEOUT)?;
    println!("{}", r.message.as_deref().unwrap_or_default());
    println!("failover took {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}
