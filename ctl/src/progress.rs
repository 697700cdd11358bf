//! Progress of long operations, read from a daemon's control socket.

use std::path::Path;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

/// Waits until the source behind `socket` no longer needs a resync, showing
/// the regions sent so far (a bar on a terminal, nothing otherwise).
pub fn wait_resync(socket: &Path, timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template(
            "{msg:>12} [{bar:40}] {pos}/{len} regions ({percent}%) eta {eta}",
        )
        .map_err(|e| e.to_string())?
        .progress_chars("=> "),
    );
    bar.set_message("resync");
    // Without a terminal (logs, a serial console captured by a script) the
    // bar is hidden: say the progress in plain lines, every 10%.
    let plain = bar.is_hidden();
    let mut said = u64::MAX;
    loop {
        let r = replicad::control::request(socket, "status")?;
        let vols = r.status.unwrap_or_default();
        let v = vols.first().ok_or("the daemon reports no volume")?;
        if v.health == replicad::status::Health::Critical {
            bar.abandon();
            return Err(format!(
                "{} is Critical: {}",
                v.volume,
                v.reasons.join("; ")
            ));
        }
        // Done once the target applied the resync's END: the replica is
        // consistent there.
        if !v.needs_resync && v.applied_seq >= v.resync_end_seq {
            bar.finish_with_message("done");
            return Ok(());
        }
        let total = v.resync_total_regions.max(v.dirty_regions);
        bar.set_length(total);
        bar.set_position(total - v.dirty_regions);
        let tenth = ((total - v.dirty_regions) * 10)
            .checked_div(total)
            .unwrap_or(0);
        if plain && v.resync_running && tenth != said {
            println!(
                "resync: {} of {total} regions sent ({}%)",
                total - v.dirty_regions,
                tenth * 10
            );
            said = tenth;
        }
        bar.set_message(if v.resync_running {
            "resync"
        } else {
            "waiting"
        });
        if Instant::now() >= deadline {
            bar.abandon();
            return Err(format!(
                "resync of {} not finished after {timeout:?}: {}",
                v.volume,
                v.reasons.join("; ")
            ));
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}
