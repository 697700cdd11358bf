//! Progress of long operations, read from a daemon's control socket.

use std::path::Path;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use replica_control::status::{ChunkProgress, Health, VolumeStatus};
use replica_control::{Command, ControlError, Response, ResyncTicket};

use crate::error::Exit;

/// Why a resync was not seen through.
#[derive(Debug, thiserror::Error)]
pub enum ResyncWaitError {
    /// Asking the daemon failed.
    #[error(transparent)]
    Control(#[from] ControlError),
    /// The daemon reports no volume.
    #[error("the daemon reports no volume")]
    NoVolume,
    /// The answer to the command names no resync.
    #[error("the daemon did not say which resync it started (an older replicad?)")]
    NoTicket,
    /// The volume went Critical.
    #[error("{volume} is Critical: {reasons}")]
    Critical {
        /// Volume id.
        volume: String,
        /// Its reasons.
        reasons: String,
    },
    /// The capture ring changed: this resync's end will never come.
    #[error("{volume}: the capture ring changed (generation {now} instead of {was}) while waiting: this resync's end will never come; the source resyncs the new ring by itself, see `replctl status`")]
    RingChanged {
        /// Volume id.
        volume: String,
        /// The generation now.
        now: String,
        /// The ticket's.
        was: String,
    },
    /// The deadline passed.
    #[error("resync of {volume} not finished after {timeout:?}: {reasons}")]
    Timeout {
        /// Volume id.
        volume: String,
        /// How long it waited.
        timeout: Duration,
        /// The volume's reasons then.
        reasons: String,
    },
}

impl ResyncWaitError {
    /// The exit code.
    pub fn exit(&self) -> Exit {
        match self {
            Self::Control(e) => Exit::of_control(e),
            Self::Critical { .. } => Exit::Critical,
            Self::NoVolume | Self::NoTicket | Self::RingChanged { .. } | Self::Timeout { .. } => {
                Exit::Failed
            }
        }
    }
}

/// The progress bar's template.
const BAR: &str = "[{bar:30}] {pos}/{len} chunks ({percent}%) {msg}";

/// Bytes for a human: B, KiB, MiB, GiB, TiB with one decimal.
pub fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// Seconds as `1h2m3s`.
pub fn duration(secs: f64) -> String {
    let s = secs.max(0.0).round() as u64;
    match (s / 3600, s / 60 % 60, s % 60) {
        (0, 0, s) => format!("{s}s"),
        (0, m, s) => format!("{m}m{s:02}s"),
        (h, m, s) => format!("{h}h{m:02}m{s:02}s"),
    }
}

/// One line of a resync's or verify's progress: what was compared, found
/// different and sent, the rate and the time left.
pub fn progress_line(p: &ChunkProgress) -> String {
    let mut s = format!(
        "{} compared, {} differing, {} sent ({})",
        p.compared_chunks,
        p.differing_chunks,
        p.sent_chunks,
        human_bytes(p.sent_bytes)
    );
    if p.zero_chunks > 0 {
        s.push_str(&format!(", {} zero on both sides", p.zero_chunks));
    }
    if p.done_before > 0 {
        s.push_str(&format!(", {} proven before a restart", p.done_before));
    }
    if p.rehashed_chunks > 0 {
        s.push_str(&format!(", {} compared again", p.rehashed_chunks));
    }
    s.push_str(&format!(", {}/s", human_bytes(p.bytes_per_second as u64)));
    if let Some(eta) = p.eta_seconds.filter(|_| p.remaining_chunks > 0) {
        s.push_str(&format!(", eta {}", duration(eta)));
    }
    s
}

/// Waits until the target has applied the END of the resync named by
/// `ticket` (the answer to the `resync` command that started it), showing
/// the regions sent so far (a bar on a terminal, plain lines otherwise).
///
/// Done means: the source is still on the ticket's ring generation, needs
/// no resync, its last resync END comes at or after the ticket's position
/// (so it is this resync's or a later one's, never an earlier one's), and
/// the target acknowledged it as applied.
pub fn wait_resync(
    socket: &Path,
    ticket: &ResyncTicket,
    timeout: Duration,
) -> Result<(), ResyncWaitError> {
    let deadline = Instant::now() + timeout;
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template(BAR)
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_message("resync");
    // Without a terminal (logs, a serial console captured by a script) the
    // bar is hidden: say the progress in plain lines, every 10%.
    let plain = bar.is_hidden();
    let mut said = u64::MAX;
    loop {
        let r = replica_control::request(socket, Command::Status)?;
        let vols = r.status.unwrap_or_default();
        let v = vols.first().ok_or(ResyncWaitError::NoVolume)?;
        if v.health == Health::Critical {
            bar.abandon();
            return Err(ResyncWaitError::Critical {
                volume: v.volume.clone(),
                reasons: v.reasons_text(),
            });
        }
        if v.generation != ticket.generation {
            bar.abandon();
            return Err(ResyncWaitError::RingChanged {
                volume: v.volume.clone(),
                now: v.generation.clone(),
                was: ticket.generation.clone(),
            });
        }
        if resync_done(v, ticket) {
            bar.finish_with_message("done");
            return Ok(());
        }
        match v
            .resync_progress
            .as_ref()
            .filter(|p| !p.verify && v.resync_running)
        {
            Some(p) => {
                let (done, total) = p.proven();
                bar.set_length(total);
                bar.set_position(done);
                let line = progress_line(p);
                let tenth = p.tenths();
                if plain && tenth != said {
                    println!(
                        "resync: {done} of {total} chunks proven ({}%): {line}",
                        tenth * 10
                    );
                    said = tenth;
                }
                bar.set_message(line);
            }
            None if v.needs_resync => bar.set_message("waiting for the resync to start"),
            None => bar.set_message("waiting for the target to apply the resync's end"),
        }
        if Instant::now() >= deadline {
            bar.abandon();
            return Err(ResyncWaitError::Timeout {
                volume: v.volume.clone(),
                timeout,
                reasons: v.reasons_text(),
            });
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Waits for the resync a `resync` or `initial-copy` command's answer `r`
/// names (see [`wait_resync`]).
pub fn wait_answered_resync(
    socket: &Path,
    r: &Response,
    timeout: Duration,
) -> Result<(), ResyncWaitError> {
    let ticket = r.resync.as_ref().ok_or(ResyncWaitError::NoTicket)?;
    wait_resync(socket, ticket, timeout)
}

/// Whether status `v` shows the resync of `ticket` applied on the target.
pub fn resync_done(v: &VolumeStatus, ticket: &ResyncTicket) -> bool {
    v.generation == ticket.generation
        && !v.needs_resync
        && v.resync_end_seq >= ticket.from_seq
        && v.applied_seq >= v.resync_end_seq
        && !v.target_inconsistent
}

#[cfg(test)]
mod tests {
    use super::*;
    use replica_control::status::Role;

    #[test]
    fn the_bar_template_is_valid() {
        assert!(ProgressStyle::with_template(BAR).is_ok());
    }

    fn ticket() -> ResyncTicket {
        ResyncTicket {
            generation: "aa".into(),
            from_seq: 100,
        }
    }

    #[test]
    fn a_resync_is_done_only_when_its_own_end_is_applied() {
        let mut v = VolumeStatus::new("v", Role::Secondary);
        v.generation = "aa".into();
        // Before the drain took the request the status looks idle and
        // "applied >= last END" (0): not done.
        v.applied_seq = 50;
        assert!(!resync_done(&v, &ticket()));
        // An earlier resync's END, applied: not this one.
        v.resync_end_seq = 90;
        v.applied_seq = 95;
        assert!(!resync_done(&v, &ticket()));
        // Running.
        v.needs_resync = true;
        v.resync_end_seq = 90;
        assert!(!resync_done(&v, &ticket()));
        // Its END is spooled but the target has not applied it.
        v.needs_resync = false;
        v.resync_end_seq = 180;
        v.applied_seq = 170;
        assert!(!resync_done(&v, &ticket()));
        // Applied, but the target says its replica is still inconsistent
        // (it needs a full resync this one was not): not done.
        v.applied_seq = 180;
        v.target_inconsistent = true;
        assert!(!resync_done(&v, &ticket()));
        // Applied, and the target says consistent.
        v.target_inconsistent = false;
        assert!(resync_done(&v, &ticket()));
        // Another ring generation with the same numbers: not done.
        v.generation = "bb".into();
        assert!(!resync_done(&v, &ticket()));
    }
}
