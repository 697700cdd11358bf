//! Command line of `replicad`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use clap::{Parser, Subcommand};

use crate::config::{SourceConfig, TargetConfig};

/// dm-replica daemon.
#[derive(Debug, Parser)]
#[command(
    name = "replicad",
    version,
    about = "dm-replica replication daemon (source and target roles)"
)]
pub struct Cli {
    /// Role to run.
    #[command(subcommand)]
    pub role: RoleCmd,
}

/// Roles.
#[derive(Debug, Subcommand)]
pub enum RoleCmd {
    /// Ship a protected volume's captured writes to a target.
    Source {
        /// Configuration file.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Receive, journal and apply segments to replicas.
    Target {
        /// Configuration file.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Check a configuration file and exit (0: it is fine, 2: it is not,
    /// with the reason). For `source`, also what the daemon needs to start
    /// with it: keyring, certificates, state and spool directories.
    Check {
        /// The role the configuration is for.
        role: CheckRole,
        /// Configuration file (`-`: read it from standard input).
        #[arg(long, short)]
        config: PathBuf,
    },
}

/// The roles `replicad check` checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CheckRole {
    /// A source configuration, and what `replicad source` needs to start.
    Source,
    /// A target configuration.
    Target,
}

/// Process exit codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Exit {
    /// Stopped cleanly.
    Ok = 0,
    /// Could not start (configuration, keys, certificates, storage).
    Startup = 2,
    /// Stopped for a non-recoverable replication error (Critical).
    Critical = 3,
}

impl From<Exit> for ExitCode {
    fn from(e: Exit) -> Self {
        ExitCode::from(e as u8)
    }
}

/// What the signal thread reports.
#[derive(Clone)]
pub struct Signals {
    /// Set at SIGINT/SIGTERM.
    pub stop: Arc<AtomicBool>,
    /// Bumped at every SIGHUP (reload keys).
    pub hup: Arc<std::sync::atomic::AtomicU64>,
}

/// Blocks SIGINT/SIGTERM/SIGHUP in every thread and handles them on one.
fn signals() -> Signals {
    use nix::sys::signal::{SigSet, Signal};
    let sig = Signals {
        stop: Arc::new(AtomicBool::new(false)),
        hup: Arc::new(std::sync::atomic::AtomicU64::new(0)),
    };
    let mut set = SigSet::empty();
    set.add(Signal::SIGINT);
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGHUP);
    if set.thread_block().is_ok() {
        let s = sig.clone();
        let _ = std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || loop {
                match set.wait() {
                    Ok(Signal::SIGHUP) => {
                        tracing::info!("SIGHUP: reloading keys");
                        s.hup.fetch_add(1, Ordering::AcqRel);
                    }
                    Ok(sig) => {
                        tracing::info!(signal = ?sig, "stopping");
                        s.stop.store(true, Ordering::Release);
                        return;
                    }
                    Err(_) => return,
                }
            });
    }
    sig
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("REPLICAD_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

/// What `replicad source` needs to start, checked without starting it
/// (`replicad check source`, which `replctl protect` runs before it starts
/// the daemon): the directories for its
/// state and spool are not on a protected volume, the keyring loads (present,
/// mode 0600, parseable), the TLS material loads, and the state and spool
/// directories are usable (an existing one is a writable directory, a missing
/// one can be created). The keyring, TLS and protected-volume checks are the
/// daemon's own loaders, so the errors are the ones it would stop with.
pub fn check_source_start(c: &SourceConfig) -> Result<(), crate::DaemonError> {
    crate::source::protected::check_not_protected(&c.state_dir, "state_dir")?;
    crate::source::protected::check_not_protected(&c.spool_dir(), "spool.dir")?;
    crate::keystore::KeyStore::load(&c.keys)?;
    crate::tls::client_config(&c.tls)?;
    usable_dir(&c.state_dir, "create state directory")?;
    usable_dir(&c.spool_dir(), "create spool directory")
}

/// `dir` is a writable directory, or the nearest existing ancestor is (so
/// the daemon can create it).
fn usable_dir(dir: &std::path::Path, what: &'static str) -> Result<(), crate::DaemonError> {
    use nix::unistd::{access, AccessFlags};
    let mut p = dir;
    loop {
        match std::fs::metadata(p) {
            Ok(m) if !m.is_dir() => {
                return Err(crate::DaemonError::io(
                    what,
                    dir,
                    std::io::Error::new(
                        std::io::ErrorKind::NotADirectory,
                        format!("{} is not a directory", p.display()),
                    ),
                ))
            }
            Ok(_) => {
                return access(p, AccessFlags::W_OK | AccessFlags::X_OK)
                    .map_err(|e| crate::DaemonError::io(what, dir, std::io::Error::from(e)))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => match p.parent() {
                Some(parent) if parent.as_os_str().is_empty() => p = std::path::Path::new("."),
                Some(parent) => p = parent,
                None => return Err(crate::DaemonError::io(what, dir, e)),
            },
            Err(e) => return Err(crate::DaemonError::io(what, dir, e)),
        }
    }
}

/// `replicad check`: the configuration in file `config` (`-`: on standard
/// input) and, for a source, what the daemon needs to start with it.
fn check(role: CheckRole, config: &Path) -> Result<(), crate::DaemonError> {
    let stdin = || {
        std::io::read_to_string(std::io::stdin())
            .map_err(|e| crate::DaemonError::io("read configuration", config, e))
    };
    let from_stdin = config == Path::new("-");
    match role {
        CheckRole::Source => {
            let c = if from_stdin {
                SourceConfig::from_text(config, &stdin()?)?
            } else {
                SourceConfig::load(config)?
            };
            check_source_start(&c)
        }
        CheckRole::Target => {
            if from_stdin {
                TargetConfig::from_text(config, &stdin()?)?;
            } else {
                TargetConfig::load(config)?;
            }
            Ok(())
        }
    }
}

/// Entry point shared by the `replicad` binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    let result = match cli.role {
        RoleCmd::Check { role, config } => {
            return match check(role, &config) {
                Ok(()) => {
                    println!("{}: ok", config.display());
                    Exit::Ok.into()
                }
                Err(e) => {
                    eprintln!("replicad: {e}");
                    Exit::Startup.into()
                }
            };
        }
        RoleCmd::Source { config } => {
            let sig = signals();
            SourceConfig::load(&config)
                .map_err(crate::DaemonError::from)
                .and_then(|c| crate::source::Source::new(c, sig))
                .map(|s| s.reload_from(&config))
                .map(|s| s.run())
        }
        RoleCmd::Target { config } => {
            let sig = signals();
            TargetConfig::load(&config)
                .map_err(crate::DaemonError::from)
                .and_then(|c| crate::target::Target::start(&c, sig))
                .map(|t| t.reload_from(&config))
                .map(|t| t.run())
        }
    };
    match result {
        Ok(Ok(())) => Exit::Ok.into(),
        Ok(Err(crate::DaemonError::Critical(m))) => {
            eprintln!("replicad: stopped, Critical: {m}");
            Exit::Critical.into()
        }
        Ok(Err(e)) => {
            eprintln!("replicad: {e}");
            Exit::Critical.into()
        }
        Err(e) => {
            eprintln!("replicad: cannot start: {e}");
            Exit::Startup.into()
        }
    }
}
