//! The source's side of failover: its persisted role and epoch, and
//! fencing the protected volume with device-mapper.
//!
//! A planned failover freezes the volume (suspend: in-flight writes
//! complete, new ones wait), inserts a final marker, replaces the table by
//! an `error` target and resumes, so writers get errors instead of hanging,
//! then hands over to the target once the marker is applied there. A source
//! that learns from the target that the volume was failed over without it
//! fences the volume the same way and stops: it is demoted and must be
//! protected anew.

use std::path::{Path, PathBuf};

pub use replica_dm::dm_name;
use replica_dm::{Control, DeviceMapper, DmError, Target};
use serde::{Deserialize, Serialize};

/// Why the role could not be read or saved, or the volume not fenced.
#[derive(Debug, thiserror::Error)]
pub enum FailoverError {
    /// The role file cannot be read.
    #[error("{}: {source}", path.display())]
    RoleRead {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The role file does not parse.
    #[error("{}: {source}", path.display())]
    RoleParse {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// The role file cannot be written.
    #[error(transparent)]
    RoleWrite(#[from] replica_fs::IoError),
    /// `device` is not a device-mapper device.
    #[error(transparent)]
    Device(#[from] replica_dm::DeviceError),
    /// A device-mapper call failed.
    #[error(transparent)]
    Dm(#[from] DmError),
    /// The target's answer to the marker message is not one.
    #[error("unexpected answer to the marker message: {0:?}")]
    MarkerAnswer(String),
}

/// The source's persisted role (`<state_dir>/role.json`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceRole {
    /// The epoch this source is at (a failover moves the target to a later
    /// one).
    pub epoch: u64,
    /// Set when the volume was failed over: this source must not replicate
    /// it any more.
    #[serde(default)]
    pub demoted: Option<String>,
    /// A planned failover fenced the volume with its last record here and
    /// has not completed yet (a retry continues from it).
    #[serde(default)]
    pub failing_over: Option<u64>,
    /// The capture ring generation last replicated, hex: another one at
    /// start means the ring was re-created (host restart, table re-created)
    /// and writes may have gone uncaptured in between.
    #[serde(default)]
    pub generation: Option<String>,
}

/// A planned failover handed to the session: once the target has every
/// record up to `upto` durably, ask it to take over at `epoch`.
pub struct PlannedFailover {
    /// The old primary's last record.
    pub upto: u64,
    /// The new epoch.
    pub epoch: u64,
    /// Whether PROMOTE was sent on the current connection.
    pub sent: bool,
    /// The answer.
    pub reply: crossbeam_channel::Sender<Result<replica_proto::msg::Promoted, String>>,
}

impl SourceRole {
    fn path(state_dir: &Path) -> PathBuf {
        state_dir.join("role.json")
    }

    /// Loads it (a missing file is a fresh source at epoch 0).
    pub fn load(state_dir: &Path) -> Result<Self, FailoverError> {
        let path = Self::path(state_dir);
        match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b)
                .map_err(|source| FailoverError::RoleParse { path, source }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(source) => Err(FailoverError::RoleRead { path, source }),
        }
    }

    /// Saves it atomically and durably.
    pub fn save(&self, state_dir: &Path) -> Result<(), FailoverError> {
        // A struct of plain fields always serialises.
        let b = serde_json::to_vec_pretty(self).unwrap_or_default();
        Ok(replica_fs::write_atomic(&Self::path(state_dir), &b)?)
    }
}

fn dm() -> Control {
    Control::default()
}

/// Whether the live table of `name` is a single `error` target already.
pub fn is_fenced(name: &str) -> bool {
    dm().table(name)
        .is_ok_and(|t| t.single().is_some_and(|t| t.target_type == "error"))
}

/// Suspends `name`: in-flight writes complete, new ones wait.
pub fn suspend(name: &str) -> Result<(), FailoverError> {
    Ok(dm().suspend(name)?)
}

/// Inserts a marker record through the `replica` target's message
/// interface; returns its sequence.
pub fn marker(name: &str, id: u64) -> Result<u64, FailoverError> {
    let out = dm().message(name, &format!("marker {id}"))?;
    let want = format!("marker {id} seq ");
    out.lines()
        .find_map(|l| l.trim().strip_prefix(&want))
        .and_then(|s| s.trim().parse().ok())
        .ok_or(FailoverError::MarkerAnswer(out))
}

/// Replaces the table of `name` (of `sectors` sectors) with an `error`
/// target and resumes it: every write (and read) fails from now on instead
/// of reaching the disk or hanging.
///
/// A failure after the error table went live (making the device node, say)
/// is not one: the live table decides, so a fence that took effect is never
/// reported as failed (a retry would then try to fence a fenced volume).
pub fn fence(name: &str, sectors: u64) -> Result<(), FailoverError> {
    let d = dm();
    d.reload(name, &Target::new(0, sectors, "error", "").into())?;
    match d.resume(name) {
        Ok(()) => Ok(()),
        Err(e) if is_fenced(name) => {
            tracing::warn!(device = name, error = %e, "the error table is live although the resume reported an error");
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

/// Resumes `name` with its current table (undoing [`suspend`]).
pub fn resume(name: &str) -> Result<(), FailoverError> {
    Ok(dm().resume(name)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn role_round_trips_and_a_missing_file_is_a_fresh_source() {
        let d = tempfile::tempdir().expect("tmp");
        assert_eq!(
            SourceRole::load(d.path()).expect("load"),
            SourceRole::default()
        );
        let r = SourceRole {
            epoch: 3,
            demoted: Some("failed over".into()),
            failing_over: Some(77),
            generation: Some("00ff".into()),
        };
        r.save(d.path()).expect("save");
        assert_eq!(SourceRole::load(d.path()).expect("load"), r);
        std::fs::write(d.path().join("role.json"), "{\"epoch\":1,\"x\":2}").expect("w");
        assert!(
            matches!(
                SourceRole::load(d.path()),
                Err(FailoverError::RoleParse { .. })
            ),
            "unknown keys are refused"
        );
    }

    #[test]
    fn a_regular_file_is_not_a_dm_device() {
        let d = tempfile::tempdir().expect("tmp");
        let f = d.path().join("f");
        std::fs::write(&f, b"x").expect("w");
        assert!(dm_name(&f)
            .expect_err("not a block device")
            .to_string()
            .contains("not a block device"));
    }
}
