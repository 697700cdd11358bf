//! Online verify: a walk of HASH markers over the whole volume while
//! replication goes on (see [`super::resync`]), its start, its report, and
//! the progress of a run in the status.

use std::sync::atomic::Ordering;

use std::path::{Path, PathBuf};

use super::resync::{Run, Verify};
use super::{Drainer, Mode, VerifyRefusal};
use crate::source::dirty::ResyncState;
use crate::status::{ChunkProgress, ReasonKind, VerifyReport, VolumeStatus};
use crate::DaemonError;

/// Where the last verify's report is kept: beside the resync state.
pub(super) fn verify_path(state_path: &Path) -> PathBuf {
    state_path.with_file_name("verify.json")
}

/// The last verify's report saved in the state directory, if any (one that
/// cannot be read is ignored: it is a report, not state).
pub(super) fn load_report(state_path: &Path) -> Option<VerifyReport> {
    let b = std::fs::read(verify_path(state_path)).ok()?;
    serde_json::from_slice(&b).ok()
}

/// Shows `report` in status `s`: a Warning while chunks it found different
/// may still differ (not resent; abandoned ones joined a resync, whose end
/// clears it).
pub(super) fn apply_report(s: &mut VolumeStatus, report: &VerifyReport) {
    let n = report.differing_chunks;
    if n > 0 && !report.resynced {
        let what = if report.abandoned.is_some() {
            "; they are resent by the resync that follows"
        } else {
            "; run `replctl verify --resync` or `replctl resync`"
        };
        s.set_reason(
            ReasonKind::Verify,
            format!("verify found {n} chunks of the replica different from the source{what}"),
        );
    } else if report.abandoned.is_none() {
        s.clear_reason(ReasonKind::Verify);
    }
    s.last_verify = Some(report.clone());
}

impl Drainer {
    /// Starts a verify (`resync`: send what differs) at most `max_rate`
    /// bytes per second; returns the ring position it starts at.
    pub(super) fn start_verify(
        &mut self,
        resync: bool,
        max_rate: Option<u64>,
    ) -> Result<u64, VerifyRefusal> {
        if self.kernel.is_none() {
            return Err(VerifyRefusal::NoMarkers);
        }
        if self.set.device.is_none() {
            return Err(VerifyRefusal::NoDevice);
        }
        match &self.mode {
            Mode::Bitmap { .. } => return Err(VerifyRefusal::Resyncing),
            Mode::Spool(Some(run)) if run.verifying().is_some() => {
                return Err(VerifyRefusal::Running)
            }
            Mode::Spool(Some(_)) => return Err(VerifyRefusal::Resyncing),
            Mode::Spool(None) => {}
        }
        if !self.shared.connected.load(Ordering::Acquire) {
            return Err(VerifyRefusal::NotConnected);
        }
        let from = self.consumer.producer_seq();
        let run = Run::verify(
            self.generation,
            self.set.volume_size,
            self.region_bytes,
            Verify::new(resync, max_rate),
        );
        tracing::info!(volume = %self.set.volume, from, chunks = run.st.map.count(), chunk_bytes = self.region_bytes, resync, max_rate, "verify started");
        self.mode = Mode::Spool(Some(Box::new(run)));
        self.publish();
        Ok(from)
    }

    /// The report of the running verify (`abandoned`: why it cannot finish).
    fn verify_report(&self, abandoned: Option<String>) -> Option<VerifyReport> {
        let Mode::Spool(Some(run)) = &self.mode else {
            return None;
        };
        let v = run.verifying()?;
        let t = run.chunks.tally;
        Some(VerifyReport {
            generation: hex::encode(self.generation),
            started_ns: v.started_ns,
            finished_ns: crate::now_ns(),
            chunk_bytes: run.st.map.region_bytes(),
            chunks: run.st.map.regions(),
            compared_chunks: t.compared,
            differing_chunks: t.differing,
            differing_offsets: v.offsets.clone(),
            resynced: v.resync,
            repair_seq: v.repair_seq,
            abandoned,
            busy_chunks: t.busy,
        })
    }

    /// Puts a verify's report in the status, the log and `verify.json` in
    /// the state directory (the status shows it again after a restart).
    fn record_verify(&self, report: VerifyReport) {
        let path = verify_path(&self.set.state_path);
        match serde_json::to_vec_pretty(&report) {
            Ok(b) => {
                if let Err(e) = replica_fs::write_atomic(&path, &b) {
                    tracing::warn!(volume = %self.set.volume, "cannot save the verify report: {e}");
                }
            }
            Err(e) => {
                tracing::warn!(volume = %self.set.volume, "cannot encode the verify report: {e}")
            }
        }
        let n = report.differing_chunks;
        match &report.abandoned {
            Some(why) => {
                tracing::warn!(volume = %self.set.volume, compared = report.compared_chunks, differing = n, "verify abandoned: {why}")
            }
            None if n == 0 => {
                tracing::info!(volume = %self.set.volume, chunks = report.compared_chunks, "verify complete: source and replica are identical")
            }
            None => {
                tracing::error!(volume = %self.set.volume, chunks = report.compared_chunks, differing = n, first_offsets = ?&report.differing_offsets[..report.differing_offsets.len().min(16)], resynced = report.resynced, "verify complete: the replica differs from the source")
            }
        }
        self.board.update(&self.set.volume, |s| {
            apply_report(s, &report);
            s.resync_progress = None;
        });
    }

    /// Every chunk of the running verify is answered (and what differs
    /// sent, if asked): it ends.
    pub(super) fn verify_done(&mut self) {
        if let Some(r) = self.verify_report(None) {
            self.record_verify(r);
        }
        self.mode = Mode::Spool(None);
        self.publish();
    }

    /// The stream is about to stop for a resync (`why`): a running verify
    /// cannot finish; its report says so. (What it found different joins
    /// the resync.)
    pub(super) fn abandon_verify(&self, why: &str) {
        if let Some(r) = self.verify_report(Some(why.to_owned())) {
            self.record_verify(r);
        }
    }

    /// The daemon stops (or the ring closed) during a verify: its report
    /// says it was abandoned, and the chunks it found different and did not
    /// send yet are saved as needing a resync, so a restart repairs them
    /// instead of forgetting them.
    pub(super) fn stop_verify(&mut self, why: &str) -> Result<(), DaemonError> {
        let Mode::Spool(Some(run)) = &self.mode else {
            return Ok(());
        };
        let Some(v) = run.verifying() else {
            return Ok(());
        };
        let left = if v.resync {
            run.st.differ.clone()
        } else {
            run.found.clone()
        };
        self.abandon_verify(why);
        if left.count() == 0 {
            self.mode = Mode::Spool(None);
            return Ok(());
        }
        let st = ResyncState::new(
            self.generation,
            self.shared.spool.next_seq(),
            format!(
                "a verify found {} chunks of the replica different",
                left.count()
            ),
            left,
        );
        super::resync::save_state(&self.set, &self.keys, &st)?;
        tracing::warn!(volume = %self.set.volume, chunks = st.map.count(), "the verify's differing chunks were not all sent: saved as needing a resync");
        self.mode = Mode::Spool(None);
        Ok(())
    }

    /// The progress of the running resync or verify.
    pub(super) fn progress(run: &Run) -> ChunkProgress {
        let t = run.chunks.tally;
        let rb = run.st.map.region_bytes();
        let elapsed = t.started.elapsed().as_secs_f64();
        let rate = if elapsed > 0.0 {
            t.covered_bytes as f64 / elapsed
        } else {
            0.0
        };
        let remaining = run.st.map.count();
        ChunkProgress {
            verify: run.verifying().is_some(),
            chunk_bytes: rb,
            total_chunks: t.total,
            done_before: t.done_before,
            remaining_chunks: remaining,
            compared_chunks: t.compared,
            equal_chunks: t.equal,
            differing_chunks: t.differing,
            sent_chunks: t.sent,
            sent_bytes: t.sent_bytes,
            zero_chunks: t.zero,
            rehashed_chunks: t.rehashed,
            elapsed_seconds: elapsed,
            bytes_per_second: rate,
            eta_seconds: (rate > 0.0).then(|| remaining as f64 * rb as f64 / rate),
            end_seq: run.end.unwrap_or(0),
        }
    }
}
