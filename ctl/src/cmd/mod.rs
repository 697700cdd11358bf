//! What each command does: one module per group of commands, each with a
//! `run` taking its arguments.

mod certs;
mod dev;
mod failover;
mod keys;
mod points;
mod protect;
mod resync;
mod status;
mod verify;

use std::path::PathBuf;

use crate::cli::{Cli, Cmd, DaemonArgs};
use crate::error::CtlError;

/// Runs the command given on the command line.
pub fn run(cli: Cli) -> Result<(), CtlError> {
    match cli.cmd {
        Cmd::Keys { cmd } => keys::run(cmd),
        Cmd::Certs { cmd } => certs::run(cmd),
        Cmd::Dev { cmd } => dev::run(cmd),
        Cmd::Status(a) => status::run(a),
        Cmd::Wait(a) => status::wait(a),
        Cmd::Points(a) => points::run(a),
        Cmd::Point { cmd } => points::point(cmd),
        Cmd::Protect(a) => protect::run(a),
        Cmd::Unprotect(a) => protect::unprotect(a),
        Cmd::Activate { config_dir } => protect::activate(&config_dir),
        Cmd::Resync(a) => resync::run(a),
        Cmd::Verify(a) => verify::run(a),
        Cmd::Failover(a) => failover::run(a),
    }
}

/// The control socket named, or the one in the state directory.
fn control_socket(d: &DaemonArgs) -> Result<PathBuf, CtlError> {
    d.socket
        .clone()
        .or_else(|| d.state_dir.as_deref().map(replica_control::default_path))
        .ok_or_else(|| CtlError::Usage("give --state-dir or --socket".into()))
}
