//! `replctl verify`: waiting for an online verify's report and saying it.

use std::path::Path;
use std::time::{Duration, Instant};

use replica_control::status::{Health, VerifyReport, VolumeStatus};
use replica_control::{Command, ControlError};

use crate::error::Exit;

/// Why a verify did not end with a report of an identical (or repaired)
/// replica.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// Asking the daemon failed.
    #[error(transparent)]
    Control(#[from] ControlError),
    /// The daemon reports no volume.
    #[error("the daemon reports no volume")]
    NoVolume,
    /// The volume went Critical.
    #[error("{volume} is Critical: {reasons}")]
    Critical {
        /// Volume id.
        volume: String,
        /// Its reasons.
        reasons: String,
    },
    /// It could not finish.
    #[error("verify of {volume} abandoned: {why}")]
    Abandoned {
        /// Volume id.
        volume: String,
        /// Why.
        why: String,
    },
    /// The replica differs and was not repaired.
    #[error("{volume}: the replica differs from the source in {count} chunks; `replctl verify --resync` (or `replctl resync`) sends them")]
    Differs {
        /// Volume id.
        volume: String,
        /// Chunks.
        count: u64,
    },
    /// The deadline passed.
    #[error("verify of {volume} not finished after {timeout:?}")]
    Timeout {
        /// Volume id.
        volume: String,
        /// How long it waited.
        timeout: Duration,
    },
}

impl VerifyError {
    /// The exit code.
    pub fn exit(&self) -> Exit {
        match self {
            Self::Control(e) => Exit::of_control(e),
            Self::Critical { .. } => Exit::Critical,
            Self::NoVolume
            | Self::Abandoned { .. }
            | Self::Differs { .. }
            | Self::Timeout { .. } => Exit::Failed,
        }
    }
}

/// One line about a verify's result.
pub fn summary(r: &VerifyReport) -> String {
    let secs = r.finished_ns.saturating_sub(r.started_ns) as f64 / 1e9;
    let mut s = format!(
        "{} of {} chunks of {} compared in {}",
        r.compared_chunks,
        r.chunks,
        crate::progress::human_bytes(r.chunk_bytes),
        crate::progress::duration(secs)
    );
    match (&r.abandoned, r.differing_chunks) {
        (Some(why), _) => s.push_str(&format!("; abandoned: {why}")),
        (None, 0) => s.push_str("; identical"),
        (None, n) => {
            s.push_str(&format!("; {n} differing"));
            let shown: Vec<String> = r
                .differing_offsets
                .iter()
                .take(8)
                .map(|o| format!("{o:#x}"))
                .collect();
            s.push_str(&format!(" at byte offsets {}", shown.join(", ")));
            if r.differing_offsets.len() > 8 {
                s.push_str(", ...");
            }
            if r.resynced {
                s.push_str(" (resent)");
            }
        }
    }
    if r.busy_chunks > 0 {
        s.push_str(&format!(
            "; {} chunks not verified (the application kept writing them)",
            r.busy_chunks
        ));
    }
    s
}

/// The report of the verify started at or after `since_ns`, once there is
/// one and (a repairing verify) the target applied its repairs.
fn finished(v: &VolumeStatus, since_ns: u64) -> Option<&VerifyReport> {
    let r = v
        .last_verify
        .as_ref()
        .filter(|r| r.started_ns >= since_ns)?;
    // Repairs are in the replica once the target applied them and no
    // resync (which may have dropped them from the spool to resend them)
    // is needed or running.
    let repaired = r.repair_seq == 0
        || r.abandoned.is_some()
        || (v.generation == r.generation
            && v.applied_seq >= r.repair_seq
            && !v.needs_resync
            && !v.target_inconsistent);
    repaired.then_some(r)
}

/// Waits for the report of the verify started at or after `since_ns`,
/// showing its progress; the report once the replica is known identical or
/// repaired.
pub fn wait_verify(
    socket: &Path,
    since_ns: u64,
    timeout: Duration,
) -> Result<VerifyReport, VerifyError> {
    let deadline = Instant::now() + timeout;
    let mut said = u64::MAX;
    loop {
        let r = replica_control::request(socket, Command::Status)?;
        let vols = r.status.unwrap_or_default();
        let v = vols.first().ok_or(VerifyError::NoVolume)?;
        if v.health == Health::Critical {
            return Err(VerifyError::Critical {
                volume: v.volume.clone(),
                reasons: v.reasons_text(),
            });
        }
        if let Some(r) = finished(v, since_ns) {
            if let Some(why) = &r.abandoned {
                return Err(VerifyError::Abandoned {
                    volume: v.volume.clone(),
                    why: why.clone(),
                });
            }
            if r.differing_chunks > 0 && !r.resynced {
                println!("{}", summary(r));
                return Err(VerifyError::Differs {
                    volume: v.volume.clone(),
                    count: r.differing_chunks,
                });
            }
            return Ok(r.clone());
        }
        if let Some(p) = v.resync_progress.as_ref().filter(|p| p.verify) {
            let tenth = p.tenths();
            if tenth != said {
                println!(
                    "verify: {}%: {}",
                    tenth * 10,
                    crate::progress::progress_line(p)
                );
                said = tenth;
            }
        }
        if Instant::now() >= deadline {
            return Err(VerifyError::Timeout {
                volume: v.volume.clone(),
                timeout,
            });
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use replica_control::status::Role;

    fn report(started_ns: u64, differing: u64, repair_seq: u64) -> VerifyReport {
        VerifyReport {
            generation: "aa".into(),
            started_ns,
            finished_ns: started_ns + 2_000_000_000,
            chunk_bytes: 256 << 10,
            chunks: 10,
            compared_chunks: 10,
            differing_chunks: differing,
            differing_offsets: (0..differing).map(|i| i * (256 << 10)).collect(),
            resynced: repair_seq > 0,
            repair_seq,
            abandoned: None,
            busy_chunks: 0,
        }
    }

    #[test]
    fn a_verify_is_done_with_its_own_report_and_its_repairs_applied() {
        let mut v = VolumeStatus::new("v", Role::Primary);
        v.generation = "aa".into();
        // An earlier verify's report is not this one's.
        v.last_verify = Some(report(100, 0, 0));
        assert!(finished(&v, 200).is_none());
        v.last_verify = Some(report(300, 0, 0));
        assert!(finished(&v, 200).is_some());
        // Repairs sent up to record 50: done once the target applied them.
        v.last_verify = Some(report(300, 2, 50));
        v.applied_seq = 49;
        assert!(finished(&v, 200).is_none());
        v.applied_seq = 50;
        assert!(finished(&v, 200).is_some());
        // Not while a resync (which took the repairs over) runs.
        v.needs_resync = true;
        assert!(finished(&v, 200).is_none());
        v.needs_resync = false;
        v.target_inconsistent = true;
        assert!(finished(&v, 200).is_none());
        let s = summary(&report(0, 2, 0));
        assert!(s.contains("2 differing") && s.contains("0x40000"), "{s}");
        assert!(summary(&report(0, 0, 0)).contains("identical"));
    }
}
