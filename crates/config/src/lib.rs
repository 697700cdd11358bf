//! Typed configuration of both roles (`source.toml`, `target.toml`).
//! Unknown keys are errors, so a typo never silently becomes a default;
//! every default is documented here and in docs/configuration.md. The
//! types serialise too ([`to_text`]): `replctl protect` writes the source
//! configuration from a [`SourceConfig`], leaving out what is at its
//! default.

#![warn(missing_docs)]

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Configuration errors.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("config {path}: {source}")]
    Io {
        /// File.
        path: PathBuf,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
    /// The file does not parse or names an unknown key.
    #[error("config {path}: {message}")]
    Parse {
        /// File.
        path: PathBuf,
        /// What toml says, including the offending key and line.
        message: String,
    },
    /// A value is out of range.
    #[error("config {path}: {message}")]
    Invalid {
        /// File.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A configuration cannot be written as TOML.
    #[error("config: {0}")]
    Serialize(#[from] toml::ser::Error),
}

/// TLS material (PEM files).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// The private CA that issued the peer's certificate; the only trust root.
    pub ca: PathBuf,
    /// This host's certificate chain.
    pub cert: PathBuf,
    /// This host's private key.
    pub key: PathBuf,
}

/// Where the source reads captured writes from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub enum RingSource {
    /// A ring file written by a userspace producer (development and tests).
    File(PathBuf),
    /// The kernel module's ring of this consistency group, via
    /// `/dev/dm-replica`.
    Group(String),
}

/// Segment batching and sealing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SegmentConfig {
    /// Upper bound of a segment's uncompressed records, bytes. Default 4 MiB.
    pub max_bytes: usize,
    /// zstd level. Default 1.
    pub zstd_level: i32,
    /// Compression/encryption worker threads. Default 2.
    pub workers: usize,
    /// Segments sealed but not yet sent, at most. Default 4.
    pub queue: usize,
}

impl Default for SegmentConfig {
    fn default() -> Self {
        Self {
            max_bytes: 4 << 20,
            zstd_level: 1,
            workers: 2,
            queue: 4,
        }
    }
}

/// The replication connection: deadlines, dead-peer detection and (on the
/// target) how many connections may wait unauthenticated.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NetworkConfig {
    /// The TLS handshake, the hello and the key confirmation of a new
    /// connection must be done within this, seconds. Default 10.
    pub handshake_timeout_secs: u64,
    /// A peer that sent nothing for this long is dead: the connection is
    /// closed (the source reconnects on its retry schedule). The source
    /// pings an idle stream so that silence means a dead path. Default 30.
    pub peer_timeout_secs: u64,
    /// TCP keepalive: idle seconds before the first probe (probes then
    /// every third of it, 3 unanswered probes close the socket). 0 turns
    /// it off. Default 10.
    pub keepalive_secs: u64,
    /// Target only: connections that have not yet proved their key, at
    /// most, from all addresses together; more are closed at once.
    /// Default 64.
    pub max_unauthenticated: usize,
    /// Target only: such connections from one address, at most. Default 8.
    pub max_unauthenticated_per_address: usize,
}

impl Default for NetworkConfig {
    fn default() -> Self {
        Self {
            handshake_timeout_secs: 10,
            peer_timeout_secs: 30,
            keepalive_secs: 10,
            max_unauthenticated: 64,
            max_unauthenticated_per_address: 8,
        }
    }
}

impl NetworkConfig {
    /// Range checks.
    fn check(&self) -> Result<(), String> {
        if !(1..=600).contains(&self.handshake_timeout_secs) {
            return Err("network.handshake_timeout_secs must be 1..=600".into());
        }
        if !(2..=3600).contains(&self.peer_timeout_secs) {
            return Err("network.peer_timeout_secs must be 2..=3600".into());
        }
        if self.keepalive_secs > 3600 {
            return Err("network.keepalive_secs must be 0 (off) ..=3600".into());
        }
        if self.max_unauthenticated == 0 || self.max_unauthenticated_per_address == 0 {
            return Err(
                "network.max_unauthenticated and network.max_unauthenticated_per_address must be at least 1"
                    .into(),
            );
        }
        Ok(())
    }
}

/// Backoff for recoverable errors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    /// Waits between attempts, seconds; the last one repeats. Default
    /// 60, 120, 240, 480, 600, then 1800 (1, 2, 4, 8, 10, 30 minutes).
    pub schedule_secs: Vec<f64>,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            schedule_secs: vec![60.0, 120.0, 240.0, 480.0, 600.0, 1800.0],
        }
    }
}

/// The source's local spool.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SpoolConfig {
    /// Directory (never on a protected volume; checked at start). Default
    /// `<state_dir>/spool`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dir: Option<PathBuf>,
    /// The spool is dropped for a resync when the records it holds for the
    /// target reach this share of the volume size, percent (above 100 keeps
    /// more than a volume's worth of changes, which a resync would send
    /// faster). Default 50.
    pub limit_percent: u32,
    /// An absolute limit in bytes as well (the smaller one applies); 0 for
    /// none. Default 0.
    pub limit_bytes: u64,
    /// Spool file size before a new file is started, bytes. Default 64 MiB.
    pub file_bytes: u64,
    /// Records written to the spool at a time, bytes. Default 1 MiB.
    pub chunk_bytes: usize,
    /// No longer used (accepted so older configurations still load): the
    /// dirty map's region is the resync chunk, `resync.chunk_kib`.
    pub region_kib: u64,
}

impl Default for SpoolConfig {
    fn default() -> Self {
        Self {
            dir: None,
            limit_percent: 50,
            limit_bytes: 0,
            file_bytes: 64 << 20,
            chunk_bytes: 1 << 20,
            region_kib: 64,
        }
    }
}

impl SpoolConfig {
    /// The limit for a volume of `volume_size` bytes.
    pub fn limit(&self, volume_size: u64) -> u64 {
        let pct = (u128::from(volume_size) * u128::from(self.limit_percent) / 100)
            .min(u128::from(u64::MAX)) as u64;
        if self.limit_bytes > 0 {
            pct.min(self.limit_bytes)
        } else {
            pct
        }
    }
}

/// The default of [`SourceConfig::control_device`].
pub fn default_control_device() -> String {
    replica_ring::device::CONTROL_DEVICE.to_string()
}

fn is_default_control_device(d: &str) -> bool {
    d == replica_ring::device::CONTROL_DEVICE
}

/// Whether `v` is its type's default (left out when serialised, so a
/// written file keeps following the defaults).
fn is_default<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
}

/// `replicad source` configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    /// Volume (or consistency group) id, as known to the target.
    pub volume: String,
    /// Size of the protected volume in bytes (records beyond it are refused).
    pub volume_size: u64,
    /// Where captured writes come from.
    pub ring: RingSource,
    /// Target address, `host:port`.
    pub target: String,
    /// Name the target's certificate must carry (DNS subject alt name).
    pub target_name: String,
    /// TLS material.
    pub tls: TlsConfig,
    /// Keyring file (mode 0600) shared with the target.
    pub keys: PathBuf,
    /// Directory for this daemon's own state (never on a protected volume).
    pub state_dir: PathBuf,
    /// Control socket (mode 0600). Default `<state_dir>/replicad.sock`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control_socket: Option<PathBuf>,
    /// The kernel module's control device, for `ring = { group = ... }`.
    /// Default `/dev/dm-replica`.
    #[serde(
        default = "default_control_device",
        skip_serializing_if = "is_default_control_device"
    )]
    pub control_device: String,
    /// Replication epoch this source is at. Default 1.
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub epoch: u64,
    /// Segment settings.
    #[serde(default, skip_serializing_if = "is_default")]
    pub segment: SegmentConfig,
    /// Retry settings.
    #[serde(default, skip_serializing_if = "is_default")]
    pub retry: RetryConfig,
    /// Connection deadlines and dead-peer detection.
    #[serde(default, skip_serializing_if = "is_default")]
    pub network: NetworkConfig,
    /// Local spool.
    #[serde(default, skip_serializing_if = "is_default")]
    pub spool: SpoolConfig,
    /// The protected volume's block device (e.g. `/dev/mapper/db1`), read
    /// during a resync. Without it a needed resync cannot start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<PathBuf>,
    /// Resync settings.
    #[serde(default, skip_serializing_if = "is_default")]
    pub resync: ResyncConfig,
    /// A target that holds no copy of the volume gets one first: every
    /// region is resent (a full resync) and the replica is inconsistent
    /// until it ends. `false` declares that the replica already holds what
    /// the volume held before the first captured record (both new and
    /// zeroed, or seeded from the same image); a target with no record of
    /// the volume then takes the stream from record 1 as it is, and still
    /// demands a full copy when the stream starts later. Default true.
    #[serde(default = "yes")]
    pub initial_copy: bool,
}

fn yes() -> bool {
    true
}

/// Resync pacing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ResyncConfig {
    /// No more regions are read while the spool holds this many bytes the
    /// target has not acknowledged. Default 64 MiB.
    pub window_bytes: u64,
    /// Bytes of one resync write (a run of dirty regions), at most.
    /// Default 1 MiB.
    pub max_write_bytes: u64,
    /// Chunk of a checksum resync and an online verify, KiB: the unit
    /// that is hashed on both sides and sent when it differs (also the
    /// region of the dirty map kept while a resync is needed). A power of
    /// two from 64 to 1024. Default 128 (the fastest measured, half the
    /// bytes of 256 for scattered changes).
    pub chunk_kib: u32,
}

impl Default for ResyncConfig {
    fn default() -> Self {
        Self {
            window_bytes: 64 << 20,
            max_write_bytes: 1 << 20,
            chunk_kib: 128,
        }
    }
}

impl SourceConfig {
    /// The spool directory in force.
    pub fn spool_dir(&self) -> PathBuf {
        self.spool
            .dir
            .clone()
            .unwrap_or_else(|| self.state_dir.join("spool"))
    }
}

/// One volume the target receives.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetVolume {
    /// Volume (or group) id.
    pub id: String,
    /// Volume size in bytes.
    pub size: u64,
    /// Replica storage.
    pub replica: ReplicaConfig,
    /// Certificate subjects (common names) allowed to replicate this volume.
    pub allowed_sources: Vec<String>,
    /// Recovery points to keep (oldest pruned first). Default 16.
    #[serde(default = "sixteen")]
    pub keep_points: usize,
    /// A committed flush becomes a crash-consistent recovery point only if
    /// the last point is at least this old, seconds (markers always make
    /// one). 0: every flush. Default 30.
    #[serde(default = "thirty")]
    pub crash_point_interval_secs: u64,
}

/// Replica storage backend.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case", tag = "backend")]
pub enum ReplicaConfig {
    /// A plain file (hosts without device-mapper); points are file copies.
    File {
        /// Replica image path.
        path: PathBuf,
    },
    /// A thin device in a dm-thin pool; points are thin snapshots.
    Thin(ThinConfig),
}

/// The dm-thin backend's settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ThinConfig {
    /// Device-mapper name of the thin pool (created by the administrator,
    /// with `error_if_no_space`).
    pub pool: String,
    /// Thin device id of the replica in the pool (0 to 2^24 - 1). Default:
    /// allocated by replicad; set it to adopt an existing thin device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_id: Option<u32>,
    /// Device-mapper name of the replica. Default `replica-<volume id>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Pool usage (data or metadata) in percent from which the volume
    /// reports a Warning, 1..=99. Default 80.
    #[serde(default = "eighty")]
    pub low_water_percent: u8,
}

impl ThinConfig {
    /// The replica's device-mapper name in force.
    pub fn name(&self, volume: &str) -> String {
        self.name
            .clone()
            .unwrap_or_else(|| format!("replica-{volume}"))
    }
}

/// A device-mapper name replicad may use: 1-100 of `[A-Za-z0-9._+-]`
/// (points and copies get a suffix; dm names are at most 127 bytes).
fn valid_dm_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 100
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.+".contains(&b))
        && name != "."
        && name != ".."
}

/// `replicad target` configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetConfig {
    /// Listen address, `host:port`.
    pub listen: String,
    /// TLS material.
    pub tls: TlsConfig,
    /// Keyring file (mode 0600) shared with the sources.
    pub keys: PathBuf,
    /// Directory for journals and state.
    pub state_dir: PathBuf,
    /// Control socket (mode 0600). Default `<state_dir>/replicad.sock`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control_socket: Option<PathBuf>,
    /// Journal file size before rotation, bytes. Default 64 MiB.
    #[serde(default = "journal_file_bytes")]
    pub journal_file_bytes: u64,
    /// Connection limits, deadlines and dead-peer detection.
    #[serde(default, skip_serializing_if = "is_default")]
    pub network: NetworkConfig,
    /// Volumes.
    #[serde(rename = "volume")]
    pub volumes: Vec<TargetVolume>,
}

fn one() -> u64 {
    1
}
fn is_one(v: &u64) -> bool {
    *v == 1
}
fn eighty() -> u8 {
    80
}
fn sixteen() -> usize {
    16
}
fn thirty() -> u64 {
    30
}
fn journal_file_bytes() -> u64 {
    64 << 20
}

fn read(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
        path: path.to_owned(),
        source,
    })
}

/// Parses configuration text (the path is only for messages).
pub fn parse<T: serde::de::DeserializeOwned>(path: &Path, text: &str) -> Result<T, ConfigError> {
    toml::from_str(text).map_err(|e| ConfigError::Parse {
        path: path.to_owned(),
        message: e.to_string(),
    })
}

/// Configuration text for `value` (what [`parse`] reads back).
pub fn to_text<T: Serialize>(value: &T) -> Result<String, ConfigError> {
    Ok(toml::to_string(value)?)
}

/// A volume (or group) id: 1-63 of `[A-Za-z0-9._-]`.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 63
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

impl SourceConfig {
    /// Loads and checks a source configuration.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        Self::from_text(path, &read(path)?)
    }

    /// Parses and checks source configuration text (`path` is named in
    /// the messages).
    pub fn from_text(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let c: Self = parse(path, text)?;
        c.check(path)?;
        Ok(c)
    }

    /// Range checks.
    pub fn check(&self, path: &Path) -> Result<(), ConfigError> {
        let bad = |m: String| {
            Err(ConfigError::Invalid {
                path: path.to_owned(),
                message: m,
            })
        };
        if !valid_id(&self.volume) {
            return bad(format!(
                "volume id {:?}: use 1-63 letters, digits, '-', '_' or '.'",
                self.volume
            ));
        }
        if self.volume_size == 0 || !self.volume_size.is_multiple_of(512) {
            return bad("volume_size must be a non-zero multiple of 512".into());
        }
        if self.segment.max_bytes < 64 << 10 || self.segment.max_bytes > 32 << 20 {
            return bad("segment.max_bytes must be between 64 KiB and 32 MiB".into());
        }
        if !(1..=19).contains(&self.segment.zstd_level) {
            return bad("segment.zstd_level must be 1..=19".into());
        }
        if self.segment.workers == 0 || self.segment.workers > 64 || self.segment.queue == 0 {
            return bad("segment.workers must be 1..=64 and segment.queue at least 1".into());
        }
        if self.retry.schedule_secs.is_empty()
            || self
                .retry
                .schedule_secs
                .iter()
                .any(|s| !(s.is_finite() && *s >= 0.0))
        {
            return bad(
                "retry.schedule_secs must be a non-empty list of non-negative seconds".into(),
            );
        }
        if self.epoch == 0 {
            return bad("epoch starts at 1".into());
        }
        if let Err(m) = self.network.check() {
            return bad(m);
        }
        if !(1..=10_000).contains(&self.spool.limit_percent) {
            return bad("spool.limit_percent must be 1..=10000".into());
        }
        if self.spool.file_bytes < 1 << 20 {
            return bad("spool.file_bytes must be at least 1 MiB".into());
        }
        if self.spool.chunk_bytes < 4096 || self.spool.chunk_bytes > 16 << 20 {
            return bad("spool.chunk_bytes must be between 4 KiB and 16 MiB".into());
        }
        if self.resync.window_bytes < 1 << 20 {
            return bad("resync.window_bytes must be at least 1 MiB".into());
        }
        if !(4096..=16 << 20).contains(&self.resync.max_write_bytes) {
            return bad("resync.max_write_bytes must be between 4 KiB and 16 MiB".into());
        }
        let (min, max) = (64, 1024);
        if !self.resync.chunk_kib.is_power_of_two() || !(min..=max).contains(&self.resync.chunk_kib)
        {
            return bad(format!(
                "resync.chunk_kib must be a power of two from {min} to {max}"
            ));
        }
        if !self.spool.region_kib.is_power_of_two()
            || !(4..=1 << 20).contains(&self.spool.region_kib)
        {
            return bad("spool.region_kib must be a power of two from 4 to 1048576".into());
        }
        Ok(())
    }
}

impl TargetConfig {
    /// Loads and checks a target configuration.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        Self::from_text(path, &read(path)?)
    }

    /// Parses and checks target configuration text (`path` is named in
    /// the messages).
    pub fn from_text(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let c: Self = parse(path, text)?;
        let bad = |m: String| {
            Err(ConfigError::Invalid {
                path: path.to_owned(),
                message: m,
            })
        };
        if let Err(m) = c.network.check() {
            return bad(m);
        }
        let mut seen = std::collections::HashSet::new();
        for v in &c.volumes {
            if !valid_id(&v.id) {
                return bad(format!(
                    "volume id {:?}: use 1-63 letters, digits, '-', '_' or '.'",
                    v.id
                ));
            }
            if !seen.insert(v.id.clone()) {
                return bad(format!("volume {} listed twice", v.id));
            }
            if v.size == 0 || !v.size.is_multiple_of(512) {
                return bad(format!(
                    "volume {}: size must be a non-zero multiple of 512",
                    v.id
                ));
            }
            if v.allowed_sources.is_empty() {
                return bad(format!(
                    "volume {}: allowed_sources is empty; nobody could replicate it",
                    v.id
                ));
            }
            if v.keep_points == 0 {
                return bad(format!("volume {}: keep_points must be at least 1", v.id));
            }
            if let ReplicaConfig::Thin(t) = &v.replica {
                if !valid_dm_name(&t.pool) {
                    return bad(format!(
                        "volume {}: replica.pool {:?} is not a device-mapper name",
                        v.id, t.pool
                    ));
                }
                let name = t.name(&v.id);
                if !valid_dm_name(&name) {
                    return bad(format!(
                        "volume {}: replica.name {name:?}: use 1-100 letters, digits, '-', '_', '.' or '+'",
                        v.id
                    ));
                }
                if name == t.pool {
                    return bad(format!("volume {}: replica.name is the pool's name", v.id));
                }
                if t.device_id.is_some_and(|id| id >= 1 << 24) {
                    return bad(format!(
                        "volume {}: replica.device_id must be below 16777216 (24 bits)",
                        v.id
                    ));
                }
                if !(1..=99).contains(&t.low_water_percent) {
                    return bad(format!(
                        "volume {}: replica.low_water_percent must be 1..=99",
                        v.id
                    ));
                }
                for o in &c.volumes {
                    if o.id == v.id {
                        continue;
                    }
                    if let ReplicaConfig::Thin(ot) = &o.replica {
                        if ot.name(&o.id) == name {
                            return bad(format!(
                                "volumes {} and {} use the same replica.name {name}",
                                o.id, v.id
                            ));
                        }
                        if ot.pool == t.pool && t.device_id.is_some() && ot.device_id == t.device_id
                        {
                            return bad(format!(
                                "volumes {} and {} use the same replica.device_id in pool {}",
                                o.id, v.id, t.pool
                            ));
                        }
                    }
                }
            }
        }
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SOURCE: &str = r#"
volume = "db1"
volume_size = 1048576
ring = { file = "/run/ring" }
target = "127.0.0.1:7700"
target_name = "target.example"
keys = "/etc/keys.toml"
state_dir = "/var/lib/replicad"
[tls]
ca = "ca.pem"
cert = "c.pem"
key = "k.pem"
"#;

    #[test]
    fn minimal_source_parses_with_defaults() {
        let c: SourceConfig = parse(Path::new("s.toml"), SOURCE).expect("parse");
        c.check(Path::new("s.toml")).expect("check");
        assert_eq!(c.segment.max_bytes, 4 << 20);
        assert_eq!(
            c.retry.schedule_secs,
            vec![60.0, 120.0, 240.0, 480.0, 600.0, 1800.0]
        );
        assert_eq!(c.epoch, 1);
    }

    #[test]
    fn unknown_key_is_named_in_the_error() {
        let text = SOURCE.replace("target_name", "target_nmae");
        let e = parse::<SourceConfig>(Path::new("s.toml"), &text)
            .expect_err("must fail")
            .to_string();
        assert!(e.contains("target_nmae"), "{e}");
        let text = format!("{SOURCE}\n[segment]\nzstd_levle = 3\n");
        let e = parse::<SourceConfig>(Path::new("s.toml"), &text)
            .expect_err("must fail")
            .to_string();
        assert!(e.contains("zstd_levle"), "{e}");
    }

    const TARGET: &str = r#"
listen = "127.0.0.1:0"
keys = "/etc/keys.toml"
state_dir = "/var/lib/replicad"
[tls]
ca = "ca.pem"
cert = "c.pem"
key = "k.pem"
[[volume]]
id = "db1"
size = 1048576
allowed_sources = ["s"]
replica = REPLICA
"#;

    fn target(replica: &str) -> Result<TargetConfig, String> {
        let d = tempfile::tempdir().expect("tmp");
        let p = d.path().join("t.toml");
        std::fs::write(&p, TARGET.replace("REPLICA", replica)).expect("write");
        TargetConfig::load(&p).map_err(|e| e.to_string())
    }

    #[test]
    fn thin_replica_config_parses_with_defaults() {
        let c = target(r#"{ backend = "thin", pool = "pool0" }"#).expect("parse");
        let ReplicaConfig::Thin(t) = &c.volumes[0].replica else {
            panic!("not thin: {:?}", c.volumes[0].replica)
        };
        assert_eq!(t.pool, "pool0");
        assert_eq!(t.device_id, None);
        assert_eq!(t.name("db1"), "replica-db1");
        assert_eq!(t.low_water_percent, 80);
        let c = target(
            r#"{ backend = "thin", pool = "pool0", device_id = 7, name = "db1-rep", low_water_percent = 90 }"#,
        )
        .expect("parse");
        assert_eq!(
            c.volumes[0].replica,
            ReplicaConfig::Thin(ThinConfig {
                pool: "pool0".into(),
                device_id: Some(7),
                name: Some("db1-rep".into()),
                low_water_percent: 90
            })
        );
    }

    #[test]
    fn bad_thin_replica_configs_are_refused() {
        for (replica, want) in [
            (
                r#"{ backend = "thin", pool = "pool0", devid = 1 }"#,
                "devid",
            ),
            (r#"{ backend = "thin" }"#, "pool"),
            (
                r#"{ backend = "thin", pool = "a/b" }"#,
                "not a device-mapper name",
            ),
            (
                r#"{ backend = "thin", pool = "p", name = "p" }"#,
                "pool's name",
            ),
            (
                r#"{ backend = "thin", pool = "p", name = "x y" }"#,
                "replica.name",
            ),
            (
                r#"{ backend = "thin", pool = "p", device_id = 16777216 }"#,
                "24 bits",
            ),
            (
                r#"{ backend = "thin", pool = "p", low_water_percent = 0 }"#,
                "low_water_percent",
            ),
            (
                r#"{ backend = "thin", pool = "p", low_water_percent = 100 }"#,
                "low_water_percent",
            ),
            (r#"{ backend = "lvm", pool = "p" }"#, "lvm"),
        ] {
            let e = target(replica).expect_err(replica);
            assert!(e.contains(want), "{replica}: {e}");
        }
    }

    #[test]
    fn two_volumes_cannot_share_a_thin_name_or_id() {
        let two = |a: &str, b: &str| {
            let text = format!(
                "{}\n[[volume]]\nid = \"db2\"\nsize = 1048576\nallowed_sources = [\"s\"]\nreplica = {b}\n",
                TARGET.replace("REPLICA", a)
            );
            let d = tempfile::tempdir().expect("tmp");
            let p = d.path().join("t.toml");
            std::fs::write(&p, text).expect("write");
            TargetConfig::load(&p).map_err(|e| e.to_string())
        };
        let e = two(
            r#"{ backend = "thin", pool = "p", name = "same" }"#,
            r#"{ backend = "thin", pool = "p", name = "same" }"#,
        )
        .expect_err("same name");
        assert!(e.contains("same replica.name"), "{e}");
        let e = two(
            r#"{ backend = "thin", pool = "p", device_id = 3 }"#,
            r#"{ backend = "thin", pool = "p", device_id = 3 }"#,
        )
        .expect_err("same id");
        assert!(e.contains("same replica.device_id"), "{e}");
        two(
            r#"{ backend = "thin", pool = "p" }"#,
            r#"{ backend = "thin", pool = "p" }"#,
        )
        .expect("distinct default names, allocated ids");
    }

    #[test]
    fn out_of_range_values_are_refused() {
        let text = format!("{SOURCE}\n[segment]\nzstd_level = 40\n");
        let c: SourceConfig = parse(Path::new("s.toml"), &text).expect("parse");
        assert!(c
            .check(Path::new("s.toml"))
            .expect_err("must fail")
            .to_string()
            .contains("zstd_level"));
        // Chunks: a power of two from 64 to 1024 KiB.
        for bad in [32, 96, 2048, 0] {
            let text = format!("{SOURCE}\n[resync]\nchunk_kib = {bad}\n");
            let c: SourceConfig = parse(Path::new("s.toml"), &text).expect("parse");
            let e = c.check(Path::new("s.toml")).expect_err("must fail").to_string();
            assert!(e.contains("resync.chunk_kib"), "{bad}: {e}");
        }
        for good in [64, 128, 1024] {
            let text = format!("{SOURCE}\n[resync]\nchunk_kib = {good}\n");
            let c: SourceConfig = parse(Path::new("s.toml"), &text).expect("parse");
            c.check(Path::new("s.toml")).expect("in range");
        }
    }

    #[test]
    fn a_source_configuration_round_trips_through_its_text_and_leaves_defaults_out() {
        let odd = |name: &str| PathBuf::from(format!("/srv/dm replica/it's \"{name}\"\\x"));
        let c: SourceConfig = parse(Path::new("s.toml"), SOURCE).expect("parse");
        let c = SourceConfig {
            ring: RingSource::Group("g \"1\"".into()),
            keys: odd("keys.toml"),
            state_dir: odd("state"),
            device: Some(odd("dev")),
            tls: TlsConfig {
                ca: odd("ca.pem"),
                cert: odd("c.pem"),
                key: odd("k.pem"),
            },
            initial_copy: false,
            ..c
        };
        let text = to_text(&c).expect("toml");
        let back: SourceConfig = parse(Path::new("s.toml"), &text).expect(&text);
        assert_eq!(back, c, "{text}");
        back.check(Path::new("s.toml")).expect("check");
        // Defaults are not written, so the file keeps following them.
        for key in ["segment", "retry", "spool", "resync", "epoch", "control_"] {
            assert!(!text.contains(key), "{key} in {text}");
        }
        // What is not at its default is.
        let c = SourceConfig {
            epoch: 3,
            segment: SegmentConfig {
                zstd_level: 5,
                ..SegmentConfig::default()
            },
            ..c
        };
        let text = to_text(&c).expect("toml");
        assert!(
            text.contains("epoch = 3") && text.contains("zstd_level = 5"),
            "{text}"
        );
        assert_eq!(
            parse::<SourceConfig>(Path::new("s.toml"), &text).expect("parse"),
            c
        );
    }

    #[test]
    fn a_target_configuration_round_trips_through_its_text() {
        let text = format!(
            "{}\n[[volume]]\nid = \"b\"\nsize = 4096\nallowed_sources = [\"s\"]\nreplica = {{ backend = \"thin\", pool = \"p\", device_id = 7 }}\n",
            TARGET.replace("REPLICA", r#"{ backend = "file", path = "/r/a \"b\".img" }"#)
        );
        let d = tempfile::tempdir().expect("tmp");
        let (first, again) = (d.path().join("t.toml"), d.path().join("again.toml"));
        std::fs::write(&first, text).expect("w");
        let c = TargetConfig::load(&first).expect("load");
        assert_eq!(c.volumes.len(), 2);
        std::fs::write(&again, to_text(&c).expect("toml")).expect("w");
        assert_eq!(TargetConfig::load(&again).expect("load again"), c);
    }
}
