//! The target's persistent per-volume state, written atomically (temporary
//! file, fsync, rename, fsync of the directory).

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::StoreError;

/// Why a recovery point was taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PointKind {
    /// At a committed flush: crash-consistent.
    Crash,
    /// At a marker inserted by an application-consistency hook.
    Marker,
    /// Where the replica was promoted at a failover.
    Failover,
}

/// The replica was failed over to: it is the primary volume now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Promotion {
    /// The epoch it became the primary in.
    pub epoch: u64,
    /// The record sequence (recovery point) it was promoted at.
    pub point_seq: u64,
    /// Planned (zero loss) or not.
    pub planned: bool,
    /// Where the volume is on this host.
    pub device: String,
    /// When, ns since the epoch.
    pub at_ns: u64,
}

/// A recovery point.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecoveryPoint {
    /// Point id (the record sequence it was taken at).
    pub id: u64,
    /// Last record sequence included.
    pub seq: u64,
    /// Ring generation, hex.
    pub generation: String,
    /// Source time of that record, ns since the epoch.
    pub source_time_ns: u64,
    /// Target time when it was recorded, ns since the epoch.
    pub created_ns: u64,
    /// Kind.
    pub kind: PointKind,
    /// Marker id for marker points.
    #[serde(default)]
    pub marker: Option<u64>,
}

/// Persistent state of one replicated volume on the target.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeState {
    /// State format version.
    pub version: u32,
    /// Ring generation the journal belongs to, hex ("" before the first stream).
    pub generation: String,
    /// Replication epoch.
    pub epoch: u64,
    /// Every record up to here is applied and flushed to the replica.
    pub applied_seq: u64,
    /// Recovery points, oldest first.
    pub points: Vec<RecoveryPoint>,
    /// Set when the volume hit a non-recoverable error.
    pub critical: Option<String>,
    /// A resync started at this record and has not ended: the replica is
    /// inconsistent (the last recovery point is the one to fail over to).
    #[serde(default)]
    pub resync_since: Option<u64>,
    /// Set once the replica was promoted (failover): no stream is accepted
    /// for it any more.
    #[serde(default)]
    pub promoted: Option<Promotion>,
    /// The replica holds no consistent copy of the source (the target had
    /// no record of the volume, or the source's capture ring changed): only
    /// the END of a resync whose BEGIN says it resends every region makes
    /// it consistent. Until then `resync_since` is set as well, so no
    /// recovery point is taken and a planned failover is refused.
    #[serde(default)]
    pub needs_full_resync: bool,
    /// Records of `generation` up to here were never received: the
    /// generation was taken over (or first streamed) from the next one.
    #[serde(default)]
    pub generation_base: u64,
}

/// Current state format version.
pub const STATE_VERSION: u32 = 1;

impl VolumeState {
    /// Loads the state file, or a fresh state if there is none.
    pub fn load(path: &Path) -> Result<Self, StoreError> {
        match std::fs::read(path) {
            Ok(b) => {
                let s: Self = serde_json::from_slice(&b).map_err(|e| StoreError::Corrupt {
                    path: path.to_owned(),
                    offset: 0,
                    why: e.to_string(),
                })?;
                if s.version != STATE_VERSION {
                    return Err(StoreError::Invalid(format!(
                        "{}: state version {} unsupported",
                        path.display(),
                        s.version
                    )));
                }
                Ok(s)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self {
                version: STATE_VERSION,
                ..Self::default()
            }),
            Err(e) => Err(StoreError::io("read state", path, e)),
        }
    }

    /// Writes the state atomically.
    pub fn save(&self, path: &Path) -> Result<(), StoreError> {
        Ok(replica_fs::write_atomic(
            path,
            &serde_json::to_vec_pretty(self).unwrap_or_default(),
        )?)
    }
}
