//! `replctl`: drive dm-replica.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use replica_proto::keys::KeyRing;

#[derive(Debug, Parser)]
#[command(name = "replctl", version, about = "dm-replica control tool")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Data keys (AES-256-GCM master keys shared by source and target).
    Keys {
        #[command(subcommand)]
        cmd: KeysCmd,
    },
    /// Private CA and host certificates for the replication link.
    Certs {
        #[command(subcommand)]
        cmd: CertsCmd,
    },
    /// Development mode (no kernel module): feed a userspace capture ring.
    Dev {
        #[command(subcommand)]
        cmd: DevCmd,
    },
    /// Wait until a volume's replica has applied a record sequence of a
    /// capture ring generation (sequences start over with each ring).
    Wait {
        /// The daemon's state directory.
        #[arg(long)]
        state_dir: PathBuf,
        /// Volume id.
        #[arg(long)]
        volume: String,
        /// Record sequence that must be applied.
        #[arg(long)]
        applied: u64,
        /// The capture ring generation (hex) the sequence belongs to: the
        /// `generation=` of `dmsetup status <volume>` or of `replctl status`
        /// on the source.
        #[arg(long)]
        generation: String,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 120)]
        timeout: u64,
    },
    /// Recovery points of a target volume: list them, open one read-only
    /// or as a writable copy (test failover), close it again. Works while
    /// `replicad target` runs.
    Point {
        #[command(subcommand)]
        cmd: PointCmd,
    },
    /// Protect a block device: put the `replica` target over it (use
    /// /dev/mapper/<volume> from now on), write the source's configuration
    /// and the boot-time activation entry, start `replicad source`, and
    /// copy the whole volume to the target (with a progress bar) until the
    /// replica is consistent.
    Protect {
        /// The block device holding the data (a stable path).
        device: PathBuf,
        /// Volume id (also /dev/mapper/<volume>).
        #[arg(long)]
        volume: String,
        /// The target, host:port.
        #[arg(long)]
        target: String,
        /// The name in the target's certificate (default: the host part).
        #[arg(long)]
        target_name: Option<String>,
        /// Consistency group (default: the volume id).
        #[arg(long)]
        group: Option<String>,
        /// Ring size of the group, MiB.
        #[arg(long, default_value_t = 64)]
        ring_mib: u32,
        /// Configuration directory.
        #[arg(long, default_value = "/etc/dm-replica")]
        config_dir: PathBuf,
        /// The source's state directory (default /var/lib/replicad/<volume>).
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// Private CA (default <config-dir>/pki/ca.pem).
        #[arg(long)]
        ca: Option<PathBuf>,
        /// This host's certificate (default <config-dir>/pki/<hostname>.pem).
        #[arg(long)]
        cert: Option<PathBuf>,
        /// This host's key (default <config-dir>/pki/<hostname>.key).
        #[arg(long)]
        key: Option<PathBuf>,
        /// Keyring (default <config-dir>/keys.toml).
        #[arg(long)]
        keys: Option<PathBuf>,
        /// Start `replicad source` as a background process (hosts without
        /// systemd) instead of `systemctl enable --now replicad-source@<volume>`.
        #[arg(long)]
        spawn: bool,
        /// Do not start the daemon (and do not copy).
        #[arg(long)]
        no_start: bool,
        /// Skip the initial copy (the replica is known to hold the same data,
        /// e.g. both are new and zeroed).
        #[arg(long)]
        no_initial_copy: bool,
    },
    /// Stop protecting a volume: stop its source daemon, remove
    /// /dev/mapper/<volume> (unmount it first; the data device keeps the
    /// data), its activation entry and configuration.
    Unprotect {
        /// Volume id.
        volume: String,
        /// Configuration directory.
        #[arg(long, default_value = "/etc/dm-replica")]
        config_dir: PathBuf,
        /// Keep the source's state directory.
        #[arg(long)]
        keep_state: bool,
    },
    /// Re-create every protected volume's table (boot time, before
    /// filesystems mount; dm-replica-activate.service runs it).
    Activate {
        /// Configuration directory.
        #[arg(long, default_value = "/etc/dm-replica")]
        config_dir: PathBuf,
    },
    /// Resend every region of a protected volume (a full resync): the
    /// source ships what it has spooled, then the current content of the
    /// whole volume, with later writes winning. The replica is inconsistent
    /// until it ends; its last recovery point stays.
    Resync {
        /// The source daemon's state directory (its control socket is there).
        #[arg(long, required_unless_present = "socket")]
        state_dir: Option<PathBuf>,
        /// A control socket path (when it is not in the state directory).
        #[arg(long)]
        socket: Option<PathBuf>,
        /// Wait for the resync to finish, with a progress bar.
        #[arg(long)]
        wait: bool,
        /// Give up waiting after this many seconds.
        #[arg(long, default_value_t = 86400)]
        timeout: u64,
    },
    /// Fail a volume over to the target host. `--planned` on the source
    /// host: stop writes, ship everything, hand over (no data loss). Without
    /// it, on the target host when the source is gone: promote the replica
    /// at the latest consistent state or a chosen recovery point. Either way
    /// the epoch moves on and the old source is refused from then on.
    Failover {
        /// The daemon's state directory (source with --planned, else target).
        #[arg(long, required_unless_present = "socket")]
        state_dir: Option<PathBuf>,
        /// A control socket path (when it is not in the state directory).
        #[arg(long)]
        socket: Option<PathBuf>,
        /// Planned failover, run against the source.
        #[arg(long)]
        planned: bool,
        /// Volume (on a target with several).
        #[arg(long)]
        volume: Option<String>,
        /// Unplanned: `latest` (default) or a recovery point's record sequence
        /// (`replctl points`).
        #[arg(long, conflicts_with = "planned")]
        point: Option<String>,
    },
    /// List a target volume's recovery points.
    Points {
        /// The target's state directory.
        #[arg(long)]
        state_dir: PathBuf,
        /// Volume id.
        #[arg(long)]
        volume: String,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show the status a daemon publishes in its state directory.
    Status {
        /// The daemon's state directory: asks its control socket
        /// (`replicad.sock` there), or, if the daemon is not running, shows
        /// the last status it published.
        #[arg(long, required_unless_present = "socket")]
        state_dir: Option<PathBuf>,
        /// A control socket path (when it is not in the state directory).
        #[arg(long)]
        socket: Option<PathBuf>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum KeysCmd {
    /// Create a new keyring file (mode 0600) with one random key.
    Generate {
        /// Output file; never overwritten.
        #[arg(long)]
        out: PathBuf,
    },
    /// Add a new key and make it active; older keys stay accepted.
    Rotate {
        /// Keyring file to update in place.
        #[arg(long)]
        file: PathBuf,
    },
    /// Remove old keys that no journaled, unapplied segment of a target
    /// needs any more (the active key always stays). Run it on the target
    /// host, after the sources have reloaded the rotated keyring, then copy
    /// the file to the sources.
    Retire {
        /// Keyring file to update in place.
        #[arg(long)]
        file: PathBuf,
        /// The target's state directory (its journals are read, not
        /// changed).
        #[arg(long)]
        state_dir: PathBuf,
    },
}

#[derive(Debug, clap::Args)]
struct PointVolume {
    /// The target's configuration file.
    #[arg(long)]
    config: PathBuf,
    /// Volume id.
    #[arg(long)]
    volume: String,
}

#[derive(Debug, Subcommand)]
enum PointCmd {
    /// Print the ids of the snapshots the replica backend holds, oldest
    /// first (`replctl points` shows the recorded recovery points).
    List {
        #[command(flatten)]
        vol: PointVolume,
    },
    /// Make a point readable and print the path of its device (or file).
    Open {
        #[command(flatten)]
        vol: PointVolume,
        /// Point id (`replctl point list`).
        #[arg(long)]
        point: u64,
        /// A writable copy of the point instead of the point itself.
        #[arg(long)]
        writable: bool,
    },
    /// Undo `open` (a writable copy is discarded).
    Close {
        #[command(flatten)]
        vol: PointVolume,
        /// Point id.
        #[arg(long)]
        point: u64,
        /// Close the writable copy.
        #[arg(long)]
        writable: bool,
    },
}

fn open_volume_replica(
    v: &PointVolume,
) -> Result<Box<dyn replica_store::replica::ReplicaStore>, String> {
    let cfg = replicad::config::TargetConfig::load(&v.config).map_err(|e| e.to_string())?;
    let vc = cfg
        .volumes
        .iter()
        .find(|x| x.id == v.volume)
        .ok_or_else(|| format!("no volume {} in {}", v.volume, v.config.display()))?;
    replicad::backend::open_replica(&cfg.state_dir, vc).map_err(|e| e.to_string())
}

fn access(writable: bool) -> replica_store::replica::PointAccess {
    if writable {
        replica_store::replica::PointAccess::Writable
    } else {
        replica_store::replica::PointAccess::ReadOnly
    }
}

#[derive(Debug, Subcommand)]
enum DevCmd {
    /// Capture the blocks in which IMAGE differs from --base (all of IMAGE
    /// without a base) into a ring file, followed by a flush.
    Feed {
        /// Ring file (created if missing).
        #[arg(long)]
        ring: PathBuf,
        /// The volume's new content.
        #[arg(long)]
        image: PathBuf,
        /// The volume's previous content.
        #[arg(long)]
        base: Option<PathBuf>,
        /// Data space when creating the ring, MiB.
        #[arg(long, default_value_t = 64)]
        ring_mib: u64,
    },
}

#[derive(Debug, Subcommand)]
enum CertsCmd {
    /// Create a private CA and a certificate for each host, in one directory.
    Generate {
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
        /// Host names (certificate CN and DNS name); repeat for each host.
        #[arg(long = "host", required = true)]
        hosts: Vec<String>,
        /// Validity of host certificates in days.
        #[arg(long, default_value_t = 825)]
        days: i64,
    },
    /// Issue one more host certificate from an existing CA directory.
    Issue {
        /// Directory holding ca.pem and ca.key.
        #[arg(long)]
        ca_dir: PathBuf,
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
        /// Host name.
        #[arg(long)]
        host: String,
        /// Validity in days.
        #[arg(long, default_value_t = 825)]
        days: i64,
    },
}

fn run(cli: Cli) -> Result<(), String> {
    match cli.cmd {
        Cmd::Keys {
            cmd: KeysCmd::Generate { out },
        } => {
            let kr = KeyRing::generate().map_err(|e| e.to_string())?;
            kr.save(&out, false).map_err(|e| e.to_string())?;
            println!(
                "wrote {} (key id {}); copy it to the other site over a secure channel",
                out.display(),
                kr.active()
            );
        }
        Cmd::Keys {
            cmd: KeysCmd::Rotate { file },
        } => {
            let mut kr = KeyRing::load(&file).map_err(|e| e.to_string())?;
            let id = kr.rotate().map_err(|e| e.to_string())?;
            kr.save(&file, true).map_err(|e| e.to_string())?;
            println!(
                "key id {id} is now active in {}; install the file on both sites",
                file.display()
            );
        }
        Cmd::Keys {
            cmd: KeysCmd::Retire { file, state_dir },
        } => {
            let needed = replctl::keys::needed_key_ids(&state_dir)?;
            let mut kr = KeyRing::load(&file).map_err(|e| e.to_string())?;
            let gone = kr.retire(&needed);
            if gone.is_empty() {
                println!(
                    "nothing to retire: keys {:?} are active or still needed by journaled segments",
                    kr.ids()
                );
            } else {
                kr.save(&file, true).map_err(|e| e.to_string())?;
                println!(
                    "retired key id(s) {gone:?} from {}; kept {:?}; install the file on both sites",
                    file.display(),
                    kr.ids()
                );
            }
        }
        Cmd::Certs {
            cmd: CertsCmd::Generate { out, hosts, days },
        } => {
            replctl::certs::generate(&out, &hosts, days).map_err(|e| e.to_string())?;
            println!(
                "wrote ca.pem/ca.key and {} host certificate(s) to {}",
                hosts.len(),
                out.display()
            );
        }
        Cmd::Certs {
            cmd:
                CertsCmd::Issue {
                    ca_dir,
                    out,
                    host,
                    days,
                },
        } => {
            replctl::certs::issue(&ca_dir, &out, &host, days).map_err(|e| e.to_string())?;
            println!("wrote {host}.pem and {host}.key to {}", out.display());
        }
        Cmd::Dev {
            cmd:
                DevCmd::Feed {
                    ring,
                    image,
                    base,
                    ring_mib,
                },
        } => {
            let new = std::fs::read(&image).map_err(|e| format!("{}: {e}", image.display()))?;
            let base = match base {
                Some(b) => Some(std::fs::read(&b).map_err(|e| format!("{}: {e}", b.display()))?),
                None => None,
            };
            let mut p = replctl::dev::open_or_create(&ring, 4096, ring_mib)?;
            let (records, bytes) = replctl::dev::feed(
                &mut p,
                base.as_deref(),
                &new,
                std::time::Duration::from_secs(300),
            )?;
            println!(
                "captured {records} records ({bytes} bytes of writes) up to sequence {} of generation {}",
                p.next_seq() - 1,
                hex::encode(p.generation())
            );
        }
        Cmd::Resync {
            state_dir,
            socket,
            wait,
            timeout,
        } => {
            let sock = control_socket(socket, state_dir.as_deref())?;
            let r = replicad::control::request(&sock, "resync")?;
            println!("{}", r.message.as_deref().unwrap_or_default());
            if wait {
                replctl::progress::wait_answered_resync(
                    &sock,
                    &r,
                    std::time::Duration::from_secs(timeout),
                )?;
                println!("resync done: the target applied its end; the replica is consistent");
            }
        }
        Cmd::Protect {
            device,
            volume,
            target,
            target_name,
            group,
            ring_mib,
            config_dir,
            state_dir,
            ca,
            cert,
            key,
            keys,
            spawn,
            no_start,
            no_initial_copy,
        } => {
            let host = hostname();
            let pki = config_dir.join("pki");
            let o = replctl::protect::ProtectOpts {
                device,
                volume: volume.clone(),
                group,
                ring_mib,
                target_name: target_name.unwrap_or_else(|| {
                    target
                        .rsplit_once(':')
                        .map_or(target.clone(), |(h, _)| h.to_owned())
                }),
                target,
                ca: ca.unwrap_or_else(|| pki.join("ca.pem")),
                cert: cert.unwrap_or_else(|| pki.join(format!("{host}.pem"))),
                key: key.unwrap_or_else(|| pki.join(format!("{host}.key"))),
                keys: keys.unwrap_or_else(|| config_dir.join("keys.toml")),
                state_dir: state_dir
                    .unwrap_or_else(|| PathBuf::from("/var/lib/replicad").join(&volume)),
                config_dir,
                initial_copy: !no_initial_copy,
            };
            let cfg = replctl::protect::protect(&o)?;
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
                let d = replctl::protect::spawn_source(&replicad_exe(), &cfg, &o.state_dir)?;
                if let replctl::protect::Started::Spawned { log, .. } = &d {
                    println!("replicad source started (log {})", log.display());
                }
                d
            } else if Path::new("/run/systemd/system").exists() {
                let unit = format!("replicad-source@{volume}.service");
                let d = replctl::protect::start_unit(&unit)?;
                println!("{unit} enabled and started");
                d
            } else {
                return Err(format!(
                    "no systemd here: start `replicad source --config {}` (or use --spawn)",
                    cfg.display()
                ));
            };
            let sock = replicad::control::default_path(&o.state_dir);
            replctl::protect::wait_started(
                &sock,
                &mut started,
                std::time::Duration::from_secs(60),
            )?;
            if !no_initial_copy {
                // A full copy, unless the daemon started one already (its
                // target asked for it): that one is waited for.
                let r = replicad::control::request(&sock, "initial-copy")?;
                println!("initial copy: {}", r.message.as_deref().unwrap_or_default());
                replctl::progress::wait_answered_resync(
                    &sock,
                    &r,
                    std::time::Duration::from_secs(7 * 86400),
                )?;
                println!(
                    "initial copy done: the target applied its end; the replica is consistent"
                );
            }
        }
        Cmd::Unprotect {
            volume,
            config_dir,
            keep_state,
        } => {
            for line in replctl::protect::unprotect(&config_dir, &volume, keep_state)? {
                println!("{line}");
            }
        }
        Cmd::Activate { config_dir } => {
            for line in replctl::protect::activate(&config_dir)? {
                println!("{line}");
            }
        }
        Cmd::Failover {
            state_dir,
            socket,
            planned,
            volume,
            point,
        } => {
            let sock = control_socket(socket, state_dir.as_deref())?;
            let req = replicad::control::Request {
                version: replicad::control::CONTROL_VERSION,
                command: if planned {
                    "failover-planned"
                } else {
                    "failover"
                }
                .into(),
                volume,
                point,
            };
            let started = std::time::Instant::now();
            let r = replicad::control::send(&sock, &req, std::time::Duration::from_secs(1200))?;
            println!("{}", r.message.as_deref().unwrap_or_default());
            println!("failover took {:.1} s", started.elapsed().as_secs_f64());
        }
        Cmd::Points {
            state_dir,
            volume,
            json,
        } => {
            let path = state_dir.join("volumes").join(&volume).join("state.json");
            let st = replica_store::state::VolumeState::load(&path).map_err(|e| e.to_string())?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&st.points).map_err(|e| e.to_string())?
                );
            } else {
                println!(
                    "{:>12}  {:<9} {:>10}  SOURCE TIME (UTC)",
                    "RECORD", "KIND", "MARKER"
                );
                for p in &st.points {
                    let t = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(
                        p.source_time_ns,
                    ))
                    .map(|t| t.to_string())
                    .unwrap_or_default();
                    println!(
                        "{:>12}  {:<9} {:>10}  {}",
                        p.seq,
                        format!("{:?}", p.kind).to_lowercase(),
                        p.marker.map(|m| m.to_string()).unwrap_or_default(),
                        t
                    );
                }
                if let Some(since) = st.resync_since {
                    println!("a resync is running since record {since}: the replica is inconsistent; fail over to a point above");
                }
                if let Some(p) = &st.promoted {
                    println!(
                        "failed over at record {} (epoch {}): the volume is {}",
                        p.point_seq, p.epoch, p.device
                    );
                }
            }
        }
        Cmd::Wait {
            state_dir,
            volume,
            applied,
            generation,
            timeout,
        } => {
            let v = replctl::wait::wait_applied(
                &state_dir,
                &volume,
                applied,
                &generation,
                std::time::Duration::from_secs(timeout),
            )
            .map_err(|e| e.to_string())?;
            println!(
                "volume {volume}: applied up to {} of generation {}",
                v.applied_seq, v.generation
            );
        }
        Cmd::Point {
            cmd: PointCmd::List { vol },
        } => {
            for id in open_volume_replica(&vol)?
                .list_points()
                .map_err(|e| e.to_string())?
            {
                println!("{id}");
            }
        }
        Cmd::Point {
            cmd:
                PointCmd::Open {
                    vol,
                    point,
                    writable,
                },
        } => {
            let path = open_volume_replica(&vol)?
                .open_point(point, access(writable))
                .map_err(|e| e.to_string())?;
            println!("{}", path.display());
        }
        Cmd::Point {
            cmd:
                PointCmd::Close {
                    vol,
                    point,
                    writable,
                },
        } => {
            open_volume_replica(&vol)?
                .close_point(point, access(writable))
                .map_err(|e| e.to_string())?;
        }
        Cmd::Status {
            state_dir,
            socket,
            json,
        } => {
            let sock = socket
                .clone()
                .or_else(|| state_dir.as_deref().map(replicad::control::default_path));
            let live = sock
                .as_deref()
                .map(|s| replicad::control::request(s, "status"));
            let vols = match (live, &state_dir) {
                (Some(Ok(r)), _) => r.status.unwrap_or_default(),
                // An explicit socket that does not answer is an error.
                (Some(Err(e)), _) if socket.is_some() => return Err(e),
                // A refused caller must not fall back to the file.
                (Some(Err(e)), _) if e.to_lowercase().contains("permission denied") => {
                    return Err(e)
                }
                (_, Some(dir)) => {
                    eprintln!(
                        "replctl: daemon not answering; last published status from {}",
                        dir.display()
                    );
                    replicad::status::read(dir).map_err(|e| format!("{}: {e}", dir.display()))?
                }
                (Some(Err(e)), None) => return Err(e),
                (None, None) => return Err("give --state-dir or --socket".into()),
            };
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&vols).map_err(|e| e.to_string())?
                );
            } else {
                println!(
                    "{:<16} {:<9} {:<10} {:<12} {:<8} {:>12} {:>12} {:>16} {:>10} {:>12}  reasons",
                    "VOLUME",
                    "ROLE",
                    "CONN",
                    "REPLICA",
                    "HEALTH",
                    "DURABLE",
                    "APPLIED",
                    "LAG",
                    "SPOOL",
                    "LAST POINT"
                );
                for v in vols {
                    // Lag and spool are the source's (records not yet
                    // durable on the target, the age of the oldest, the
                    // bytes held for them); recovery points the target's.
                    let primary = v.role == replicad::status::Role::Primary;
                    let (lag, spool, point) = if primary {
                        (
                            format!("{} rec/{:.1}s", v.lag_records, v.lag_seconds),
                            human_bytes(v.spool_bytes),
                            "-".to_owned(),
                        )
                    } else {
                        let point = if v.points == 0 {
                            "none".to_owned()
                        } else {
                            v.last_point_seq.to_string()
                        };
                        ("-".to_owned(), "-".to_owned(), point)
                    };
                    println!(
                        "{:<16} {:<9} {:<10} {:<12} {:<8} {:>12} {:>12} {:>16} {:>10} {:>12}  {}",
                        v.volume,
                        format!("{:?}", v.role),
                        format!("{:?}", v.connection),
                        v.replica,
                        format!("{:?}", v.health),
                        v.durable_seq,
                        v.applied_seq,
                        lag,
                        spool,
                        point,
                        v.reasons.join("; ")
                    );
                }
            }
        }
    }
    Ok(())
}

/// The control socket named, or the one in a state directory.
fn control_socket(socket: Option<PathBuf>, state_dir: Option<&Path>) -> Result<PathBuf, String> {
    socket
        .or_else(|| state_dir.map(replicad::control::default_path))
        .ok_or_else(|| "give --state-dir or --socket".to_string())
}

/// This host's name (for default certificate paths).
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// `replicad` next to this executable, else on PATH.
fn replicad_exe() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join("replicad")))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("replicad"))
}

/// Bytes for a human: B, KiB, MiB, GiB, TiB with one decimal.
fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn main() -> ExitCode {
    // Output piped into `head` or `grep -q`: a closed pipe ends replctl
    // quietly, as it does any Unix tool, instead of a panic on EPIPE.
    // SAFETY: called first thing, before any other thread exists; SIG_DFL
    // is a valid disposition for SIGPIPE and no handler is involved.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("replctl: {e}");
            ExitCode::from(1)
        }
    }
}
