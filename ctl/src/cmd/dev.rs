//! `replctl dev`: the development-mode feeder.

use std::time::Duration;

use crate::cli::DevCmd;
use crate::error::CtlError;

/// How long a feed waits for ring space.
const FEED_TIMEOUT: Duration = Duration::from_secs(300);

/// Runs a `dev` command.
pub fn run(cmd: DevCmd) -> Result<(), CtlError> {
    let DevCmd::Feed {
        ring,
        image,
        base,
        ring_mib,
    } = cmd;
    let read = |p: &std::path::Path| std::fs::read(p).map_err(|e| CtlError::io("read", p, e));
    let new = read(&image)?;
    let base = base.as_deref().map(read).transpose()?;
    let mut p = crate::dev::open_or_create(&ring, 4096, ring_mib)?;
    let (records, bytes) = crate::dev::feed(&mut p, base.as_deref(), &new, FEED_TIMEOUT)?;
    println!(
        "captured {records} records ({bytes} bytes of writes) up to sequence {} of generation {}",
        p.next_seq() - 1,
        hex::encode(p.generation())
    );
    Ok(())
}
