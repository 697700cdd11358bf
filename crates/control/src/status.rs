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

/// What the replica holds, DRBD style.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReplicaState {
    /// Target: promoted, this is the primary's data. Source: the target has
    /// every record captured.
    UpToDate,
    /// A crash-consistent copy (target: at its last recovery point; source:
    /// the target has a prefix of the stream).
    Consistent,
    /// No consistent copy (yet): none was made, or a resync is running.
    Inconsistent,
    /// Source: the stream stopped; the replica is a consistent copy of an
    /// older state until a resync brings it up to date.
    Outdated,
}

impl std::fmt::Display for ReplicaState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::UpToDate => "UpToDate",
            Self::Consistent => "Consistent",
            Self::Inconsistent => "Inconsistent",
            Self::Outdated => "Outdated",
        })
    }
}

/// What a reason for Warning or Critical is about. A volume has at most one
/// reason of each kind; its health follows from them ([`ReasonKind::health`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ReasonKind {
    /// Replication stopped for a non-recoverable error: Critical.
    Stopped,
    /// The last session with the peer failed; retrying.
    Session,
    /// A write failed on the source; its region needs a resync.
    WriteFailed,
    /// A resync is needed or running.
    Resync,
    /// The replica could not be written; retrying.
    Replica,
    /// A recovery point could not be taken.
    RecoveryPoint,
    /// The replica backend warns (e.g. a thin pool filling up).
    Backend,
    /// A certificate expires soon.
    Certificate,
    /// The volume was promoted here (informational).
    Promoted,
    /// The last online verify found the replica different from the source.
    Verify,
}

impl ReasonKind {
    /// The health a reason of this kind means.
    pub fn health(self) -> Health {
        match self {
            Self::Stopped => Health::Critical,
            Self::Promoted => Health::OK,
            Self::Session
            | Self::WriteFailed
            | Self::Resync
            | Self::Replica
            | Self::RecoveryPoint
            | Self::Backend
            | Self::Certificate
            | Self::Verify => Health::Warning,
        }
    }
}

/// A reason for a volume's health, for the operator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Reason {
    /// What it is about.
    pub kind: ReasonKind,
    /// What happened and, where it helps, what to do.
    pub message: String,
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
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
    /// What the replica holds.
    pub replica: ReplicaState,
    /// Health: the worst of the reasons' (see [`VolumeStatus::set_reason`]).
    pub health: Health,
    /// Reasons for Warning or Critical, at most one of each kind, in kind
    /// order.
    pub reasons: Vec<Reason>,
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
    /// Streams established since the daemon started (source: sessions
    /// with the target; target: streams accepted). A connection that keeps
    /// dropping shows here.
    #[serde(default)]
    pub sessions: u64,
    /// Target: pings answered since the daemon started (the source pings a
    /// stream it has nothing to send on, see `network.peer_timeout_secs`).
    #[serde(default)]
    pub pings: u64,
    /// Source: the running resync's or verify's chunk comparison.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resync_progress: Option<ChunkProgress>,
    /// Source: the last online verify's result.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_verify: Option<VerifyReport>,
    /// Target: chunks compared with the source's hashes since the daemon
    /// started (resync and verify).
    #[serde(default)]
    pub compared_chunks: u64,
    /// Target: of those, chunks that differed.
    #[serde(default)]
    pub differing_chunks: u64,
}

/// How far a resync or an online verify is (source). A chunk is *proven*
/// once the target answered that it equals the source's (compared equal)
/// or its data was sent; the run ends when every chunk is proven and, for a
/// resync, the target applied its END (`end_seq`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChunkProgress {
    /// An online verify, not a resync.
    pub verify: bool,
    /// Bytes of a chunk.
    pub chunk_bytes: u64,
    /// Chunks the run covers (this start; more when the kernel adds some).
    pub total_chunks: u64,
    /// Chunks proven before this start (a resync resumed from its cursor).
    pub done_before: u64,
    /// Chunks not proven yet.
    pub remaining_chunks: u64,
    /// Chunks the target answered for.
    pub compared_chunks: u64,
    /// Of those, equal on both sides.
    pub equal_chunks: u64,
    /// Of those, different.
    pub differing_chunks: u64,
    /// Chunks whose data was sent.
    pub sent_chunks: u64,
    /// Their bytes (before compression).
    pub sent_bytes: u64,
    /// Chunks neither compared nor sent: zeros on the volume where the
    /// target's replica read zeros (a hole, an unprovisioned thin block)
    /// when the resync began.
    #[serde(default)]
    pub zero_chunks: u64,
    /// Chunks compared again because an answer was lost.
    pub rehashed_chunks: u64,
    /// Seconds since the run started (or resumed).
    pub elapsed_seconds: f64,
    /// Bytes proven per second.
    pub bytes_per_second: f64,
    /// Seconds left at that rate.
    pub eta_seconds: Option<f64>,
    /// The resync's END record, once inserted (0: not yet).
    pub end_seq: u64,
}

impl ChunkProgress {
    /// Chunks proven and chunks in all (never fewer than those left).
    pub fn proven(&self) -> (u64, u64) {
        let total = self.total_chunks.max(self.remaining_chunks);
        (total - self.remaining_chunks, total)
    }

    /// How far it is, in tenths (0..=10).
    pub fn tenths(&self) -> u64 {
        let (done, total) = self.proven();
        (done * 10).checked_div(total).unwrap_or(0)
    }
}

/// The result of an online verify (source).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyReport {
    /// The ring generation it ran on.
    pub generation: String,
    /// When it started, ns since the Unix epoch.
    pub started_ns: u64,
    /// When it ended.
    pub finished_ns: u64,
    /// Bytes of a chunk.
    pub chunk_bytes: u64,
    /// Chunks of the volume.
    pub chunks: u64,
    /// Chunks compared.
    pub compared_chunks: u64,
    /// Chunks that differed.
    pub differing_chunks: u64,
    /// Byte offsets of the differing chunks (the first thousand).
    pub differing_offsets: Vec<u64>,
    /// The differing chunks were sent.
    pub resynced: bool,
    /// The last record of what was sent (the replica holds the repairs
    /// once the target applied it); 0 if nothing.
    pub repair_seq: u64,
    /// Why it did not finish, if it did not (what it had found different
    /// then joined a resync).
    pub abandoned: Option<String>,
    /// Chunks it gave up on: the application wrote them every time they
    /// were compared (neither verified nor reported different).
    #[serde(default)]
    pub busy_chunks: u64,
}

impl VolumeStatus {
    /// A fresh status.
    pub fn new(volume: &str, role: Role) -> Self {
        Self {
            volume: volume.to_owned(),
            role,
            connection: Connection::StandAlone,
            replica: ReplicaState::Inconsistent,
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
            sessions: 0,
            pings: 0,
            compared_chunks: 0,
            differing_chunks: 0,
            resync_progress: None,
            last_verify: None,
        }
    }
}

impl VolumeStatus {
    /// Sets the reason of `kind` (replacing one of that kind); health
    /// follows.
    pub fn set_reason(&mut self, kind: ReasonKind, message: impl Into<String>) {
        let message = message.into();
        match self.reasons.binary_search_by_key(&kind, |r| r.kind) {
            Ok(i) => self.reasons[i].message = message,
            Err(i) => self.reasons.insert(i, Reason { kind, message }),
        }
        self.health = self.derived_health();
    }

    /// Removes the reason of `kind`, if any; health follows.
    pub fn clear_reason(&mut self, kind: ReasonKind) {
        self.reasons.retain(|r| r.kind != kind);
        self.health = self.derived_health();
    }

    /// The reason of `kind`, if any.
    pub fn reason(&self, kind: ReasonKind) -> Option<&str> {
        self.reasons
            .iter()
            .find(|r| r.kind == kind)
            .map(|r| r.message.as_str())
    }

    /// The reasons' messages, for one line of text.
    pub fn reasons_text(&self) -> String {
        self.reasons
            .iter()
            .map(|r| r.message.as_str())
            .collect::<Vec<_>>()
            .join("; ")
    }

    fn derived_health(&self) -> Health {
        self.reasons
            .iter()
            .map(|r| r.kind.health())
            .max_by_key(|h| match h {
                Health::OK => 0,
                Health::Warning => 1,
                Health::Critical => 2,
            })
            .unwrap_or(Health::OK)
    }
}

/// Reads a daemon's published status.
pub fn read(dir: &Path) -> std::io::Result<Vec<VolumeStatus>> {
    let b = std::fs::read(dir.join(STATUS_FILE))?;
    serde_json::from_slice(&b).map_err(std::io::Error::other)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_progress_counts_what_is_proven_and_never_underflows() {
        let mut p = ChunkProgress {
            verify: false,
            chunk_bytes: 65536,
            total_chunks: 200,
            done_before: 0,
            remaining_chunks: 50,
            compared_chunks: 150,
            equal_chunks: 140,
            differing_chunks: 10,
            sent_chunks: 10,
            sent_bytes: 655360,
            zero_chunks: 0,
            rehashed_chunks: 0,
            elapsed_seconds: 1.0,
            bytes_per_second: 1.0,
            eta_seconds: None,
            end_seq: 0,
        };
        assert_eq!(p.proven(), (150, 200));
        assert_eq!(p.tenths(), 7);
        // More left than counted (regions added since): nothing proven.
        p.remaining_chunks = 300;
        assert_eq!(p.proven(), (0, 300));
        p.total_chunks = 0;
        p.remaining_chunks = 0;
        assert_eq!(p.tenths(), 0);
    }

    #[test]
    fn one_reason_per_kind_and_health_follows_the_worst() {
        let mut s = VolumeStatus::new("v", Role::Primary);
        assert_eq!(s.health, Health::OK);
        s.set_reason(ReasonKind::Session, "connect: refused");
        assert_eq!(s.health, Health::Warning);
        s.set_reason(ReasonKind::Session, "connect: timed out");
        assert_eq!(s.reasons.len(), 1, "replaced, not added");
        assert_eq!(s.reason(ReasonKind::Session), Some("connect: timed out"));
        s.set_reason(ReasonKind::Stopped, "authentication failed");
        assert_eq!(s.health, Health::Critical);
        s.set_reason(ReasonKind::WriteFailed, "write failed at sector 8");
        s.set_reason(ReasonKind::Session, "connect: refused again");
        assert_eq!(
            s.health,
            Health::Critical,
            "a Warning after Critical never downgrades it"
        );
        s.clear_reason(ReasonKind::WriteFailed);
        assert_eq!(s.reasons[0].kind, ReasonKind::Stopped, "kept in kind order");
        s.clear_reason(ReasonKind::Session);
        assert_eq!(s.health, Health::Critical, "Critical stays with its reason");
        s.clear_reason(ReasonKind::Stopped);
        assert_eq!(s.health, Health::OK);
        s.set_reason(ReasonKind::Promoted, "promoted at epoch 2");
        assert_eq!(s.health, Health::OK, "informational");
        assert_eq!(s.reasons_text(), "promoted at epoch 2");
    }

    #[test]
    fn the_wire_form_names_states_and_kinds() {
        let mut s = VolumeStatus::new("v", Role::Secondary);
        s.replica = ReplicaState::Outdated;
        s.set_reason(ReasonKind::WriteFailed, "write failed at sector 8");
        let json = serde_json::to_string(&s).expect("encode");
        assert!(json.contains(r#""replica":"Outdated""#), "{json}");
        assert!(
            json.contains(
                r#""reasons":[{"kind":"write-failed","message":"write failed at sector 8"}]"#
            ),
            "{json}"
        );
        let back: VolumeStatus = serde_json::from_str(&json).expect("decode");
        assert_eq!(back, s);
    }
}
