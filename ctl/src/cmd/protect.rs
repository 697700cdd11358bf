//! `replctl protect`, `unprotect` and `activate`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use replica_control::Command;

use crate::cli::{ProtectArgs, UnprotectArgs};
use crate::error::CtlError;
use crate::protect::ProtectOpts;
use crate::start::Started;

/// How long a started daemon has to answer on its control socket.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the initial copy may take.
const COPY_TIMEOUT: Duration = Duration::from_secs(7 * 86400);

/// The options `protect` runs with: the arguments, with every default
/// filled in.
fn opts(a: ProtectArgs) -> ProtectOpts {
    let host = hostname();
    let pki = a.config_dir.join("pki");
    let target_name = a.target_name.unwrap_or_else(|| {
        a.target
            .rsplit_once(':')
            .map_or(a.target.clone(), |(h, _)| h.to_owned())
    });
    ProtectOpts {
        device: a.device,
        group: a.group,
        ring_mib: a.ring_mib,
        target_name,
        target: a.target,
        ca: a.ca.unwrap_or_else(|| pki.join("ca.pem")),
        cert: a.cert.unwrap_or_else(|| pki.join(format!("{host}.pem"))),
        key: a.key.unwrap_or_else(|| pki.join(format!("{host}.key"))),
        keys: a.keys.unwrap_or_else(|| a.config_dir.join("keys.toml")),
        state_dir: a
            .state_dir
            .unwrap_or_else(|| PathBuf::from("/var/lib/replicad").join(&a.volume)),
        volume: a.volume,
        config_dir: a.config_dir,
        initial_copy: !a.no_initial_copy,
        replicad: crate::protect::replicad_exe(),
    }
}

/// Runs `protect`.
pub fn run(a: ProtectArgs) -> Result<(), CtlError> {
    let (spawn, no_start) = (a.spawn, a.no_start);
    let o = opts(a);
    let volume = &o.volume;
    let cfg = crate::protect::protect(&o)?;
    println!(
        "/dev/mapper/{volume} now protects {} (use it instead of the device); configuration {}",
        o.device.display(),
        cfg.display()
    );
    if no_start {
        println!("start it with: replicad source --config {}", cfg.display());
        return Ok(());
    }
    let mut started = if spawn {
        let d = crate::start::spawn_source(&o.replicad, &cfg, &o.state_dir)?;
        if let Started::Spawned { log, .. } = &d {
            println!("replicad source started (log {})", log.display());
        }
        d
    } else if Path::new("/run/systemd/system").exists() {
        let unit = format!("replicad-source@{volume}.service");
        let d = crate::start::start_unit(&unit)?;
        println!("{unit} enabled and started");
        d
    } else {
        return Err(CtlError::Usage(format!(
            "no systemd here: start `replicad source --config {}` (or use --spawn)",
            cfg.display()
        )));
    };
    let sock = replica_control::default_path(&o.state_dir);
    crate::start::wait_started(&sock, &mut started, START_TIMEOUT)?;
    if o.initial_copy {
        // A full copy, unless the daemon started one already (its target
        // asked for it): that one is waited for.
        let r = replica_control::request(&sock, Command::InitialCopy)?;
        println!("initial copy: {}", r.message.as_deref().unwrap_or_default());
        crate::progress::wait_answered_resync(&sock, &r, COPY_TIMEOUT)?;
        println!("initial copy done: the target applied its end; the replica is consistent");
    }
    Ok(())
}

/// Runs `unprotect`.
pub fn unprotect(a: UnprotectArgs) -> Result<(), CtlError> {
    for line in crate::protect::unprotect(&a.config_dir, &a.volume, a.keep_state)? {
        println!("{line}");
    }
    Ok(())
}

/// Runs `activate`.
pub fn activate(config_dir: &Path) -> Result<(), CtlError> {
    for line in crate::protect::activate(config_dir)? {
        println!("{line}");
    }
    Ok(())
}

/// This host's name (for default certificate paths).
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}
