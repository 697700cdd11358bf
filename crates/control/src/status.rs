//! The status a daemon reports, DRBD style: role, connection, replica
//! state and health are separate dimensions. A daemon answers `status` with
//! it and publishes it to [`STATUS_FILE`] in its state directory, so
//! operators and tests can read it without talking to the daemon.

use std::path::Path;

use serde::{Deserialize, Serialize};

/// The file a daemon publishes its status to, in its state directory.
pub const STATUS_FILE: &str = "status.json";

/// Role of this side.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    /// The protected (writable) side.
    Primary,
    /// The replica side.
    Secondary,
}

/// Connection state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Connection {
    /// Streaming.
    Connected,
    /// Trying to connect or handshaking.
    Connecting,
    /// Waiting for the next retry after a recoverable error.
    Retrying,
    /// Not replicating (stopped or Critical).
    StandAlone,
}

/// Health.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Health {
    /// Fine.
    OK,
    /// Degraded, recovering by itself (retrying, low space).
    Warning,
    /// Needs an operator: replication stopped for a non-recoverable error.
    Critical,
}

/// Per-volume status.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VolumeStatus {
    /// Volume id.
    pub volume: String,
    /// Role.
    pub role: Role,
    /// Connection.
    pub connection: Connection,
    /// Replica state: UpToDate, Consistent, Inconsistent, Outdated.
    pub replica: String,
    /// Health.
    pub health: Health,
    /// Reasons for Warning or Critical.
    pub reasons: Vec<String>,
    /// Ring generation, hex.
    pub generation: String,
    /// Epoch.
    pub epoch: u64,
    /// Source: next record to read from the ring. Target: unused (0).
    pub captured_seq: u64,
    /// Last record durable on the target.
    pub durable_seq: u64,
    /// Last record applied to the replica.
    pub applied_seq: u64,
    /// Records applied to the replica since the daemon started (target).
    pub applied_records: u64,
    /// Source: records captured but not yet durable on the target.
    pub lag_records: u64,
    /// Source: bytes those records hold in the capture ring.
    pub lag_bytes: u64,
    /// Source: age of the oldest record not yet durable on the target, s.
    pub lag_seconds: f64,
    /// Records that failed on the source and were skipped (their regions
    /// need resync).
    pub failed_records: u64,
    /// Segments sent (source) or received (target) since start.
    pub segments: u64,
    /// Bytes of records shipped or received (uncompressed).
    pub record_bytes: u64,
    /// Bytes on the wire / in the journal (compressed, encrypted).
    pub frame_bytes: u64,
    /// Recovery points (target).
    pub points: u64,
    /// Latest recovery point sequence (target).
    pub last_point_seq: u64,
    /// Connection attempts since the last success.
    pub retries: u64,
    /// Source: next record to be written to the spool.
    #[serde(default)]
    pub spooled_seq: u64,
    /// Source: spool bytes holding records the target does not have yet.
    #[serde(default)]
    pub spool_bytes: u64,
    /// Source: the stream cannot carry every write any more; the regions
    /// of `dirty_regions` need a resync.
    #[serde(default)]
    pub needs_resync: bool,
    /// Source: first record the target will not receive through the stream
    /// (with `needs_resync`).
    #[serde(default)]
    pub resync_since_seq: u64,
    /// Source: dirty regions waiting for a resync.
    #[serde(default)]
    pub dirty_regions: u64,
    /// Source: bytes those regions cover.
    #[serde(default)]
    pub dirty_bytes: u64,
    /// Source: a resync is sending the dirty regions.
    #[serde(default)]
    pub resync_running: bool,
    /// Source: regions the running (or next) resync sends in all.
    #[serde(default)]
    pub resync_total_regions: u64,
    /// Source: the END record of the last resync (the replica is consistent
    /// once the target applied it).
    #[serde(default)]
    pub resync_end_seq: u64,
    /// Source: the target said, with its last acknowledgement, that its
    /// replica is inconsistent (a resync runs there or is needed).
    #[serde(default)]
    pub target_inconsistent: bool,
    /// Target: records of this generation up to here were never received
    /// (the generation was taken over, or the volume first streamed, from
    /// a later record): they were not applied, whatever `applied_seq` says.
    #[serde(default)]
    pub generation_base: u64,
}

impl VolumeStatus {
    /// A fresh status.
    pub fn new(volume: &str, role: Role) -> Self {
        Self {
            volume: volume.to_owned(),
            role,
            connection: Connection::StandAlone,
            replica: "Inconsistent".into(),
            health: Health::OK,
            reasons: Vec::new(),
            generation: String::new(),
            epoch: 0,
            captured_seq: 0,
            durable_seq: 0,
            applied_seq: 0,
            applied_records: 0,
            lag_records: 0,
            lag_bytes: 0,
            lag_seconds: 0.0,
            failed_records: 0,
            segments: 0,
            record_bytes: 0,
            frame_bytes: 0,
            points: 0,
            last_point_seq: 0,
            retries: 0,
            spooled_seq: 0,
            spool_bytes: 0,
            needs_resync: false,
            resync_since_seq: 0,
            dirty_regions: 0,
            dirty_bytes: 0,
            resync_running: false,
            resync_total_regions: 0,
            resync_end_seq: 0,
            target_inconsistent: false,
            generation_base: 0,
        }
    }
}

/// Reads a daemon's published status.
pub fn read(dir: &Path) -> std::io::Result<Vec<VolumeStatus>> {
    let b = std::fs::read(dir.join(STATUS_FILE))?;
    serde_json::from_slice(&b).map_err(std::io::Error::other)
}
