//! The command line: clap's types for every command (what each runs is in
//! [`crate::cmd`]).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use replica_control::PointChoice;

/// dm-replica control tool.
#[derive(Debug, Parser)]
#[command(name = "replctl", version, about = "dm-replica control tool")]
pub struct Cli {
    /// The command.
    #[command(subcommand)]
    pub cmd: Cmd,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Data keys (AES-256-GCM master keys shared by source and target).
    Keys {
        /// What to do with them.
        #[command(subcommand)]
        cmd: KeysCmd,
    },
    /// Private CA and host certificates for the replication link.
    Certs {
        /// What to do with them.
        #[command(subcommand)]
        cmd: CertsCmd,
    },
    /// Development mode (no kernel module): feed a userspace capture ring.
    Dev {
        /// What to do.
        #[command(subcommand)]
        cmd: DevCmd,
    },
    /// Wait until a volume's replica has applied a record sequence of a
    /// capture ring generation (sequences start over with each ring).
    Wait(WaitArgs),
    /// Recovery points of a target volume: list them, open one read-only
    /// or as a writable copy (test failover), close it again. Asks the
    /// running `replicad target`, which holds the replica; opens the
    /// replica itself only when no daemon answers (and says so).
    Point {
        /// What to do.
        #[command(subcommand)]
        cmd: PointCmd,
    },
    /// Protect a block device: put the `replica` target over it (use
    /// /dev/mapper/<volume> from now on), write the source's configuration
    /// and the boot-time activation entry, start `replicad source`, and
    /// copy the whole volume to the target (with a progress bar) until the
    /// replica is consistent.
    Protect(ProtectArgs),
    /// Stop protecting a volume: stop its source daemon, remove
    /// /dev/mapper/<volume> (unmount it first; the data device keeps the
    /// data), its activation entry and configuration.
    Unprotect(UnprotectArgs),
    /// Re-create every protected volume's table (boot time, before
    /// filesystems mount; dm-replica-activate.service runs it).
    Activate {
        /// Configuration directory.
        #[arg(long, default_value = "/etc/dm-replica")]
        config_dir: PathBuf,
    },
    /// Resync a protected volume: the source ships what it has spooled,
    /// then compares every chunk of the volume with the replica's (keyed
    /// hashes, at one point of the stream on both sides) and sends those
    /// that differ, later writes winning; `--full` sends every chunk. The
    /// replica is inconsistent until it ends; its last recovery point
    /// stays.
    Resync(ResyncArgs),
    /// Online verify: compare every chunk of a protected volume with the
    /// replica's while replication goes on (the replica stays consistent),
    /// report the chunks that differ, and with `--resync` send them. The
    /// result is kept in `replctl status` and the daemon's log; with
    /// `--wait` the exit status is non-zero when chunks differ and were not
    /// resent.
    Verify(VerifyArgs),
    /// Fail a volume over to the target host. `--planned` on the source
    /// host: stop writes, ship everything, hand over (no data loss). Without
    /// it, on the target host when the source is gone: promote the replica
    /// at the latest consistent state or a chosen recovery point. Either way
    /// the epoch moves on and the old source is refused from then on.
    Failover(FailoverArgs),
    /// List a target volume's recovery points.
    Points(PointsArgs),
    /// Show a daemon's status: its control socket's answer or, when only a
    /// state directory is given and the daemon is not running, the last
    /// status it published there.
    Status(StatusArgs),
}

/// Which daemon to ask: its state directory or its socket.
#[derive(Debug, Clone, Args)]
pub struct DaemonArgs {
    /// The daemon's state directory (its control socket, `replicad.sock`,
    /// is there).
    #[arg(long, required_unless_present = "socket")]
    pub state_dir: Option<PathBuf>,
    /// A control socket path (when it is not in the state directory).
    #[arg(long)]
    pub socket: Option<PathBuf>,
}

/// `replctl wait`.
#[derive(Debug, Args)]
pub struct WaitArgs {
    /// The daemon's state directory.
    #[arg(long)]
    pub state_dir: PathBuf,
    /// Volume id.
    #[arg(long)]
    pub volume: String,
    /// Record sequence that must be applied.
    #[arg(long)]
    pub applied: u64,
    /// The capture ring generation (hex) the sequence belongs to: the
    /// `generation=` of `dmsetup status <volume>` or of `replctl status`
    /// on the source.
    #[arg(long)]
    pub generation: String,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 120)]
    pub timeout: u64,
}

/// `replctl status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The daemon (with only a state directory: if the daemon is not
    /// running, the last status it published there).
    #[command(flatten)]
    pub daemon: DaemonArgs,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// `replctl resync`.
#[derive(Debug, Args)]
pub struct ResyncArgs {
    /// The source daemon.
    #[command(flatten)]
    pub daemon: DaemonArgs,
    /// Resend every chunk without comparing it with the replica's first
    /// (by default only chunks whose hashes differ are sent).
    #[arg(long)]
    pub full: bool,
    /// Wait for the resync to finish, with a progress bar.
    #[arg(long)]
    pub wait: bool,
    /// Give up waiting after this many seconds.
    #[arg(long, default_value_t = 86400)]
    pub timeout: u64,
}

/// `replctl verify`.
#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// The source daemon.
    #[command(flatten)]
    pub daemon: DaemonArgs,
    /// Send the chunks found different (ordinary writes in the stream: the
    /// replica stays consistent).
    #[arg(long)]
    pub resync: bool,
    /// Compare at most this many MiB per second (the reads on both sides).
    #[arg(long = "max-rate", value_name = "MIB_PER_SEC")]
    pub max_rate_mib: Option<u64>,
    /// Wait for the result.
    #[arg(long)]
    pub wait: bool,
    /// Give up waiting after this many seconds.
    #[arg(long, default_value_t = 86400)]
    pub timeout: u64,
}

/// `replctl failover`.
#[derive(Debug, Args)]
pub struct FailoverArgs {
    /// The daemon (source with --planned, else target).
    #[command(flatten)]
    pub daemon: DaemonArgs,
    /// Planned failover, run against the source.
    #[arg(long)]
    pub planned: bool,
    /// Volume (on a target with several).
    #[arg(long)]
    pub volume: Option<String>,
    /// Unplanned: `latest` (default) or a recovery point's record sequence
    /// (`replctl points`).
    #[arg(long, conflicts_with = "planned")]
    pub point: Option<PointChoice>,
}

/// `replctl points`.
#[derive(Debug, Args)]
pub struct PointsArgs {
    /// The target's state directory.
    #[arg(long)]
    pub state_dir: PathBuf,
    /// Volume id.
    #[arg(long)]
    pub volume: String,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// `replctl protect`.
#[derive(Debug, Args)]
pub struct ProtectArgs {
    /// The block device holding the data (a stable path).
    pub device: PathBuf,
    /// Volume id (also /dev/mapper/<volume>).
    #[arg(long)]
    pub volume: String,
    /// The target, host:port.
    #[arg(long)]
    pub target: String,
    /// The name in the target's certificate (default: the host part).
    #[arg(long)]
    pub target_name: Option<String>,
    /// Consistency group (default: the volume id).
    #[arg(long)]
    pub group: Option<String>,
    /// Ring size of the group, MiB.
    #[arg(long, default_value_t = 64)]
    pub ring_mib: u32,
    /// Configuration directory.
    #[arg(long, default_value = "/etc/dm-replica")]
    pub config_dir: PathBuf,
    /// The source's state directory (default /var/lib/replicad/<volume>).
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Private CA (default <config-dir>/pki/ca.pem).
    #[arg(long)]
    pub ca: Option<PathBuf>,
    /// This host's certificate (default <config-dir>/pki/<hostname>.pem).
    #[arg(long)]
    pub cert: Option<PathBuf>,
    /// This host's key (default <config-dir>/pki/<hostname>.key).
    #[arg(long)]
    pub key: Option<PathBuf>,
    /// Keyring (default <config-dir>/keys.toml).
    #[arg(long)]
    pub keys: Option<PathBuf>,
    /// Start `replicad source` as a background process (hosts without
    /// systemd) instead of `systemctl enable --now replicad-source@<volume>`.
    #[arg(long)]
    pub spawn: bool,
    /// Do not start the daemon (and do not copy).
    #[arg(long)]
    pub no_start: bool,
    /// Skip the initial copy (the replica is known to hold the same data,
    /// e.g. both are new and zeroed).
    #[arg(long)]
    pub no_initial_copy: bool,
}

/// `replctl unprotect`.
#[derive(Debug, Args)]
pub struct UnprotectArgs {
    /// Volume id.
    pub volume: String,
    /// Configuration directory.
    #[arg(long, default_value = "/etc/dm-replica")]
    pub config_dir: PathBuf,
    /// Keep the source's state directory.
    #[arg(long)]
    pub keep_state: bool,
}

/// `replctl keys`.
#[derive(Debug, Subcommand)]
pub enum KeysCmd {
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

/// A volume of a target configuration.
#[derive(Debug, Args)]
pub struct PointVolume {
    /// The target's configuration file (where its control socket is, and
    /// the replica when no daemon answers there).
    #[arg(long)]
    pub config: PathBuf,
    /// Volume id.
    #[arg(long)]
    pub volume: String,
}

/// `replctl point`.
#[derive(Debug, Subcommand)]
pub enum PointCmd {
    /// Print the ids of the snapshots the replica backend holds, oldest
    /// first (`replctl points` shows the recorded recovery points).
    List {
        /// The volume.
        #[command(flatten)]
        vol: PointVolume,
    },
    /// Make a point readable and print the path of its device (or file).
    Open(PointRef),
    /// Undo `open` (a writable copy is discarded).
    Close(PointRef),
}

/// One point of a volume, or its writable copy.
#[derive(Debug, Args)]
pub struct PointRef {
    /// The volume.
    #[command(flatten)]
    pub vol: PointVolume,
    /// Point id (`replctl point list`).
    #[arg(long)]
    pub point: u64,
    /// The point's writable copy instead of the point itself.
    #[arg(long)]
    pub writable: bool,
}

/// `replctl dev`.
#[derive(Debug, Subcommand)]
pub enum DevCmd {
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

/// `replctl certs`.
#[derive(Debug, Subcommand)]
pub enum CertsCmd {
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

/// The command line as given, with the exit codes at the end of `--help`.
pub fn parse() -> Cli {
    use clap::{CommandFactory, FromArgMatches};
    let matches = Cli::command()
        .after_help(crate::error::Exit::help())
        .get_matches();
    Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit())
}
