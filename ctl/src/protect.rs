//! Protecting a volume: the `replica` table over it, the source's
//! configuration, boot-time activation, the initial copy; and undoing it.
//!
//! Each protected volume has an activation entry,
//! `<config_dir>/protected/<volume>.toml`, from which `replctl activate`
//! re-creates its device-mapper table at boot (before filesystems mount),
//! and a source configuration, `<config_dir>/source-<volume>.toml`, read by
//! `replicad-source@<volume>.service`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use replica_config::{ConfigError, RingSource, SourceConfig, TlsConfig};
use replica_control::ControlError;
use replica_dm::{Control, DeviceMapper, DmError, Errno};
use serde::{Deserialize, Serialize};

use crate::error::Exit;

/// Why a volume could not be protected, activated or unprotected.
#[derive(Debug, thiserror::Error)]
pub enum ProtectError {
    /// Not a volume id.
    #[error("volume id {0:?}: use 1-63 letters, digits, '-', '_' or '.'")]
    BadVolumeId(String),
    /// The data device is not a usable block device.
    #[error(transparent)]
    Device(#[from] replica_dm::DeviceError),
    /// The activation entry's table line does not parse.
    #[error(transparent)]
    Table(#[from] replica_dm::TableError),
    /// The device's size cannot be read from sysfs.
    #[error("{}: {why}", path.display())]
    Size {
        /// The sysfs file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// A device-mapper device of that name exists.
    #[error("a device-mapper device named {0} exists already")]
    Exists(String),
    /// Creating the table failed.
    #[error("create /dev/mapper/{volume}: {source}")]
    Create {
        /// The volume.
        volume: String,
        /// device-mapper's error.
        #[source]
        source: DmError,
    },
    /// Removing the table failed.
    #[error("{source} (unmount the filesystem on /dev/mapper/{volume} first)")]
    Remove {
        /// The volume.
        volume: String,
        /// device-mapper's error.
        #[source]
        source: DmError,
    },
    /// The source configuration does not check.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// `replicad check source` refused the configuration.
    #[error("replicad source cannot start: {0}")]
    CannotStart(String),
    /// `replicad check source` cannot be run.
    #[error("run {} check source: {source}", exe.display())]
    Check {
        /// The daemon binary.
        exe: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// `replicad check source` ended other than with a verdict.
    #[error("{} check source ended with {status}: {stderr}", exe.display())]
    CheckDied {
        /// The daemon binary.
        exe: PathBuf,
        /// How it ended.
        status: ExitStatus,
        /// What it said.
        stderr: String,
    },
    /// An activation entry does not parse.
    #[error("{}: {source}", path.display())]
    Entry {
        /// The entry.
        path: PathBuf,
        /// What TOML says.
        #[source]
        source: toml::de::Error,
    },
    /// Some volumes could not be activated.
    #[error("{}", .0.iter().map(|(v, e)| format!("{v}: {e}")).collect::<Vec<_>>().join("; "))]
    Activate(Vec<(String, ProtectError)>),
    /// Asking the source daemon to stop failed.
    #[error(transparent)]
    Control(#[from] ControlError),
    /// The source daemon was asked to stop and did not.
    #[error("the source daemon did not stop within {0:?}")]
    DidNotStop(Duration),
    /// A file protect reads or writes.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

impl ProtectError {
    fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Self + '_ {
        move |source| Self::Io {
            path: path.to_owned(),
            source,
        }
    }

    /// The exit code.
    pub fn exit(&self) -> Exit {
        match self {
            Self::BadVolumeId(_) => Exit::Usage,
            Self::Exists(_) | Self::Config(_) | Self::CannotStart(_) => Exit::Refused,
            Self::Remove { source, .. } if source.errno() == Some(Errno::EBUSY) => Exit::Refused,
            Self::Check { source, .. } | Self::Io { source, .. } => Exit::of_io(source),
            Self::Control(e) => Exit::of_control(e),
            Self::Activate(errors) => errors.first().map_or(Exit::Failed, |(_, e)| e.exit()),
            Self::Device(_)
            | Self::Table(_)
            | Self::Size { .. }
            | Self::Create { .. }
            | Self::Remove { .. }
            | Self::CheckDied { .. }
            | Self::Entry { .. }
            | Self::DidNotStop(_) => Exit::Failed,
        }
    }
}

/// How a protected volume's table is built (one file per volume).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Activation {
    /// Volume id (also the device-mapper name: `/dev/mapper/<volume>`).
    pub volume: String,
    /// The device holding the data (a stable path, e.g. /dev/disk/by-id/...).
    pub data_device: PathBuf,
    /// Consistency group.
    pub group: String,
    /// Ring size of the group, MiB.
    pub ring_mib: u32,
    /// Dirty-region size, KiB.
    pub region_kib: u32,
    /// How long writers may wait for ring space, ms.
    pub overflow_wait_ms: u32,
}

impl Activation {
    /// The table line for a data device of `sectors` sectors.
    pub fn table(&self, sectors: u64) -> String {
        format!(
            "0 {sectors} replica {} {} group={} ring_mib={} region_kib={} overflow_wait_ms={}",
            self.data_device.display(),
            self.volume,
            self.group,
            self.ring_mib,
            self.region_kib,
            self.overflow_wait_ms
        )
    }

    fn path(config_dir: &Path, volume: &str) -> PathBuf {
        config_dir.join("protected").join(format!("{volume}.toml"))
    }

    /// Every entry in `config_dir`, sorted by volume.
    pub fn all(config_dir: &Path) -> Result<Vec<Self>, ProtectError> {
        let dir = config_dir.join("protected");
        let rd = match std::fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(ProtectError::io(&dir)(e)),
        };
        let mut out = Vec::new();
        for e in rd.flatten() {
            let p = e.path();
            if p.extension().is_some_and(|x| x == "toml") {
                let text = std::fs::read_to_string(&p).map_err(ProtectError::io(&p))?;
                out.push(
                    toml::from_str(&text)
                        .map_err(|source| ProtectError::Entry { path: p, source })?,
                );
            }
        }
        out.sort_by(|a: &Self, b: &Self| a.volume.cmp(&b.volume));
        Ok(out)
    }
}

/// What `replctl protect` needs.
#[derive(Debug, Clone)]
pub struct ProtectOpts {
    /// The device to protect.
    pub device: PathBuf,
    /// Volume id.
    pub volume: String,
    /// Consistency group (default: the volume id).
    pub group: Option<String>,
    /// Ring size, MiB.
    pub ring_mib: u32,
    /// Target `host:port`.
    pub target: String,
    /// Name in the target's certificate.
    pub target_name: String,
    /// CA, certificate and key of this host.
    pub ca: PathBuf,
    /// This host's certificate.
    pub cert: PathBuf,
    /// This host's key.
    pub key: PathBuf,
    /// Keyring.
    pub keys: PathBuf,
    /// Configuration directory.
    pub config_dir: PathBuf,
    /// The source's state directory.
    pub state_dir: PathBuf,
    /// A target without a copy gets a full copy first (`--no-initial-copy`
    /// declares the replica identical already).
    pub initial_copy: bool,
    /// The `replicad` binary (checks the configuration, and is started
    /// with `--spawn`).
    pub replicad: PathBuf,
}

/// `replicad` next to the running executable, else on PATH.
pub fn replicad_exe() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join("replicad")))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("replicad"))
}

fn dm() -> Control {
    Control::default()
}

/// Size of block device `dev` in 512-byte sectors (from sysfs).
pub fn sectors(dev: &Path) -> Result<u64, ProtectError> {
    let p = replica_dm::block_sysfs(dev)?.join("size");
    let size = |why: String| ProtectError::Size {
        path: p.clone(),
        why,
    };
    std::fs::read_to_string(&p)
        .map_err(|e| size(e.to_string()))?
        .trim()
        .parse()
        .map_err(|e: std::num::ParseIntError| size(e.to_string()))
}

fn exists(name: &str) -> bool {
    dm().info(name).is_ok_and(|i| i.is_some())
}

/// Waits, up to `patience`, until nobody holds device `name` open.
fn wait_unopened(name: &str, patience: Duration) {
    let deadline = Instant::now() + patience;
    while dm()
        .info(name)
        .is_ok_and(|i| i.is_some_and(|i| i.open_count > 0))
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Creates the table of one entry unless it exists (loading the module
/// first if needed).
pub fn activate_one(a: &Activation) -> Result<bool, ProtectError> {
    if exists(&a.volume) {
        return Ok(false);
    }
    if !Path::new("/dev/dm-replica").exists() {
        let _ = Command::new("modprobe").arg("dm_replica").status();
    }
    let n = sectors(&a.data_device)?;
    let table = a.table(n).parse::<replica_dm::Table>()?;
    dm().create(&a.volume, &table, false)
        .map_err(|source| ProtectError::Create {
            volume: a.volume.clone(),
            source,
        })?;
    Ok(true)
}

/// Re-creates every protected volume's table (at boot).
pub fn activate(config_dir: &Path) -> Result<Vec<String>, ProtectError> {
    let mut done = Vec::new();
    let mut errors = Vec::new();
    for a in Activation::all(config_dir)? {
        match activate_one(&a) {
            Ok(true) => done.push(format!(
                "{}: created over {}",
                a.volume,
                a.data_device.display()
            )),
            Ok(false) => done.push(format!("{}: already active", a.volume)),
            Err(e) => errors.push((a.volume, e)),
        }
    }
    if errors.is_empty() {
        Ok(done)
    } else {
        Err(ProtectError::Activate(errors))
    }
}

/// The source configuration `protect` writes for `o` (consistency group
/// `group`, a volume of `volume_size` bytes).
pub fn source_config(o: &ProtectOpts, group: &str, volume_size: u64) -> SourceConfig {
    SourceConfig {
        volume: o.volume.clone(),
        volume_size,
        ring: RingSource::Group(group.to_owned()),
        target: o.target.clone(),
        target_name: o.target_name.clone(),
        tls: TlsConfig {
            ca: o.ca.clone(),
            cert: o.cert.clone(),
            key: o.key.clone(),
        },
        keys: o.keys.clone(),
        state_dir: o.state_dir.clone(),
        control_socket: None,
        control_device: replica_config::default_control_device(),
        epoch: 1,
        segment: Default::default(),
        retry: Default::default(),
        network: Default::default(),
        spool: Default::default(),
        device: Some(PathBuf::from("/dev/mapper").join(&o.volume)),
        resync: Default::default(),
        initial_copy: o.initial_copy,
    }
}

/// The text of a source configuration as `protect` writes it.
pub fn source_config_text(c: &SourceConfig) -> Result<String, ProtectError> {
    Ok(format!(
        "# Written by replctl protect.\n{}",
        replica_config::to_text(c)?
    ))
}

/// Checks source configuration `text` (to be written to `path`) as
/// `replicad source` will load it (its checks, with `path` in their
/// messages), then runs `<replicad> check source` on it, which checks what
/// the daemon needs to start with it (keyring, certificates, state
/// directory) with the daemon's own loaders: a daemon that cannot start is
/// refused here, with its reason, instead of after it was started.
pub fn check_source(replicad: &Path, path: &Path, text: &str) -> Result<(), ProtectError> {
    let c: SourceConfig = replica_config::parse(path, text)?;
    c.check(path)?;
    let run = |source| ProtectError::Check {
        exe: replicad.to_owned(),
        source,
    };
    let mut child = Command::new(replicad)
        .args(["check", "source", "--config", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(run)?;
    let written = child
        .stdin
        .take()
        .map_or(Ok(()), |mut i| i.write_all(text.as_bytes()));
    let out = child.wait_with_output().map_err(run)?;
    let said = String::from_utf8_lossy(&out.stderr);
    let said = said.trim();
    match out.status.code() {
        Some(0) => written.map_err(run),
        Some(CHECK_REFUSED) => Err(ProtectError::CannotStart(
            said.strip_prefix("replicad: ").unwrap_or(said).to_owned(),
        )),
        _ => Err(ProtectError::CheckDied {
            exe: replicad.to_owned(),
            status: out.status,
            stderr: said.to_owned(),
        }),
    }
}

/// `replicad check`'s exit status for a configuration it refuses (its
/// "cannot start" code, docs/operations.md).
const CHECK_REFUSED: i32 = 2;

/// Writes the activation entry and the source configuration, and creates
/// the table. Returns the path of the source configuration.
pub fn protect(o: &ProtectOpts) -> Result<PathBuf, ProtectError> {
    if !replica_config::valid_id(&o.volume) {
        return Err(ProtectError::BadVolumeId(o.volume.clone()));
    }
    let n = sectors(&o.device)?;
    if exists(&o.volume) {
        return Err(ProtectError::Exists(o.volume.clone()));
    }
    let entry = Activation {
        volume: o.volume.clone(),
        data_device: o.device.clone(),
        group: o.group.clone().unwrap_or_else(|| o.volume.clone()),
        ring_mib: o.ring_mib,
        region_kib: 64,
        overflow_wait_ms: 100,
    };
    let cfg = source_config_text(&source_config(o, &entry.group, n * 512))?;
    let cfg_path = o.config_dir.join(format!("source-{}.toml", o.volume));
    // Checked before anything is created.
    check_source(&o.replicad, &cfg_path, &cfg)?;
    let act_path = Activation::path(&o.config_dir, &o.volume);
    std::fs::create_dir_all(act_path.parent().unwrap_or(&o.config_dir))
        .map_err(ProtectError::io(&o.config_dir))?;
    let entry_text = replica_config::to_text(&entry)?;
    std::fs::write(&act_path, entry_text).map_err(ProtectError::io(&act_path))?;
    std::fs::write(&cfg_path, cfg).map_err(ProtectError::io(&cfg_path))?;
    if let Err(e) = activate_one(&entry) {
        let _ = std::fs::remove_file(&act_path);
        let _ = std::fs::remove_file(&cfg_path);
        return Err(e);
    }
    Ok(cfg_path)
}

/// Stops replicating `volume` and removes its table, activation entry and
/// configuration; the data device keeps the data. The daemon must have
/// stopped (or is stopped through its control socket).
pub fn unprotect(
    config_dir: &Path,
    volume: &str,
    keep_state: bool,
) -> Result<Vec<String>, ProtectError> {
    use replica_control::{request, Command};
    let mut done = Vec::new();
    let mut stopped = false;
    let cfg_path = config_dir.join(format!("source-{volume}.toml"));
    let state_dir = std::fs::read_to_string(&cfg_path)
        .ok()
        .and_then(|t| replica_config::parse::<SourceConfig>(&cfg_path, &t).ok())
        .map(|c| c.state_dir);
    if let Some(sd) = &state_dir {
        let sock = replica_control::default_path(sd);
        if request(&sock, Command::Stop).is_ok() {
            let patience = Duration::from_secs(60);
            let deadline = Instant::now() + patience;
            while request(&sock, Command::Status).is_ok() {
                if Instant::now() > deadline {
                    return Err(ProtectError::DidNotStop(patience));
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            done.push("source daemon stopped".into());
            stopped = true;
        }
    }
    // A daemon that stopped answering may still write its last status: it
    // owns the state directory until its process exits. Nothing is removed
    // before it is gone.
    let _owned = match &state_dir {
        Some(sd) if sd.exists() => {
            let patience = Duration::from_secs(60);
            Some(
                replica_fs::DirLock::wait(sd, patience)
                    .map_err(|e| ProtectError::io(sd)(e.source))?
                    .ok_or(ProtectError::DidNotStop(patience))?,
            )
        }
        _ => None,
    };
    if exists(volume) {
        if stopped {
            // It stops answering before its process exits and lets go of
            // the volume.
            wait_unopened(volume, Duration::from_secs(10));
        }
        dm().remove(volume).map_err(|source| ProtectError::Remove {
            volume: volume.to_owned(),
            source,
        })?;
        done.push(format!(
            "/dev/mapper/{volume} removed (the data device keeps the data)"
        ));
    }
    for p in [Activation::path(config_dir, volume), cfg_path] {
        match std::fs::remove_file(&p) {
            Ok(()) => done.push(format!("{} removed", p.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(ProtectError::io(&p)(e)),
        }
    }
    if let (Some(sd), false) = (&state_dir, keep_state) {
        if sd.exists() {
            std::fs::remove_dir_all(sd).map_err(ProtectError::io(sd))?;
            done.push(format!("{} removed", sd.display()));
        }
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn activation_entries_round_trip_and_build_the_table() {
        let d = tempfile::tempdir().expect("tmp");
        let a = Activation {
            volume: "db1".into(),
            data_device: "/dev/disk/by-id/virtio-db1".into(),
            group: "app".into(),
            ring_mib: 64,
            region_kib: 64,
            overflow_wait_ms: 100,
        };
        std::fs::create_dir_all(d.path().join("protected")).expect("mk");
        std::fs::write(
            Activation::path(d.path(), "db1"),
            toml::to_string(&a).expect("toml"),
        )
        .expect("w");
        std::fs::write(d.path().join("protected/README"), "not an entry").expect("w");
        assert_eq!(Activation::all(d.path()).expect("all"), vec![a.clone()]);
        assert_eq!(
            a.table(2048),
            "0 2048 replica /dev/disk/by-id/virtio-db1 db1 group=app ring_mib=64 region_kib=64 overflow_wait_ms=100"
        );
        std::fs::write(Activation::path(d.path(), "bad"), "volume = 1").expect("w");
        assert!(Activation::all(d.path()).is_err());
    }

    #[test]
    fn a_regular_file_cannot_be_protected() {
        let d = tempfile::tempdir().expect("tmp");
        let f = d.path().join("img");
        std::fs::write(&f, vec![0u8; 4096]).expect("w");
        let e = sectors(&f).expect_err("not a block device");
        assert!(matches!(e, ProtectError::Device(_)), "{e:?}");
        assert!(e.to_string().contains("not a block device"), "{e}");
    }
}
