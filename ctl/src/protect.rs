//! Protecting a volume: the `replica` table over it, the source's
//! configuration, boot-time activation, the initial copy; and undoing it.
//!
//! Each protected volume has an activation entry,
//! `<config_dir>/protected/<volume>.toml`, from which `replctl activate`
//! re-creates its device-mapper table at boot (before filesystems mount),
//! and a source configuration, `<config_dir>/source-<volume>.toml`, read by
//! `replicad-source@<volume>.service`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use replica_store::thin::dmsetup::Dmsetup;
use serde::{Deserialize, Serialize};

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
    pub fn all(config_dir: &Path) -> Result<Vec<Self>, String> {
        let dir = config_dir.join("protected");
        let rd = match std::fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(format!("{}: {e}", dir.display())),
        };
        let mut out = Vec::new();
        for e in rd.flatten() {
            let p = e.path();
            if p.extension().is_some_and(|x| x == "toml") {
                let text =
                    std::fs::read_to_string(&p).map_err(|e| format!("{}: {e}", p.display()))?;
                out.push(toml::from_str(&text).map_err(|e| format!("{}: {e}", p.display()))?);
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
}

fn dm() -> Dmsetup {
    Dmsetup::default()
}

/// Size of block device `dev` in 512-byte sectors (from sysfs).
pub fn sectors(dev: &Path) -> Result<u64, String> {
    let p = format!("{}/size", replicad::source::failover::block_sysfs(dev)?);
    std::fs::read_to_string(&p)
        .map_err(|e| format!("{p}: {e}"))?
        .trim()
        .parse()
        .map_err(|e| format!("{p}: {e}"))
}

fn exists(name: &str) -> bool {
    dm().info(name).is_ok_and(|i| i.is_some())
}

/// Creates the table of one entry unless it exists (loading the module
/// first if needed).
pub fn activate_one(a: &Activation) -> Result<bool, String> {
    if exists(&a.volume) {
        return Ok(false);
    }
    if !Path::new("/dev/dm-replica").exists() {
        let _ = Command::new("modprobe").arg("dm_replica").status();
    }
    let n = sectors(&a.data_device)?;
    dm().create(&a.volume, &a.table(n), false)
        .map_err(|e| e.to_string())?;
    Ok(true)
}

/// Re-creates every protected volume's table (at boot).
pub fn activate(config_dir: &Path) -> Result<Vec<String>, String> {
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
            Err(e) => errors.push(format!("{}: {e}", a.volume)),
        }
    }
    if errors.is_empty() {
        Ok(done)
    } else {
        Err(errors.join("; "))
    }
}

/// The source configuration `protect` writes for `o` (consistency group
/// `group`, a volume of `volume_size` bytes).
pub fn source_config(o: &ProtectOpts, group: &str, volume_size: u64) -> String {
    format!(
        "# Written by replctl protect.\nvolume = \"{v}\"\nvolume_size = {size}\nring = {{ group = \"{g}\" }}\ndevice = \"/dev/mapper/{v}\"\ntarget = \"{t}\"\ntarget_name = \"{tn}\"\nkeys = \"{k}\"\nstate_dir = \"{sd}\"\ninitial_copy = {ic}\n\n[tls]\nca = \"{ca}\"\ncert = \"{cert}\"\nkey = \"{key}\"\n",
        v = o.volume,
        size = volume_size,
        g = group,
        t = o.target,
        tn = o.target_name,
        k = o.keys.display(),
        sd = o.state_dir.display(),
        ic = o.initial_copy,
        ca = o.ca.display(),
        cert = o.cert.display(),
        key = o.key.display(),
    )
}

/// Checks source configuration `text` (to be written to `path`) as
/// `replicad source` will load it, and what the daemon needs to start with
/// it (keyring, certificates, state directory), with the daemon's own
/// loaders: a daemon that cannot start is refused here, with its reason,
/// instead of after it was started.
pub fn check_source(path: &Path, text: &str) -> Result<(), String> {
    let c: replicad::config::SourceConfig =
        replicad::config::parse(path, text).map_err(|e| e.to_string())?;
    c.check(path).map_err(|e| e.to_string())?;
    replicad::cli::check_source_start(&c).map_err(|e| format!("replicad source cannot start: {e}"))
}

/// Writes the activation entry and the source configuration, and creates
/// the table. Returns the path of the source configuration.
pub fn protect(o: &ProtectOpts) -> Result<PathBuf, String> {
    if !replicad::config::valid_id(&o.volume) {
        return Err(format!(
            "volume id {:?}: use 1-63 letters, digits, '-', '_' or '.'",
            o.volume
        ));
    }
    let n = sectors(&o.device)?;
    if exists(&o.volume) {
        return Err(format!(
            "a device-mapper device named {} exists already",
            o.volume
        ));
    }
    let entry = Activation {
        volume: o.volume.clone(),
        data_device: o.device.clone(),
        group: o.group.clone().unwrap_or_else(|| o.volume.clone()),
        ring_mib: o.ring_mib,
        region_kib: 64,
        overflow_wait_ms: 100,
    };
    let cfg = source_config(o, &entry.group, n * 512);
    let cfg_path = o.config_dir.join(format!("source-{}.toml", o.volume));
    // Checked before anything is created.
    check_source(&cfg_path, &cfg)?;
    let act_path = Activation::path(&o.config_dir, &o.volume);
    std::fs::create_dir_all(act_path.parent().unwrap_or(&o.config_dir))
        .map_err(|e| format!("{}: {e}", o.config_dir.display()))?;
    std::fs::write(
        &act_path,
        toml::to_string(&entry).map_err(|e| e.to_string())?,
    )
    .map_err(|e| format!("{}: {e}", act_path.display()))?;
    std::fs::write(&cfg_path, cfg).map_err(|e| format!("{}: {e}", cfg_path.display()))?;
    if let Err(e) = activate_one(&entry) {
        let _ = std::fs::remove_file(&act_path);
        let _ = std::fs::remove_file(&cfg_path);
        return Err(e);
    }
    Ok(cfg_path)
}

/// Waits up to `timeout` until the daemon answers on `socket`.
pub fn wait_daemon(socket: &Path, timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        match replicad::control::request(socket, "status") {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() > deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// A source daemon `replctl protect` started, watched until it answers.
#[derive(Debug)]
pub enum Started {
    /// A background process (`--spawn`), its stderr in `log`.
    Spawned {
        /// The daemon.
        child: std::process::Child,
        /// Its log.
        log: PathBuf,
    },
    /// A systemd unit.
    Unit(String),
}

/// Starts `<exe> source --config <cfg>` in the background, its stderr in
/// `<state_dir>/replicad.log`.
pub fn spawn_source(exe: &Path, cfg: &Path, state_dir: &Path) -> Result<Started, String> {
    std::fs::create_dir_all(state_dir).map_err(|e| format!("{}: {e}", state_dir.display()))?;
    let log = state_dir.join("replicad.log");
    let err = std::fs::File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?;
    let child = Command::new(exe)
        .args(["source", "--config"])
        .arg(cfg)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(err)
        .spawn()
        .map_err(|e| format!("start {}: {e}", exe.display()))?;
    Ok(Started::Spawned { child, log })
}

/// `systemctl enable --now <unit>`; if the unit does not start, its state
/// and journal say why.
pub fn start_unit(unit: &str) -> Result<Started, String> {
    let ok = Command::new("systemctl")
        .args(["enable", "--now", unit])
        .status()
        .map_err(|e| format!("systemctl: {e}"))?
        .success();
    if !ok {
        return Err(format!(
            "systemctl enable --now {unit} failed{}",
            unit_report(unit)
        ));
    }
    Ok(Started::Unit(unit.to_owned()))
}

/// The last `n` lines of `path` (or why it cannot be read).
pub fn log_tail(path: &Path, n: usize) -> String {
    match std::fs::read(path) {
        Ok(b) => {
            let text = String::from_utf8_lossy(&b);
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(n)..].join("\n")
        }
        Err(e) => format!("({}: {e})", path.display()),
    }
}

/// Whether a unit's `systemctl show` properties say it is not running
/// (failed, stopped, or waiting to be restarted after a failure); the state
/// as text if so.
pub fn unit_stopped(show: &str) -> Option<String> {
    let get = |k: &str| {
        show.lines()
            .find_map(|l| l.strip_prefix(k).and_then(|v| v.strip_prefix('=')))
            .unwrap_or("")
    };
    let (active, sub) = (get("ActiveState"), get("SubState"));
    (active == "failed" || active == "inactive" || sub == "auto-restart").then(|| {
        format!(
            "{active} ({sub}), result {}, exit status {}",
            get("Result"),
            get("ExecMainStatus")
        )
    })
}

fn unit_show(unit: &str) -> String {
    Command::new("systemctl")
        .args([
            "show",
            unit,
            "--property=ActiveState,SubState,Result,ExecMainStatus",
        ])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// The unit's state and the tail of its journal, for an error message.
fn unit_report(unit: &str) -> String {
    let state = unit_stopped(&unit_show(unit)).unwrap_or_else(|| "running".into());
    let journal = Command::new("journalctl")
        .args(["-u", unit, "-n", "20", "--no-pager", "-o", "cat"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_else(|e| format!("(journalctl: {e})"));
    format!(
        ": {unit} is {state}; the end of its journal (journalctl -u {unit}):\n{}",
        journal.trim_end()
    )
}

/// Waits up to `timeout` until the daemon `started` answers on `socket`;
/// fails at once, with its exit status and the end of its log (or its
/// unit's state and journal), if it stops before.
pub fn wait_started(socket: &Path, started: &mut Started, timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        let answer = replicad::control::request(socket, "status");
        if answer.is_ok() {
            return Ok(());
        }
        match started {
            Started::Spawned { child, log } => {
                if let Some(st) = child
                    .try_wait()
                    .map_err(|e| format!("replicad source: {e}"))?
                {
                    return Err(format!(
                        "replicad source exited ({st}) before it answered on {}; the end of its log {}:\n{}",
                        socket.display(),
                        log.display(),
                        log_tail(log, 20)
                    ));
                }
            }
            Started::Unit(unit) => {
                if unit_stopped(&unit_show(unit)).is_some() {
                    return Err(format!(
                        "replicad source stopped before it answered on {}{}",
                        socket.display(),
                        unit_report(unit)
                    ));
                }
            }
        }
        if Instant::now() > deadline {
            let detail = match started {
                Started::Spawned { log, .. } => {
                    format!(
                        "; the end of its log {}:\n{}",
                        log.display(),
                        log_tail(log, 20)
                    )
                }
                Started::Unit(unit) => unit_report(unit),
            };
            return Err(format!(
                "replicad source did not answer on {} within {} s ({}){detail}",
                socket.display(),
                timeout.as_secs(),
                answer.err().unwrap_or_default()
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Stops replicating `volume` and removes its table, activation entry and
/// configuration; the data device keeps the data. The daemon must have
/// stopped (or is stopped through its control socket).
pub fn unprotect(config_dir: &Path, volume: &str, keep_state: bool) -> Result<Vec<String>, String> {
    let mut done = Vec::new();
    let cfg_path = config_dir.join(format!("source-{volume}.toml"));
    let state_dir = std::fs::read_to_string(&cfg_path)
        .ok()
        .and_then(|t| replicad::config::parse::<replicad::config::SourceConfig>(&cfg_path, &t).ok())
        .map(|c| c.state_dir);
    if let Some(sd) = &state_dir {
        let sock = replicad::control::default_path(sd);
        if replicad::control::request(&sock, "stop").is_ok() {
            let deadline = Instant::now() + Duration::from_secs(60);
            while replicad::control::request(&sock, "status").is_ok() {
                if Instant::now() > deadline {
                    return Err("the source daemon did not stop".into());
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            done.push("source daemon stopped".into());
        }
    }
    if exists(volume) {
        dm().remove(volume)
            .map_err(|e| format!("{e} (unmount the filesystem on /dev/mapper/{volume} first)"))?;
        done.push(format!(
            "/dev/mapper/{volume} removed (the data device keeps the data)"
        ));
    }
    for p in [Activation::path(config_dir, volume), cfg_path] {
        match std::fs::remove_file(&p) {
            Ok(()) => done.push(format!("{} removed", p.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("{}: {e}", p.display())),
        }
    }
    if let (Some(sd), false) = (&state_dir, keep_state) {
        if sd.exists() {
            std::fs::remove_dir_all(sd).map_err(|e| format!("{}: {e}", sd.display()))?;
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
    fn a_unit_that_failed_or_waits_for_a_restart_is_stopped() {
        let show = |a: &str, s: &str| {
            format!("ActiveState={a}\nSubState={s}\nResult=exit-code\nExecMainStatus=2\n")
        };
        assert_eq!(unit_stopped(&show("active", "running")), None);
        assert_eq!(unit_stopped(&show("activating", "start")), None);
        assert_eq!(
            unit_stopped(&show("failed", "failed")).as_deref(),
            Some("failed (failed), result exit-code, exit status 2")
        );
        assert!(unit_stopped(&show("activating", "auto-restart")).is_some());
        assert!(unit_stopped(&show("inactive", "dead")).is_some());
    }

    #[test]
    fn a_regular_file_cannot_be_protected() {
        let d = tempfile::tempdir().expect("tmp");
        let f = d.path().join("img");
        std::fs::write(&f, vec![0u8; 4096]).expect("w");
        assert!(sectors(&f)
            .expect_err("not a block device")
            .contains("not a block device"));
    }
}
