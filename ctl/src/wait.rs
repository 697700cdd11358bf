//! `replctl wait`: until a target has applied a record sequence of a given
//! capture ring generation. Sequences start over with each ring, so the
//! generation is part of the question: a higher sequence of another
//! generation says nothing about this one.

use std::path::Path;
use std::time::{Duration, Instant};

use replica_control::status::{Health, VolumeStatus};

use crate::error::Exit;

/// Why a wait ended without the record applied.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WaitError {
    /// The volume went Critical.
    #[error("volume {volume} is Critical: {reasons}")]
    Critical {
        /// Volume id.
        volume: String,
        /// Its reasons.
        reasons: String,
    },
    /// The target took this generation over after the record: it never
    /// received it, so it will never have applied it.
    #[error("volume {volume}: record {seq} of generation {generation} was never received by the target (it took the generation over after record {base}); wait for a later record")]
    NeverReceived {
        /// Volume id.
        volume: String,
        /// The record waited for.
        seq: u64,
        /// Its generation.
        generation: String,
        /// The target's base of the generation.
        base: u64,
    },
    /// The deadline passed.
    #[error("volume {volume} did not reach record {seq} of generation {generation} within {timeout:?}{seen}")]
    Timeout {
        /// Volume id.
        volume: String,
        /// The record waited for.
        seq: u64,
        /// Its generation.
        generation: String,
        /// How long it waited.
        timeout: Duration,
        /// Where the volume was last seen.
        seen: String,
    },
}

impl WaitError {
    /// The exit code.
    pub fn exit(&self) -> Exit {
        match self {
            Self::Critical { .. } => Exit::Critical,
            Self::NeverReceived { .. } | Self::Timeout { .. } => Exit::Failed,
        }
    }
}

/// Whether `v` is about ring `generation`.
fn same_generation(v: &VolumeStatus, generation: &str) -> bool {
    !v.generation.is_empty() && v.generation.eq_ignore_ascii_case(generation)
}

/// Whether `v` shows record `seq` of `generation` applied (a record at or
/// below the generation's base was never received, so never applied).
pub fn applied(v: &VolumeStatus, seq: u64, generation: &str) -> bool {
    same_generation(v, generation) && seq > v.generation_base && v.applied_seq >= seq
}

/// Waits until the daemon with state directory `state_dir` reports record
/// `seq` of ring `generation` applied for `volume`; returns its status then.
pub fn wait_applied(
    state_dir: &Path,
    volume: &str,
    seq: u64,
    generation: &str,
    timeout: Duration,
) -> Result<VolumeStatus, WaitError> {
    let deadline = Instant::now() + timeout;
    let mut seen = String::new();
    loop {
        let vols = replica_control::status::read(state_dir).unwrap_or_default();
        if let Some(v) = vols.into_iter().find(|v| v.volume == volume) {
            if v.health == Health::Critical {
                return Err(WaitError::Critical {
                    volume: volume.to_owned(),
                    reasons: v.reasons_text(),
                });
            }
            if applied(&v, seq, generation) {
                return Ok(v);
            }
            if same_generation(&v, generation) && seq <= v.generation_base {
                return Err(WaitError::NeverReceived {
                    volume: volume.to_owned(),
                    seq,
                    generation: generation.to_owned(),
                    base: v.generation_base,
                });
            }
            seen = format!(
                "; it is at record {} of generation {}",
                v.applied_seq,
                if v.generation.is_empty() {
                    "(none)"
                } else {
                    &v.generation
                }
            );
        }
        if Instant::now() > deadline {
            return Err(WaitError::Timeout {
                volume: volume.to_owned(),
                seq,
                generation: generation.to_owned(),
                timeout,
                seen,
            });
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
